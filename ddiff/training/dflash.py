"""DFlash draft training: anchor sampling, the packed block loss, and ``python -m ddiff.train dflash``.

The objective (SpecForge ``OnlineDFlashModel``, the diffusers ``train_dflash.py`` example):

* the frozen target runs once over each sequence; its features (``hidden_states[i + 1]`` of
  the draft's ``target_layer_ids``) are the context of every block;
* ``num_anchors`` anchors per sequence are drawn uniformly **without replacement** from the
  positions ``a`` whose token and next token are both in the loss mask, then sorted (fewer
  when fewer qualify; the missing blocks are dropped, never an error or a hang);
* block ``b`` is ``[x[a], mask x (bs - 1)]`` at positions ``a .. a + bs - 1``; it sees the context
  positions **strictly before** ``a`` and its own block bidirectionally
  (:func:`ddiff.anchor_attention`), exactly what the draft sees at inference after committing
  ``x[:a + 1]``;
* block position ``k >= 1`` predicts ``x[a + k]`` (same position: labels are not shifted) through
  the target's ``lm_head``, with weight ``exp(-(k - 1) / gamma)`` times the loss mask (positions
  past the sequence end weigh 0); the loss is ``sum(w * CE) / sum(w)``.

The cross-entropy runs over the supervised rows only, in chunks of ``chunk_size`` rows, and
keeps no logits for the backward pass (:func:`lm_head_cross_entropy`).
"""

from __future__ import annotations

import argparse
import json
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ddiff.training.loop import Recipe, TrainingSetup

Tensor = torch.Tensor

__all__ = ["DFLASH", "DFlashBlocks", "build_dflash_blocks", "default_gamma", "dflash_loss", "lm_head_cross_entropy",
           "sample_anchors"]

#: The paper's loss-decay constants per block size (gamma = 7 for 16, 5 for 10, 4 for 8).
PAPER_GAMMA = {16: 7.0, 10: 5.0, 8: 4.0}


def default_gamma(block_size: int) -> float:
    """The paper's gamma for block sizes 8, 10 and 16; ``block_size / 2`` otherwise (its rule for 8 and 10)."""
    return PAPER_GAMMA.get(int(block_size), block_size / 2.0)


# ---------------------------------------------------------------------------------------------
# Anchors and blocks
# ---------------------------------------------------------------------------------------------


def sample_anchors(loss_mask: Tensor, num_anchors: int, *, generator: Optional[torch.Generator] = None):
    """Draw DFlash anchors: uniform without replacement, sorted, from valid positions.

    A position ``a`` is valid when ``loss_mask[a]`` and ``loss_mask[a + 1]`` are both set.

    Args:
        loss_mask: ``[B, S]`` bool (or 0/1) mask of supervised tokens.
        num_anchors: blocks per sequence (at most; 512 in DFlash).
        generator: the torch.Generator the uniform draws come from.

    Returns:
        ``(anchors, keep)``: int64 ``[B, n]`` sorted ascending within the kept ones, and bool
        ``[B, n]``; ``n = min(num_anchors, most valid positions in a row)`` (at least 1). A row with
        fewer valid positions keeps that many; dropped blocks have anchor 0 and ``keep`` False.

    Example:
        >>> anchors, keep = sample_anchors(torch.ones(2, 100, dtype=torch.bool), 16,
        ...                                generator=torch.Generator().manual_seed(0))
    """
    if not isinstance(num_anchors, numbers.Integral) or isinstance(num_anchors, bool) or num_anchors < 1:
        raise ValueError(f"`num_anchors` must be an int >= 1, got {num_anchors!r}.")
    if loss_mask.dim() != 2:
        raise ValueError(f"`loss_mask` must be [B, S], got shape {tuple(loss_mask.shape)}.")
    B, S = loss_mask.shape
    device = loss_mask.device
    mask = loss_mask.to(torch.bool)
    valid = mask[:, :-1] & mask[:, 1:]  # [B, S - 1]
    counts = valid.sum(dim=1)
    width = max(1, min(int(num_anchors), int(counts.max()) if B and S > 1 else 0))
    if S < 2 or B == 0:
        return (torch.zeros(B, width, dtype=torch.int64, device=device),
                torch.zeros(B, width, dtype=torch.bool, device=device))
    draw_device = generator.device if generator is not None else device
    scores = torch.rand(valid.shape, generator=generator, device=draw_device).to(device)
    scores = scores.masked_fill(~valid, 2.0)  # invalid positions sort last
    picked = scores.argsort(dim=1)[:, :width]
    picked_valid = torch.arange(width, device=device)[None, :] < counts.clamp(max=width)[:, None]
    sentinel = S  # larger than any position: dropped blocks sort last
    anchors = torch.where(picked_valid, picked, torch.full_like(picked, sentinel)).sort(dim=1).values
    keep = anchors < sentinel
    return torch.where(keep, anchors, torch.zeros_like(anchors)), keep


@dataclass
class DFlashBlocks:
    """The packed blocks of one batch (``N`` blocks of ``bs`` tokens per row).

    Attributes:
        noise_ids: ``[B, N * bs]`` int64: ``x[a]`` then ``bs - 1`` mask ids per block (all mask ids
            for dropped blocks).
        position_ids: ``[B, S + N * bs]`` int64: ``0 .. S-1`` for the context, then ``a .. a+bs-1``.
        labels: ``[B, N, bs]`` int64: ``x[a + k]`` (clamped to the sequence; see ``weights``).
        weights: ``[B, N, bs]`` float64: ``keep * [k >= 1] * [a + k < S] * loss_mask[a + k] *
            exp(-(k - 1) / gamma)``.
    """

    noise_ids: Tensor
    position_ids: Tensor
    labels: Tensor
    weights: Tensor


def build_dflash_blocks(input_ids: Tensor, anchors: Tensor, keep: Tensor, *, block_size: int, mask_token_id: int,
                        loss_mask: Optional[Tensor] = None, gamma: Optional[float] = None) -> DFlashBlocks:
    """Noise blocks, positions, labels and loss weights for ``anchors`` (see :class:`DFlashBlocks`)."""
    B, S = input_ids.shape
    N = anchors.shape[1]
    device = input_ids.device
    gamma = default_gamma(block_size) if gamma is None else float(gamma)
    offsets = torch.arange(block_size, device=device)
    label_pos = anchors[:, :, None] + offsets  # [B, N, bs]
    in_range = label_pos < S
    labels = input_ids.gather(1, label_pos.clamp(max=S - 1).reshape(B, -1)).reshape(B, N, block_size)
    noise = torch.full((B, N, block_size), mask_token_id, dtype=torch.int64, device=device)
    noise[:, :, 0] = torch.where(keep, labels[:, :, 0], mask_token_id)
    mask = torch.ones_like(input_ids, dtype=torch.bool) if loss_mask is None else loss_mask.to(torch.bool)
    supervised = mask.gather(1, label_pos.clamp(max=S - 1).reshape(B, -1)).reshape(B, N, block_size)
    supervised = supervised & in_range & keep[:, :, None] & (offsets >= 1)
    decay = torch.exp(-(offsets - 1).clamp(min=0).to(torch.float64) / gamma)
    weights = torch.where(supervised, decay, torch.zeros((), device=device))
    context = torch.arange(S, device=device).expand(B, S)
    position_ids = torch.cat([context, label_pos.reshape(B, -1)], dim=1)
    return DFlashBlocks(noise.reshape(B, -1), position_ids, labels, weights)


# ---------------------------------------------------------------------------------------------
# Chunked cross-entropy through a frozen LM head
# ---------------------------------------------------------------------------------------------


class _LMHeadCrossEntropy(torch.autograd.Function):
    """Per-row CE of ``hidden @ weight.T (+ bias)``; the gradient reaches ``hidden`` only.

    The forward computes each chunk's logits once, its CE, argmax and ``dCE/dhidden =
    (softmax - onehot) @ weight``; only that ``[n, H]`` gradient is kept for the backward, never
    the ``[n, V]`` logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size):
        n = hidden.shape[0]
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)
        ce = torch.empty(n, dtype=out_dtype, device=hidden.device)
        pred = torch.empty(n, dtype=torch.int64, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for s in range(0, n, chunk_size):
            e = min(n, s + chunk_size)
            logits = F.linear(hidden[s:e], weight, bias)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(e - s, device=hidden.device)
            ce[s:e] = lse - logits[rows, labels[s:e]]
            pred[s:e] = logits.argmax(dim=-1)
            if grad is not None:
                probs = torch.exp(logits - lse[:, None])
                probs[rows, labels[s:e]] -= 1.0
                grad[s:e] = (probs.to(weight.dtype) @ weight).to(grad.dtype)
        ctx.mark_non_differentiable(pred)
        ctx.save_for_backward(grad)
        return ce, pred

    @staticmethod
    def backward(ctx, grad_ce, grad_pred):
        (grad,) = ctx.saved_tensors
        return (grad * grad_ce[:, None]).to(grad.dtype), None, None, None, None


def lm_head_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                          chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Cross-entropy of ``F.linear(hidden, weight, bias)`` per row, ``chunk_size`` rows at a time.

    Args:
        hidden: ``[n, H]`` (differentiable). weight: ``[V, H]``, bias: ``[V]`` or None, both
            treated as frozen (no gradient). labels: int64 ``[n]`` in ``[0, V)``.

    Returns:
        ``(ce, argmax)``: ``[n]`` CE in fp32 (float64 for float64 inputs), and ``[n]`` int64 argmax
        of the logits. Peak extra memory is one chunk's logits, and the backward stores ``[n, H]``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"`hidden` [n, H] and `weight` [V, H] do not fit: {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}.")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"`labels` must have shape [{hidden.shape[0]}], got {tuple(labels.shape)}.")
    if not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be an int >= 1, got {chunk_size!r}.")
    return _LMHeadCrossEntropy.apply(hidden, weight.detach(), None if bias is None else bias.detach(),
                                     labels, int(chunk_size))


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def _check_ids(name: str, t, shape=None):
    if not isinstance(t, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}.")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {tuple(t.shape)}.")


def _target_forward(target, input_ids, attention_mask):
    import inspect

    kwargs = {"input_ids": input_ids, "output_hidden_states": True, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    try:
        if "logits_to_keep" in inspect.signature(target.forward).parameters:
            kwargs["logits_to_keep"] = 1  # only the features are needed
    except (TypeError, ValueError):
        pass
    return target(**kwargs).hidden_states


def dflash_loss(draft, target, input_ids: Tensor, loss_mask: Optional[Tensor] = None, num_anchors: int = 512,
                gamma: Optional[float] = None, generator: Optional[torch.Generator] = None, *,
                attention_mask: Optional[Tensor] = None, attention_backend: str = "auto",
                chunk_size: int = 1024) -> tuple[Tensor, dict]:
    r"""The DFlash training loss of ``draft`` on sequences of the frozen ``target`` (module docstring).

    Args:
        draft: a :class:`~ddiff.pipelines.DFlashDraftModel` (or a DDP / accelerate wrapper of one).
        target: the transformers causal LM whose features, embeddings and ``lm_head`` the draft
            uses; it runs under ``no_grad`` and gets no gradient.
        input_ids: int64 ``[B, S]``, right-padded.
        loss_mask: ``[B, S]`` bool / 0-1 of supervised tokens (default all; padding must be 0).
        num_anchors: blocks per sequence (fewer when fewer positions qualify).
        gamma: loss decay; default :func:`default_gamma` of the draft's block size.
        generator: the anchors' random source (:func:`sample_anchors` is its first use).
        attention_mask: ``[B, S]`` 0/1 padding mask passed to the target (right padding only);
            padded positions are also removed from ``loss_mask``.
        attention_backend: ``ddiff.anchor_attention`` backend for the draft (``"auto"``,
            ``"torch"``, ``"flex"``, ``"triton"``).
        chunk_size: rows per cross-entropy chunk.

    Returns:
        ``(loss, metrics)``: the scalar loss (0, still attached to the draft, when no position is
        supervised) and floats ``accuracy`` (argmax == label over supervised positions),
        ``acceptance_length`` (mean over kept blocks of 1 + the run of correct leading
        predictions: the acceptance a greedy verifier would give), ``num_blocks``,
        ``num_tokens``.

    Example:
        >>> loss, metrics = dflash_loss(draft, target, batch_ids, loss_mask, num_anchors=512,
        ...                             generator=torch.Generator("cuda").manual_seed(0))
        >>> loss.backward()
    """
    from ddiff.pipelines.dflash_model import check_draft_target, target_features

    core = getattr(draft, "module", draft)
    check_draft_target(core, target)
    _check_ids("input_ids", input_ids)
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"`input_ids` must be an integer [B, S] tensor, got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}.")
    B, S = input_ids.shape
    device = input_ids.device
    vocab = target.get_input_embeddings().weight.shape[0]
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise ValueError(f"`input_ids` must lie in [0, {vocab}).")
    if loss_mask is None:
        loss_mask = torch.ones(B, S, dtype=torch.bool, device=device)
    _check_ids("loss_mask", loss_mask, (B, S))
    loss_mask = loss_mask.to(device=device, dtype=torch.bool)
    if attention_mask is not None:
        _check_ids("attention_mask", attention_mask, (B, S))
        valid = attention_mask.to(torch.bool)
        if S > 1 and bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            raise ValueError("`attention_mask` must be right-padded (ones, then zeros) for DFlash training.")
        loss_mask = loss_mask & valid
    if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not gamma > 0):
        raise ValueError(f"`gamma` must be a positive number or None, got {gamma!r}.")
    bs, H = core.block_size, core.config.hidden_size

    with torch.no_grad():
        features = target_features(_target_forward(target, input_ids, attention_mask), core.target_layer_ids)
    anchors, keep = sample_anchors(loss_mask, num_anchors, generator=generator)
    blocks = build_dflash_blocks(input_ids, anchors, keep, block_size=bs, mask_token_id=core.mask_token_id,
                                 loss_mask=loss_mask, gamma=gamma)
    with torch.no_grad():
        noise = target.get_input_embeddings()(blocks.noise_ids)
    hidden = draft(noise_embedding=noise, target_hidden=features, position_ids=blocks.position_ids,
                   anchors=anchors, keep=keep, attention_backend=attention_backend)

    weights = blocks.weights.reshape(-1)
    rows = torch.nonzero(weights > 0).squeeze(1)
    num_tokens = int(rows.numel())
    num_blocks = int(keep.sum())
    if num_tokens == 0:  # nothing supervised: a zero loss that still reaches every draft parameter
        return hidden.sum() * 0.0, {"accuracy": float("nan"), "acceptance_length": float("nan"),
                                    "num_blocks": float(num_blocks), "num_tokens": 0.0}
    head = target.get_output_embeddings()
    labels = blocks.labels.reshape(-1)[rows]
    ce, pred = lm_head_cross_entropy(hidden.reshape(-1, H)[rows], head.weight, labels,
                                     bias=getattr(head, "bias", None), chunk_size=chunk_size)
    w = weights[rows].to(ce.dtype)
    loss = (ce * w).sum() / w.sum()

    with torch.no_grad():
        correct = pred == labels
        supervised = torch.zeros(B * anchors.shape[1] * bs, dtype=torch.bool, device=device)
        supervised[rows] = True
        right = torch.zeros_like(supervised)
        right[rows] = correct
        supervised, right = supervised.view(B, -1, bs)[..., 1:], right.view(B, -1, bs)[..., 1:]
        run = ((right | ~supervised).to(torch.int64).cumprod(dim=-1) * supervised).sum(dim=-1)
        counted = supervised.any(dim=-1)
        acceptance = float((run + 1)[counted].double().mean()) if bool(counted.any()) else float("nan")
        metrics = {"accuracy": float(correct.double().mean()), "acceptance_length": acceptance,
                   "num_blocks": float(num_blocks), "num_tokens": float(num_tokens)}
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# python -m ddiff.train dflash
# ---------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="local directory of the target causal LM (transformers)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--draft", help="local directory of a DFlash draft to fine-tune (z-lab layout)")
    which.add_argument("--new-draft-layers", "--new_draft_layers", dest="new_draft_layers", type=int,
                       help="train a new draft with this many layers, shaped like the target's")
    parser.add_argument("--data", required=True,
                        help="JSONL: one record per line with `input_ids` (list of ints, optional `loss_mask`) or "
                             "`text`; with --regenerate_max_new_tokens the records are prompts")
    parser.add_argument("--regenerate_max_new_tokens", type=int, default=0,
                        help="continue each record greedily with the target for this many tokens and train on the "
                             "continuation only (the target's own outputs, as SpecForge recommends)")
    parser.add_argument("--seq_len", type=int, default=2048, help="sequences are cut to this many tokens")
    parser.add_argument("--num_anchors", type=int, default=512)
    parser.add_argument("--gamma", type=float, default=None,
                        help="loss decay (default: the paper's for the block size)")
    parser.add_argument("--block_size", type=int, default=16, help="block size of a new draft")
    parser.add_argument("--mask_token_id", type=int, default=None,
                        help="mask id of a new draft (default: the tokenizer's mask token)")
    parser.add_argument("--target_layer_ids", default=None,
                        help="comma-separated feature layers of a new draft (default: z-lab's spacing)")
    parser.add_argument("--attention_backend", default="auto", choices=["auto", "torch", "flex", "triton"])
    parser.add_argument("--chunk_size", type=int, default=1024, help="rows per cross-entropy chunk")
    parser.add_argument("--target_dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--save_dtype", default="float32", choices=sorted(_DTYPES), help="dtype of saved checkpoints")


def _read_records(args, tokenizer) -> list[dict]:
    records = []
    with open(args.data) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "input_ids" in rec:
                ids = [int(i) for i in rec["input_ids"]]
            elif "text" in rec:
                if tokenizer is None:
                    raise ValueError(f"{args.data}:{line_no} has `text` but the target directory has no tokenizer.")
                ids = tokenizer(rec["text"])["input_ids"]
            else:
                raise ValueError(f"{args.data}:{line_no}: a record needs `input_ids` or `text`.")
            mask = rec.get("loss_mask")
            mask = [1] * len(ids) if mask is None else [int(m) for m in mask]
            if len(mask) != len(ids):
                raise ValueError(f"{args.data}:{line_no}: `loss_mask` and `input_ids` differ in length.")
            records.append({"input_ids": ids, "loss_mask": mask})
    if not records:
        raise ValueError(f"{args.data} holds no records.")
    return records


@torch.no_grad()
def _regenerate(target, records: list[dict], max_new_tokens: int, device) -> list[dict]:
    """Replace each prompt's continuation by the target's greedy one; supervise the continuation."""
    out = []
    for rec in records:
        prompt = torch.tensor([rec["input_ids"]], dtype=torch.int64, device=device)
        ids = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=0)[0].tolist()
        P = prompt.shape[1]
        out.append({"input_ids": ids, "loss_mask": [0] * P + [1] * (len(ids) - P)})
    return out


def _setup(args, accelerator) -> TrainingSetup:
    import transformers

    from ddiff.pipelines.dflash import has_tokenizer_files
    from ddiff.pipelines.dflash_model import DFlashDraftModel

    from ddiff.pipelines.loading import load_transformers_model, resolve_checkpoint_dir

    # Both checkpoints are checked (path, JSON, safetensors, config against weights) before the
    # target's weights are read; errors name the path, file or key at fault.
    resolve_checkpoint_dir(args.target, "--target")
    if args.draft is not None:
        resolve_checkpoint_dir(args.draft, "--draft")
    target = load_transformers_model(args.target, dtype=_DTYPES[args.target_dtype], what="--target")
    target.requires_grad_(False)
    target.to(accelerator.device)
    tokenizer = None
    if has_tokenizer_files(args.target):
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.target, local_files_only=True)
    if args.draft is not None:
        draft = DFlashDraftModel.from_pretrained(args.draft, dtype=torch.float32)
    else:
        mask_id = args.mask_token_id
        if mask_id is None:
            mask_id = getattr(tokenizer, "mask_token_id", None) if tokenizer is not None else None
        if mask_id is None:
            raise ValueError("a new draft needs --mask_token_id (the tokenizer has no mask token).")
        ids = None if args.target_layer_ids is None else [int(i) for i in args.target_layer_ids.split(",")]
        draft = DFlashDraftModel.from_target_config(target.config, args.new_draft_layers, block_size=args.block_size,
                                                    mask_token_id=mask_id, target_layer_ids=ids)
    draft.train()

    records = _read_records(args, tokenizer)
    if args.regenerate_max_new_tokens > 0:
        records = _regenerate(target, records, args.regenerate_max_new_tokens, accelerator.device)
    records = [{k: v[:args.seq_len] for k, v in rec.items()} for rec in records]
    data_gen = torch.Generator().manual_seed(args.seed * 1000 + accelerator.process_index + 7)
    anchor_gen = torch.Generator(device=accelerator.device)
    anchor_gen.manual_seed(args.seed * 1000 + accelerator.process_index + 1)

    def next_batch():
        pick = torch.randint(0, len(records), (args.batch_size,), generator=data_gen).tolist()
        S = max(len(records[i]["input_ids"]) for i in pick)
        ids = torch.zeros(args.batch_size, S, dtype=torch.int64)
        mask = torch.zeros(args.batch_size, S, dtype=torch.bool)
        attn = torch.zeros(args.batch_size, S, dtype=torch.int64)
        for row, i in enumerate(pick):
            n = len(records[i]["input_ids"])
            ids[row, :n] = torch.tensor(records[i]["input_ids"])
            mask[row, :n] = torch.tensor(records[i]["loss_mask"], dtype=torch.bool)
            attn[row, :n] = 1
        batch = {"input_ids": ids, "loss_mask": mask, "attention_mask": attn}
        return {k: v.to(accelerator.device) for k, v in batch.items()}

    def loss(model, batch):
        return dflash_loss(model, target, batch["input_ids"], batch["loss_mask"], num_anchors=args.num_anchors,
                           gamma=args.gamma, generator=anchor_gen, attention_mask=batch["attention_mask"],
                           attention_backend=args.attention_backend, chunk_size=args.chunk_size)

    def save(model, directory):
        model.save_pretrained(directory, dtype=_DTYPES[args.save_dtype])

    return TrainingSetup(model=draft, next_batch=next_batch, loss=loss, save=save, extra_modules=[target],
                         generators={"data": data_gen, "anchors": anchor_gen})


DFLASH = Recipe(
    "dflash",
    "DFlash block-diffusion draft for speculative decoding (anchor blocks on a frozen target's features)",
    _arguments, _setup,
    defaults={"learning_rate": 6e-4, "batch_size": 4, "warmup_steps": 20, "log_every": 50},
)
