r"""Block refinement of a causal LM with a CAP-style confidence loss (diffusers' ``train_block_refinement_qwen_cap.py``).

A causal LM learns to fill masked positions of a block from what precedes them, so that
:class:`~ddiff.pipelines.BlockDiffusionPipeline` with ``attention="causal"`` can decode it block by
block, committing its most confident predictions first. The training step, as in the diffusers
example:

* **Corruption** (:func:`block_refinement_masks`): the first ``prompt_length`` tokens stay clean;
  every later block of ``block_length`` tokens draws one ratio ``p ~ U(0, 1)`` per sequence and
  masks each of its (non-padding) tokens with probability ``p``. The **complementary** mask (the
  block's other tokens) gives a second sample, so every generated token is supervised once per
  step.
* **Model**: the unmodified causal LM on the masked sequence, no shift: the logits at position
  ``i`` predict token ``i`` (its input is the mask token), seeing positions ``<= i``. The mask
  id's logit is set to the dtype's minimum (never predicted).
* **Loss** (:func:`confidence_aware_loss`, diffusers' ``compute_confidence_aware_loss``):
  ``L_sft + λ_conf · L_conf`` for each of the two samples, summed. ``L_sft`` is the mean
  cross-entropy over the masked tokens; ``L_conf`` is the mean entropy of
  ``softmax(logits / conf_temperature)`` over the masked tokens whose argmax is already right
  (a confidence-sharpening term: Confidence-Aware Parallel decoding, "CAP"). Lower
  ``conf_temperature`` sharpens the distribution the entropy is measured on.

Differences from the example, on purpose: none in the loss. The data is ddiff's synthetic
languages by default (the tests need checkable outputs); ``--data`` / ``--tokenizer`` / ``--model``
train on your text and causal LM (:mod:`ddiff.training.data`), padding excluded with ``--no-packing``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ddiff.denoiser import logits_of
from ddiff.training.data import add_data_arguments, build_model, prepare_data
from ddiff.training.loop import Recipe, TrainingSetup

Tensor = torch.Tensor

__all__ = ["BLOCK_REFINEMENT", "BlockRefinementLossOutput", "causal_lm", "block_refinement_loss", "block_refinement_masks", "confidence_aware_loss"]


def block_refinement_masks(x0: Tensor, *, prompt_length: int, block_length: int, valid: Optional[Tensor] = None,
                           generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """The two complementary corruption masks ``(masked, masked_rev)``, bool ``[B, L]``.

    After the first ``prompt_length`` columns, each block of ``block_length`` columns draws one
    ratio ``p ~ U(0, 1)`` per row and masks each valid token with probability ``p``;
    ``masked_rev`` masks the block's other valid tokens. The prompt is never masked.
    """
    batch, seq_len = x0.shape
    device = x0.device
    valid = torch.ones_like(x0, dtype=torch.bool) if valid is None else valid.to(torch.bool)
    masked = torch.zeros_like(valid)
    masked_rev = torch.zeros_like(valid)
    for start in range(prompt_length, seq_len, block_length):
        end = min(seq_len, start + block_length)
        ratio = torch.rand((batch, 1), generator=generator, device=device)
        seg = (torch.rand((batch, end - start), generator=generator, device=device) < ratio) & valid[:, start:end]
        masked[:, start:end] = seg
        masked_rev[:, start:end] = ~seg & valid[:, start:end]
    return masked, masked_rev


def confidence_aware_loss(logits: Tensor, labels: Tensor, weights: Tensor, *, lambda_conf: float = 0.0,
                          conf_temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, loss_sft, loss_conf)`` with ``loss = loss_sft + lambda_conf · loss_conf``.

    ``loss_sft``: cross-entropy weighted by ``weights`` (``[B, L]``; 0 excludes a token),
    divided by ``max(1, Σ weights)``. ``loss_conf``: the entropy of
    ``softmax(logits / conf_temperature)`` on the tokens whose argmax equals the label,
    weighted the same way and divided by ``max(1, Σ weights over those tokens)``.
    """
    if not conf_temperature > 0:
        raise ValueError(f"`conf_temperature` must be > 0, got {conf_temperature}.")
    vocab = logits.shape[-1]
    weights = weights.to(logits.dtype)
    nll = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), reduction="none").view_as(weights)
    loss_sft = (nll * weights).sum() / weights.sum().clamp_min(1)
    if lambda_conf == 0.0:
        zero = torch.zeros((), device=logits.device, dtype=loss_sft.dtype)
        return loss_sft, loss_sft, zero
    with torch.no_grad():
        correct = (logits.argmax(-1) == labels) & (weights != 0)
    scaled = logits.float() / conf_temperature
    probs = torch.softmax(scaled, dim=-1)
    log_probs = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
    entropy = -(probs * log_probs).sum(-1).to(logits.dtype)
    conf_weights = weights * correct.to(weights.dtype)
    loss_conf = (entropy * conf_weights).sum() / conf_weights.sum().clamp_min(1)
    return loss_sft + lambda_conf * loss_conf, loss_sft, loss_conf


@dataclass
class BlockRefinementLossOutput:
    """``loss`` (the sum over the two complementary samples), its parts, and the masks."""

    loss: Tensor
    loss_sft: Tensor
    loss_conf: Tensor
    masked: Tensor
    masked_rev: Tensor


def block_refinement_loss(model, x0: Tensor, *, mask_token_id: int, prompt_length: int, block_length: int,
                          lambda_conf: float = 2.0, conf_temperature: float = 0.5,
                          attention_mask: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                          return_output: bool = False):
    """The block-refinement training loss of a causal LM (module docstring).

    Args:
        model: a causal LM, ``model(input_ids=, attention_mask=, position_ids=)`` -> logits (or ``.logits``).
        x0: int64 ``[B, L]`` clean tokens.
        mask_token_id: the mask id (its logit is set to the dtype's minimum).
        prompt_length, block_length: the clean prefix and the corrupted blocks after it.
        lambda_conf, conf_temperature: weight of the confidence term and its temperature.
        attention_mask: ``[B, L]`` 0/1 padding mask (default all ones); padding is never masked.
        generator: for the corruption.
        return_output: return a :class:`BlockRefinementLossOutput` instead of the scalar.

    Example::

        >>> loss = block_refinement_loss(model, x0, mask_token_id=10, prompt_length=4, block_length=4)
    """
    if prompt_length < 0 or block_length < 1:
        raise ValueError(f"need prompt_length >= 0 and block_length >= 1, got {prompt_length}, {block_length}.")
    if prompt_length >= x0.shape[1]:
        raise ValueError(f"`prompt_length` ({prompt_length}) must be smaller than the sequence ({x0.shape[1]}).")
    valid = torch.ones_like(x0, dtype=torch.bool) if attention_mask is None else attention_mask.to(torch.bool)
    attn = valid.to(torch.long)
    masked, masked_rev = block_refinement_masks(x0, prompt_length=prompt_length, block_length=block_length,
                                                valid=valid, generator=generator)
    positions = torch.arange(x0.shape[1], device=x0.device)[None].expand_as(x0)
    total, sft, conf = 0.0, 0.0, 0.0
    for mask in (masked, masked_rev):
        noisy = torch.where(mask, torch.full_like(x0, mask_token_id), x0)
        logits = logits_of(model(input_ids=noisy, attention_mask=attn, position_ids=positions))
        logits = logits.index_fill(-1, torch.tensor([mask_token_id], device=x0.device), torch.finfo(logits.dtype).min)
        loss, loss_sft, loss_conf = confidence_aware_loss(logits, x0, mask & valid, lambda_conf=lambda_conf,
                                                          conf_temperature=conf_temperature)
        total, sft, conf = total + loss, sft + loss_sft, conf + loss_conf
    if return_output:
        return BlockRefinementLossOutput(loss=total, loss_sft=sft, loss_conf=conf, masked=masked, masked_rev=masked_rev)
    return total


# ---------------------------------------------------------------------------------------------
# ``python -m ddiff.train block_refinement``
# ---------------------------------------------------------------------------------------------


def causal_lm(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
              intermediate_size: Optional[int] = None, max_positions: int = 512):
    """A small ordinary causal ``LlamaForCausalLM`` (no ``ddiff_attention``: it stays causal)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=intermediate_size or 3 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def _arguments(parser) -> None:
    parser.add_argument("--language", default="sorted_digits", choices=["sorted_digits", "brackets"],
                        help="synthetic training language")
    parser.add_argument("--seq_len", "--max_length", dest="seq_len", type=int, default=16,
                        help="tokens per training row (synthetic sentences, or --data rows)")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--intermediate_size", type=int, default=None, help="default: 3 * hidden_size")
    parser.add_argument("--prompt_length", type=int, default=4, help="clean prefix that is never masked")
    parser.add_argument("--block_length", type=int, default=4, help="tokens per refined block")
    parser.add_argument("--lambda_conf", type=float, default=2.0, help="weight of the confidence (entropy) term")
    parser.add_argument("--conf_temperature", type=float, default=0.5,
                        help="temperature of the confidence term only")
    add_data_arguments(parser)


def _setup(args, accelerator) -> TrainingSetup:
    from ddiff.pipelines.block_diffusion_scheduler import BlockDiffusionScheduler

    if not 0 <= args.prompt_length < args.seq_len:
        raise ValueError(f"--prompt_length must lie in [0, seq_len={args.seq_len}), got {args.prompt_length}.")
    if args.block_length < 1:
        raise ValueError(f"--block_length must be >= 1, got {args.block_length}.")
    data = prepare_data(args, accelerator, padding_mask=True)
    vocab_size, mask_id = data.vocab_size, data.mask_token_id
    model = build_model(args, data, lambda: causal_lm(
        vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
        intermediate_size=args.intermediate_size, max_positions=max(64, 2 * args.seq_len)), attention="causal")
    tokenizer = data.tokenizer
    # How the checkpoint decodes: BlockDiffusionPipeline(attention="causal") commits the most
    # confident predictions of each block first.
    scheduler = BlockDiffusionScheduler(remasking="low_confidence", mask_token_id=mask_id)
    gen = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index + 1)

    def loss(m, batch, generator=gen):
        # a batch is the ids, or (ids, valid) for padded --no-packing rows (padding is never masked or attended)
        x0, valid = batch if isinstance(batch, tuple) else (batch, None)
        out = block_refinement_loss(m, x0, mask_token_id=mask_id, prompt_length=args.prompt_length,
                                    block_length=args.block_length, lambda_conf=args.lambda_conf,
                                    conf_temperature=args.conf_temperature, attention_mask=valid,
                                    generator=generator, return_output=True)
        return out.loss, {"sft": float(out.loss_sft.detach()), "conf": float(out.loss_conf.detach())}

    def save(m, directory):
        m.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        scheduler.save_config(directory)

    return TrainingSetup(model=model, next_batch=data.next_batch, loss=loss, save=save,
                         eval_batches=data.eval_batches, eval_loss=lambda m, batch: loss(m, batch, generator=None),
                         generators={"noise": gen})


BLOCK_REFINEMENT = Recipe("block_refinement", "block refinement of a causal LM with the CAP confidence loss "
                          "(diffusers' train_block_refinement_qwen_cap.py)", _arguments, _setup)
