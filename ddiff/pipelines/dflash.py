"""``DFlashPipeline``: lossless speculative decoding with a DFlash block-diffusion draft.

Each round (batch 1):

1. the block is ``[last committed token, mask x (bs - 1)]`` at positions ``start .. start+bs-1``;
   the draft (:class:`~ddiff.pipelines.dflash_model.DFlashDraftModel`) reads the target
   features of every committed position from its KV cache and proposes rows ``1 .. bs-1``
   (same-position prediction, greedy through the target's ``lm_head``);
2. the target verifies the block in one forward and chooses a token at every position with
   :func:`ddiff.sample` (``offset`` = the token's absolute position);
3. the longest prefix where draft == target's choice is accepted, plus the target's token after
   it (the bonus); both KV caches are cropped back to the committed positions and the draft
   cache receives the features of the newly committed ones.

A draft proposal that is not a valid id (the draft's logits held NaN / +inf or were all -inf,
so :func:`ddiff.sample` returned -1) counts as rejected: it is never fed to the target (the
pending token stands in for it) and acceptance stops before it, so a broken draft only slows
decoding. ``draft_tokens`` in the callback shows such proposals as -1.

Because the target's choice at position ``t`` is a pure function of (logits, seed, ``t``), the
output does not depend on what the draft proposed: greedy output equals the target's own greedy
decoding, and with a seed every ``block_size`` (``1`` = plain target sampling) gives the same
tokens. (Token for token in float64; in bf16 / fp16 the target's logits for a position verified
inside a block may differ in the last bits from a one-token forward, so near-ties can resolve
differently, as with any speculative decoder.) The loop runs while fewer than
``max_new_tokens`` tokens are committed (the final block is shortened to what is still needed)
and stops right after a stop token, even one accepted mid-block; the output is sliced by
length, never by token value.

Only targets whose every layer is full attention are supported: rolling a recurrent or
sliding-window cache back to the committed length is not possible with ``cache.crop``.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from ddiff import ops, sync_checks
from ddiff._backend import BACKENDS
from ddiff._checks import check_seed, logits_location
from ddiff.pipelines.dflash_model import DFlashDraftModel, check_draft_target, target_features
from ddiff.pipelines.utils import (
    DiscreteDiffusionPipelineOutput,
    ProgressBarMixin,
    check_token_ids,
    decode_sequences,
    execution_device,
    is_int,
    is_real,
    model_vocab_size,
    token_id_list,
)

Tensor = torch.Tensor

__all__ = ["DFlashPipeline", "DFlashPipelineOutput", "UnsupportedTargetError"]

OUTPUT_TYPES = ("text", "ids")


class UnsupportedTargetError(NotImplementedError, ValueError):
    """The target model cannot be used for speculative decoding (recurrent / sliding-window layers)."""


@dataclass
class DFlashPipelineOutput(DiscreteDiffusionPipelineOutput):
    """Output of :class:`DFlashPipeline`.

    Attributes:
        sequences: ``[1, n]`` int64, the generated tokens only: ``n == max_new_tokens`` unless a
            stop token was generated, in which case the output ends right after it.
        texts: the decoded ``sequences`` (special tokens skipped), or None.
        acceptance_lengths: tokens committed by each verification round (accepted drafts plus
            the target's bonus token; the prefill's first token is not part of any round), so
            ``1 + sum(acceptance_lengths) == n``.
        nfe_target, nfe_draft: target forwards (prefill included) and draft forwards.
        nfe: ``nfe_target + nfe_draft``; ``steps``: verification rounds; ``block_times``: seconds
            per round; ``finished``: ``[1]`` bool, True when a stop token ended the output.
    """

    acceptance_lengths: list = field(default_factory=list)
    nfe_target: int = 0
    nfe_draft: int = 0

    @property
    def mean_acceptance_length(self) -> float:
        """Mean tokens per verification round (``nan`` when no round ran)."""
        if not self.acceptance_lengths:
            return float("nan")
        return sum(self.acceptance_lengths) / len(self.acceptance_lengths)


def has_tokenizer_files(path) -> bool:
    """True when ``path`` holds a tokenizer (transformers 5 otherwise builds an empty one from the config)."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return any(os.path.exists(os.path.join(path, n)) for n in names)


def _crop(cache, length: int) -> None:
    """Drop cached positions past ``length`` (a negative count: ``crop(length)`` raises on transformers 5)."""
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


def _non_full_attention_layers(config) -> list[str]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None) or []
    return sorted({str(t) for t in types if t != "full_attention"})


class DFlashPipeline(ProgressBarMixin):
    r"""Speculative decoding of a causal LM with a DFlash draft; lossless by construction.

    Args:
        draft_model: a :class:`~ddiff.pipelines.dflash_model.DFlashDraftModel` built for this target.
        target_model: a transformers causal LM with full-attention layers only (e.g. Qwen3), on the
            draft's device. Its input embeddings and ``lm_head`` serve the draft too.
        tokenizer: optional; needed for ``prompt`` strings, the chat template and ``texts``.
        backend: ``"auto"`` | ``"torch"`` | ``"triton"``, passed to :func:`ddiff.sample`.

    Raises ``ValueError`` if the draft does not fit the target
    (:func:`~ddiff.pipelines.dflash_model.check_draft_target`) and
    :class:`UnsupportedTargetError` (a ``NotImplementedError`` and a ``ValueError``) for targets
    with linear-attention, recurrent or sliding-window layers.

    Example::

        >>> draft = DFlashDraftModel.from_pretrained("/models/Qwen3-8B-DFlash-b16", dtype=torch.bfloat16, device="cuda")
        >>> target = AutoModelForCausalLM.from_pretrained("/models/Qwen3-8B", dtype=torch.bfloat16).cuda().eval()
        >>> pipe = DFlashPipeline(draft, target, AutoTokenizer.from_pretrained("/models/Qwen3-8B"))
        >>> out = pipe("How many positive whole-number divisors does 196 have?", max_new_tokens=256,
        ...            use_chat_template=True)
        >>> out.texts[0], out.mean_acceptance_length
    """

    _callback_tensor_inputs = ("sequences", "draft_tokens", "target_tokens", "acceptance_length",
                               "target_cache", "draft_cache")

    def __init__(self, draft_model, target_model, tokenizer=None, *, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
        check_draft_target(draft_model, target_model)
        other = _non_full_attention_layers(target_model.config)
        if other:
            raise UnsupportedTargetError(
                f"the target has {other} layers; DFlash needs a target whose every layer is full attention, "
                "because rejected drafts are rolled back with cache.crop(), which cannot undo recurrent or "
                "sliding-window state."
            )
        if execution_device(draft_model) != execution_device(target_model):
            raise ValueError(f"the draft is on {execution_device(draft_model)} but the target is on "
                             f"{execution_device(target_model)}; move both to the same device.")
        self.draft_model = draft_model
        self.target_model = target_model
        self.tokenizer = tokenizer
        self.backend = backend
        try:
            params = set(inspect.signature(target_model.forward).parameters)
        except (TypeError, ValueError):
            params = set()
        # transformers >= 5.24 renamed `past_key_values` to `cache` (the old name still warns).
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params

    @classmethod
    def from_pretrained(cls, draft_path, target_path, *, dtype: Optional[torch.dtype] = None, device=None,
                        tokenizer=None, backend: str = "auto", torch_dtype: Optional[torch.dtype] = None
                        ) -> "DFlashPipeline":
        """Load a draft and its target from local directories (nothing is downloaded, no remote code).

        ``dtype`` (``torch_dtype`` is its deprecated name; default: the stored ones) and ``device``
        place both models. Both directories are checked (path, JSON, safetensors headers, config
        against weights) before the target's weights are read; errors name the path, file or key
        at fault (see :mod:`ddiff.pipelines.loading`)."""
        import transformers

        from ddiff.pipelines.loading import load_transformers_model, resolve_checkpoint_dir, resolve_dtype

        dtype = resolve_dtype(dtype, torch_dtype, caller="DFlashPipeline.from_pretrained")
        draft_path = resolve_checkpoint_dir(draft_path, "DFlash draft (`draft_path`)")
        target_path = resolve_checkpoint_dir(target_path, "DFlash target (`target_path`)")
        draft = DFlashDraftModel.from_pretrained(draft_path, dtype=dtype, device=device)  # small: fails first
        target = load_transformers_model(target_path, dtype=dtype, device=device,
                                         what="DFlash target (`target_path`)")
        if draft.device != execution_device(target):
            draft = draft.to(execution_device(target))
        if tokenizer is None and has_tokenizer_files(target_path):
            tokenizer = transformers.AutoTokenizer.from_pretrained(target_path, local_files_only=True)
        return cls(draft, target, tokenizer, backend=backend)

    @property
    def _execution_device(self) -> torch.device:
        return execution_device(self.target_model)

    # ------------------------------------------------------------------------------------------
    # diffusers-style stages
    # ------------------------------------------------------------------------------------------
    def check_inputs(self, prompt, input_ids, max_new_tokens, temperature, top_k, top_p, seed, block_size,
                     stop_token_ids, use_chat_template, enable_thinking, output_type, callback_on_step_end,
                     progress) -> None:
        if (prompt is None) == (input_ids is None):
            raise ValueError("pass exactly one of `prompt` and `input_ids`.")
        if prompt is not None:
            if self.tokenizer is None:
                raise ValueError("`prompt` needs a tokenizer; pass `input_ids` or give the pipeline a tokenizer.")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, (list, tuple)) or len(prompts) != 1 or not isinstance(prompts[0], str):
                raise ValueError("`prompt` must be one string (DFlash decodes a batch of one).")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor):
                raise TypeError(f"`input_ids` must be a torch.Tensor, got {type(input_ids).__name__}.")
            if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.dim() not in (1, 2):
                raise ValueError(f"`input_ids` must be an integer [P] or [1, P] tensor, got {input_ids.dtype} "
                                 f"{tuple(input_ids.shape)}.")
            if input_ids.dim() == 2 and input_ids.shape[0] != 1:
                raise ValueError(f"DFlash decodes a batch of one; `input_ids` has {input_ids.shape[0]} rows.")
            if input_ids.shape[-1] < 1:
                raise ValueError("`input_ids` must hold at least one token.")
        if not is_int(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be an int >= 1, got {max_new_tokens!r}.")
        if not is_real(temperature) or not temperature >= 0:
            raise ValueError(f"`temperature` must be a number >= 0, got {temperature!r}.")
        if top_k is not None and (not is_int(top_k) or top_k < 0):
            raise ValueError(f"`top_k` must be None or an int >= 0, got {top_k!r}.")
        if top_p is not None and (not is_real(top_p) or not 0 < top_p <= 1):
            raise ValueError(f"`top_p` must be None or a number in (0, 1], got {top_p!r}.")
        if seed is not None:
            check_seed("seed", seed)  # any integer type in [-2**63, 2**64), as every op
        if block_size is not None and (not is_int(block_size) or block_size < 1):
            raise ValueError(f"`block_size` must be None or an int >= 1, got {block_size!r}.")
        token_id_list(stop_token_ids, "stop_token_ids")
        for name, flag in (("use_chat_template", use_chat_template), ("enable_thinking", enable_thinking),
                           ("progress", progress)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be a bool, got {type(flag).__name__}.")
        if use_chat_template and prompt is None:
            raise ValueError("`use_chat_template` applies to `prompt` strings, not to `input_ids`.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError("`callback_on_step_end` must be callable.")

    def encode_prompt(self, prompt, input_ids, use_chat_template: bool, enable_thinking: bool, device) -> Tensor:
        """``[1, P]`` int64 prompt ids; with ``use_chat_template`` a one-turn user message with the
        generation prompt, ``enable_thinking`` passed to the template."""
        if input_ids is not None:
            return input_ids.reshape(1, -1).to(device=device, dtype=torch.int64)
        text = prompt if isinstance(prompt, str) else prompt[0]
        tok = self.tokenizer
        if use_chat_template:
            if getattr(tok, "chat_template", None) is None:
                raise ValueError("`use_chat_template=True` but the tokenizer has no chat template.")
            text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False, enable_thinking=enable_thinking)
        ids = tok(text, return_tensors="pt", add_special_tokens=not use_chat_template)["input_ids"]
        if ids.shape[-1] < 1:
            raise ValueError("the prompt encodes to no tokens.")
        return ids.reshape(1, -1).to(device=device, dtype=torch.int64)

    def _stop_ids(self, stop_token_ids) -> list[int]:
        if stop_token_ids is not None:
            return token_id_list(stop_token_ids, "stop_token_ids")
        config = getattr(self.target_model, "generation_config", None)
        ids = token_id_list(getattr(config, "eos_token_id", None), "eos_token_id")
        if not ids and self.tokenizer is not None:
            ids = token_id_list(getattr(self.tokenizer, "eos_token_id", None), "eos_token_id")
        return ids

    def _context_length(self) -> Optional[int]:
        config = self.target_model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        value = getattr(text, "max_position_embeddings", None)
        return value if is_int(value) else None

    def _new_cache(self, config=None):
        from transformers import DynamicCache

        if config is not None:
            try:
                cache = DynamicCache(config=config)
            except (TypeError, AttributeError):
                cache = DynamicCache()
        else:
            cache = DynamicCache()
        # Only plain full-attention layers can be rolled back exactly by crop().
        layers = getattr(cache, "layers", [])
        odd = sorted({type(layer).__name__ for layer in layers if type(layer).__name__ != "DynamicLayer"})
        if odd:
            raise UnsupportedTargetError(f"the target's cache has {odd} layers, which crop() cannot roll back.")
        return cache

    # ------------------------------------------------------------------------------------------
    # model calls
    # ------------------------------------------------------------------------------------------
    def _target(self, ids: Tensor, start: int, cache, hidden: bool, last_only: bool = False):
        kwargs = {"input_ids": ids, "position_ids": torch.arange(start, start + ids.shape[1], device=ids.device)[None],
                  self._cache_kwarg: cache, "use_cache": True, "output_hidden_states": hidden}
        if last_only and self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.target_model(**kwargs)
        logits = out.logits[0, -1:] if last_only else out.logits[0]
        feats = target_features(out.hidden_states, self.draft_model.target_layer_ids) if hidden else None
        return logits, feats

    def _verify(self, logits: Tensor, drafts: Tensor, first_position: int, temperature, top_k, top_p,
                seed: int) -> tuple[list[int], Tensor]:
        """The target's tokens for the block, up to and including its first disagreement with ``drafts``.

        ``logits`` ``[L, V]`` predict positions ``first_position ...``; ``drafts`` ``[L - 1]`` are the
        proposals for the first ``L - 1`` of them. Returns the tokens as a host list and a device
        tensor. Each position draws on its own with ``offset`` = its absolute position (row 0 of a
        one-row call), so a token never depends on how positions were grouped into blocks; with
        ``temperature > 0`` positions are drawn one by one and the draws stop at the first
        disagreement (the later ones would be discarded).
        """
        if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            logits = logits.float()
        length = logits.shape[0]
        if temperature == 0:  # argmax: no noise, one call and one device-to-host copy
            chosen = ops.sample(logits, temperature=0.0, seed=0, offset=first_position, backend=self.backend)
            host = torch.cat([drafts, chosen]).tolist()
            proposed, verified = host[:length - 1], host[length - 1:]
            n = 1
            while n < length and proposed[n - 1] == verified[n - 1]:
                n += 1
            return verified[:n], chosen[:n]
        proposed = drafts.tolist()
        tokens, host = [], []
        for i in range(length):
            token = ops.sample(logits[i:i + 1], temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               offset=first_position + i, backend=self.backend)
            tokens.append(token)
            host.append(int(token.item()))
            if i == length - 1 or host[-1] != proposed[i]:
                break
        return host, torch.cat(tokens)

    def _propose(self, pending: Tensor, start: int, length: int, cache) -> Tensor:
        """Greedy draft tokens ``[length - 1]`` for positions ``start + 1 ...`` (the cache is left as it was).

        An invalid proposal (the draft's logits row held NaN / +inf or was all -inf, so
        :func:`ddiff.sample` gave -1, or an id the target does not embed) comes back as -1: a
        rejected proposal, never equal to the target's choice and never fed to the target."""
        draft, target = self.draft_model, self.target_model
        block = torch.full((1, length), draft.mask_token_id, dtype=torch.int64, device=pending.device)
        block[0, 0] = pending
        noise = target.get_input_embeddings()(block)
        positions = torch.arange(start, start + length, device=pending.device)[None]
        hidden = draft(noise_embedding=noise, position_ids=positions, past_key_values=cache)
        _crop(cache, start)
        head = target.get_output_embeddings()
        logits = head(hidden[0, 1:].to(head.weight.dtype))
        if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            logits = logits.float()
        tokens = ops.sample(logits, temperature=0.0, seed=0, offset=start + 1, backend=self.backend)
        vocab = model_vocab_size(target)
        bad = tokens < 0 if vocab is None else (tokens < 0) | (tokens >= vocab)
        return torch.where(bad, torch.full_like(tokens, -1), tokens)

    # ------------------------------------------------------------------------------------------
    # call
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, Sequence[str], None] = None,
        input_ids: Optional[torch.LongTensor] = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        block_size: Optional[int] = None,
        stop_token_ids: Union[int, Sequence[int], None] = None,
        use_chat_template: bool = False,
        enable_thinking: bool = False,
        output_type: str = "text",
        callback_on_step_end: Optional[Callable] = None,
        progress: bool = True,
    ) -> DFlashPipelineOutput:
        r"""Generate up to ``max_new_tokens`` tokens after one prompt.

        Args:
            prompt: one string, or
            input_ids: ``[P]`` / ``[1, P]`` token ids (P >= 1).
            max_new_tokens: exactly this many tokens come back unless a stop token is generated.
            temperature, top_k, top_p: the target's sampling (:func:`ddiff.sample`); 0 is greedy
                (argmax, first maximum: what ``generate(do_sample=False)`` does).
            seed: with ``temperature > 0``, the token at absolute position ``t`` is drawn with
                ``ddiff.sample(..., seed=seed, offset=t)``, so the output is the same for every
                ``block_size``. Without a seed one is drawn from torch's default generator
                (``torch.manual_seed`` makes runs repeat). Any integer type in
                ``[-2**63, 2**64)`` (the ops' seed rule; else ValueError).
            block_size: tokens per verification block (default: the draft's; 1 runs the target
                alone, token by token).
            stop_token_ids: stop after any of these ids (default: the target's
                ``generation_config.eos_token_id``, else the tokenizer's EOS; ``[]`` for none).
            use_chat_template: wrap ``prompt`` in the tokenizer's chat template (one user turn,
                generation prompt added), with
            enable_thinking: passed to the template (the b16 Qwen3 drafts were trained without
                thinking).
            output_type: ``"text"`` (also decode) or ``"ids"``.
            callback_on_step_end: ``fn(pipe, round, num_committed, callback_kwargs)`` after each
                round; ``callback_kwargs`` holds ``sequences`` (``[1, n]`` committed so far),
                ``draft_tokens`` (``[1, L - 1]``), ``target_tokens`` (the target's tokens
                up to its first disagreement with the draft, stop cut not applied),
                ``acceptance_length`` (int) and the two caches ``target_cache`` / ``draft_cache``
                (both hold exactly the committed positions whose features exist: everything but the
                last token). Committed tokens cannot be replaced (both caches would go stale): the
                callback may return None or the dict it got, not new values.
            progress: a tqdm bar over generated tokens (see ``set_progress_bar_config``).

        Returns:
            :class:`DFlashPipelineOutput`.
        """
        self.check_inputs(prompt, input_ids, max_new_tokens, temperature, top_k, top_p, seed, block_size,
                          stop_token_ids, use_chat_template, enable_thinking, output_type, callback_on_step_end,
                          progress)
        device = self._execution_device
        bs = self.draft_model.block_size if block_size is None else block_size
        stop_ids = set(self._stop_ids(stop_token_ids))
        if seed is not None:
            seed = check_seed("seed", seed)
        elif temperature > 0:
            seed = int(torch.randint(0, 2**63 - 1, (1,)).item())
        prompt_ids = self.encode_prompt(prompt, input_ids, use_chat_template, enable_thinking, device)
        check_token_ids("input_ids" if input_ids is not None else "prompt", prompt_ids,
                        model_vocab_size(self.target_model))
        P = prompt_ids.shape[1]
        context = self._context_length()
        if context is not None and P + max_new_tokens > context:
            raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds the target's context of "
                             f"{context} positions.")
        target_cache = self._new_cache(self.target_model.config)
        draft_cache = self._new_cache()
        use_draft = bs > 1 and max_new_tokens > 1
        sample_kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)

        generated: list[int] = []
        acceptance: list[int] = []
        block_times: list[float] = []
        nfe_target = nfe_draft = 0
        finished = False
        overrides = {} if progress else {"disable": True}
        bar = self.progress_bar(total=max_new_tokens, defaults={"desc": "tokens"}, **overrides)
        # The sampling ops' value checks would each wait for the device; invalid rows come back as
        # -1 instead and are caught on the host copy each round already makes.
        with sync_checks(False):
            try:
                # 1. prefill: the first token, and the prompt's features in the draft cache
                logits, feats = self._target(prompt_ids, 0, target_cache, hidden=use_draft, last_only=True)
                nfe_target += 1
                (first,), pending = self._verify(logits, logits.new_empty(0, dtype=torch.int64), P, **sample_kwargs)
                self._check_token(first, P)
                generated.append(first)
                bar.update(1)
                finished = first in stop_ids
                if use_draft:
                    self.draft_model.extend_cache(feats, torch.arange(P, device=device)[None], draft_cache)

                # 2. rounds: draft a block, verify it, commit the accepted prefix and the bonus token
                step = 0
                while not finished and len(generated) < max_new_tokens:
                    started = time.perf_counter()
                    start = P + len(generated) - 1  # position of the pending (committed, unverified) token
                    length = min(bs, max_new_tokens - len(generated))
                    if length > 1:
                        drafts = self._propose(pending, start, length, draft_cache)
                        nfe_draft += 1
                        # a rejected (-1) proposal is never fed to the target: the pending token stands in
                        # for it, and only positions before the first rejection can be accepted
                        block = torch.cat([pending, torch.where(drafts < 0, pending, drafts)])
                    else:
                        drafts = pending.new_empty(0)
                        block = pending
                    logits, feats = self._target(block[None], start, target_cache, hidden=use_draft)
                    nfe_target += 1
                    new, chosen = self._verify(logits, drafts, start + 1, **sample_kwargs)
                    for i, token in enumerate(new):
                        self._check_token(token, start + 1 + i)
                    for i, token in enumerate(new):
                        if token in stop_ids:
                            new, finished = new[:i + 1], True
                            break
                    generated.extend(new)
                    acceptance.append(len(new))
                    # Roll back to the committed positions start .. start + len(new) - 1 (the pending
                    # token and the accepted drafts); the last new token enters the caches next round.
                    kept = len(new)
                    _crop(target_cache, start + kept)
                    if use_draft:
                        positions = torch.arange(start, start + kept, device=device)[None]
                        self.draft_model.extend_cache(feats[:, :kept], positions, draft_cache)
                    pending = chosen[kept - 1:kept]  # the bonus token, or the stop token
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    block_times.append(time.perf_counter() - started)
                    bar.update(len(new))
                    if callback_on_step_end is not None:
                        self._run_callback(callback_on_step_end, step, len(generated), {
                            "sequences": torch.tensor([generated], dtype=torch.int64, device=device),
                            "draft_tokens": drafts[None], "target_tokens": chosen[None],
                            "acceptance_length": len(new), "target_cache": target_cache, "draft_cache": draft_cache,
                        })
                    step += 1
            finally:
                bar.close()

        sequences = torch.tensor([generated], dtype=torch.int64, device=device)
        texts = decode_sequences(self.tokenizer, sequences) if output_type == "text" else None
        return DFlashPipelineOutput(
            sequences=sequences, texts=texts, nfe=nfe_target + nfe_draft, steps=len(acceptance),
            block_times=block_times, finished=torch.tensor([finished], device=device),
            acceptance_lengths=acceptance, nfe_target=nfe_target, nfe_draft=nfe_draft,
        )

    @staticmethod
    def _check_token(token: int, position: int) -> None:
        """``position``: the token's absolute position (prompt included) in the one-row batch."""
        if token < 0:
            raise ValueError(f"the target's logits predicting the token {logits_location(position, (1, position + 1))} "
                             "of the sequence (prompt included) held NaN or +inf (or were all -inf).")

    def _run_callback(self, callback, step: int, committed: int, tensors: dict) -> None:
        out = callback(self, step, committed, dict(tensors))
        if out is None:
            return
        if not isinstance(out, dict):
            raise TypeError(f"`callback_on_step_end` must return a dict or None, got {type(out).__name__}.")
        changed = sorted(k for k, v in out.items() if k not in tensors or v is not tensors[k])
        if changed:
            raise ValueError(f"`callback_on_step_end` returned new values for {changed}; DFlash cannot replace "
                             "committed tokens or caches (both KV caches would no longer match the output).")
