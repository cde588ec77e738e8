"""BlockDiffusionPipeline: prompt-conditioned decoding by confidence remasking, block by block.

One loop covers the decoders of LLaDA (``generate``: semi-autoregressive blocks, whole-sequence
forward, ``low_confidence`` / ``random`` remasking, unsupervised CFG), Dream (``maskgit_plus``,
``topk_margin``, ``entropy``, logits shifted by one), Fast-dLLM (threshold and factor parallel
decoding), SDAR (block-causal, ``low_confidence_static`` / ``_dynamic``), LLaDA2 (threshold,
``editing_threshold``, ``max_post_steps``) and block refinement of ordinary causal LMs.

The pipeline holds no sampling or selection logic: every step is

1. one model forward (the shapes and attention mask depend on ``attention``),
2. :func:`ddiff.predict_tokens` on the current block's logits (token and confidence),
3. :func:`ddiff.select_transfer` (which masked positions to commit; LLaDA's schedule comes
   from :func:`ddiff.num_transfer_tokens`) and, with ``editing_threshold``,
   :func:`ddiff.select_edits` (which decoded tokens to re-write).

Attention kinds
---------------
* ``"bidirectional"``: every step runs the whole sequence (prompt + all ``max_new_tokens``
  positions, future blocks still masked). Blocks start at the end of the prompt (LLaDA).
* ``"block_causal"``: a position attends to its own block and every earlier block. Blocks
  are aligned to absolute positions (SDAR, LLaDA2, BD3LM): the first block may hold the tail
  of the prompt. Committed blocks live in a transformers ``DynamicCache``; each step runs only
  the uncommitted columns against it and the cache is cropped back afterwards, so a block
  enters the cache only with its final tokens (in the first forward of the next block: no
  extra forward per block). With ``use_kv_cache=False`` the committed prefix is recomputed
  every step instead (same tokens).
* ``"causal"``: block refinement of an ordinary causal LM: the same loop with a causal mask.

Batches of prompts with different lengths are left-padded; padding is masked out of attention
and position ids count from each row's first real token. With ``"bidirectional"`` every row
decodes exactly as it would alone. With ``"block_causal"`` / ``"causal"`` blocks are aligned to
the columns of the padded batch, so a padded row's block boundaries move by its padding (its
tokens can differ from a solo run unless the model was trained with varying block alignment).

Host synchronisation: with LLaDA's fixed schedule the loop itself never waits on the device
within a block; threshold / factor / editing rules check once per step whether the block still
has masks; EOS early stop and block timing synchronise once per block.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from ddiff import ops
from ddiff._params import sync_checks
from ddiff.pipelines.presets import BlockDiffusionPreset, get_preset
from ddiff.pipelines.utils import (
    DiscreteDiffusionPipelineOutput,
    ProgressBarMixin,
    check_left_padded,
    decode_sequences,
    encode_prompts,
    execution_device,
    is_int,
    is_real,
    model_dtype,
    run_callback,
    token_id_list,
)

__all__ = ["BlockDiffusionPipeline", "BlockDiffusionPipelineOutput"]

ATTENTION_KINDS = ("bidirectional", "block_causal", "causal")
MASK_FORMATS = ("4d", "4d_bool", "2d")
REMASKING = {"low_confidence": "prob", "random": "random", "margin": "margin", "entropy": "neg_entropy"}
CONFIDENCE_FROM = ("raw", "sampling")
OUTPUT_TYPES = ("text", "ids")
BACKENDS = ("auto", "torch", "triton")


@dataclass
class BlockDiffusionPipelineOutput(DiscreteDiffusionPipelineOutput):
    """Output of :class:`BlockDiffusionPipeline` (see ``DiscreteDiffusionPipelineOutput``).

    ``block_steps`` lists the denoising steps each decoded block took.
    """

    block_steps: Optional[list[int]] = None


@dataclass
class _Block:
    attn_start: int  # first column of the block in the attention pattern (may be prompt)
    start: int  # first generated column of the block
    end: int  # one past the last column


class _Context:
    """Per-call decoding state shared by the forward helper."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def _crop_cache(cache, length: int) -> None:
    """Drop cached positions past ``length`` (negative ``crop`` works on old and new transformers)."""
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


class BlockDiffusionPipeline(ProgressBarMixin):
    r"""Block-wise confidence-remasking decoder for discrete diffusion LMs.

    Args:
        model: a transformers-style model: ``model(input_ids=..., attention_mask=...,
            position_ids=..., past_key_values=..., use_cache=...)`` returning ``.logits``.
            Arguments its ``forward`` does not declare are not passed.
        tokenizer: optional; needed for ``prompt`` strings and ``texts``.
        mask_token_id: the mask id; defaults to ``tokenizer.mask_token_id``.
        attention: ``"bidirectional"``, ``"block_causal"`` or ``"causal"`` (module docstring).
        backend: ``"auto"`` | ``"torch"`` | ``"triton"``, passed to every ddiff op.
        eos_token_id: EOS id(s) used when ``__call__`` gets none (default: the tokenizer's).
        logits_shift: the model predicts position i from the output at i - 1 (Dream); when
            True, ``__call__`` always shifts.
        attention_mask_format: what the model receives: ``"4d"`` an additive float
            ``[B, 1, Q, K]`` mask in the model dtype (transformers models: this is how a
            causal checkpoint is made bidirectional or block-causal), ``"4d_bool"`` the same as
            bool (True = attend), ``"2d"`` only the ``[B, K]`` padding mask, for models whose own
            attention already has the wanted pattern (LLaDA; causal LMs).
        use_kv_cache: for ``"block_causal"`` / ``"causal"``: keep committed blocks in a
            ``DynamicCache`` (True) or recompute them every step (False).

    Example::

        >>> pipe = BlockDiffusionPipeline.from_pretrained("/models/LLaDA-8B-Instruct", preset="llada",
        ...                                                dtype=torch.bfloat16, device="cuda")
        >>> out = pipe("What is 7 * 6?", max_new_tokens=128, block_length=32, steps_per_block=32,
        ...            use_chat_template=True)
        >>> out.texts[0], out.nfe
    """

    _callback_tensor_inputs = ("x", "tokens", "confidence", "transfer_index", "edit_index", "block_start", "block_end")

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        mask_token_id: Optional[int] = None,
        attention: str = "bidirectional",
        backend: str = "auto",
        eos_token_id: Union[int, Sequence[int], None] = None,
        logits_shift: bool = False,
        attention_mask_format: str = "4d",
        use_kv_cache: bool = True,
    ):
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"`attention` must be one of {ATTENTION_KINDS}, got {attention!r}.")
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
        if attention_mask_format not in MASK_FORMATS:
            raise ValueError(f"`attention_mask_format` must be one of {MASK_FORMATS}, got {attention_mask_format!r}.")
        if attention_mask_format == "2d" and attention == "block_causal":
            raise ValueError("a 2-D padding mask cannot express block-causal attention; use '4d' or '4d_bool'.")
        if not isinstance(logits_shift, bool):
            raise TypeError(f"`logits_shift` must be a bool, got {type(logits_shift).__name__}.")
        if not isinstance(use_kv_cache, bool):
            raise TypeError(f"`use_kv_cache` must be a bool, got {type(use_kv_cache).__name__}.")
        if mask_token_id is None and tokenizer is not None:
            mask_token_id = getattr(tokenizer, "mask_token_id", None)
        if mask_token_id is None:
            raise ValueError(
                "no mask token: the tokenizer has none (or there is no tokenizer) and `mask_token_id` was not given. "
                "Pass `mask_token_id=...` or use a preset (BlockDiffusionPipeline.preset(...))."
            )
        if not is_int(mask_token_id):
            raise TypeError(f"`mask_token_id` must be an int, got {type(mask_token_id).__name__}.")
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if is_int(vocab) and not 0 <= mask_token_id < vocab:
            raise ValueError(f"`mask_token_id` {mask_token_id} is outside the model's vocabulary of {vocab}.")

        self.model = model
        self.tokenizer = tokenizer
        self.mask_token_id = mask_token_id
        self.attention = attention
        self.backend = backend
        self.eos_token_ids = token_id_list(eos_token_id, "eos_token_id")
        self.logits_shift = logits_shift
        self.attention_mask_format = attention_mask_format
        self.use_kv_cache = use_kv_cache
        try:
            params = inspect.signature(model.forward).parameters
            self._forward_params = set(params)
        except (TypeError, ValueError, AttributeError):
            self._forward_params = {"input_ids", "attention_mask", "position_ids", "past_key_values", "use_cache"}

    # ------------------------------------------------------------------------------------------
    # construction helpers
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def preset(name: str) -> BlockDiffusionPreset:
        """The settings of a model family: ``"llada"``, ``"dream"``, ``"sdar"`` or ``"llada2"``."""
        return get_preset(name)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        preset: Optional[str] = None,
        *,
        trust_remote_code: Optional[bool] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
        tokenizer=None,
        model_kwargs: Optional[dict] = None,
        **pipeline_kwargs,
    ) -> "BlockDiffusionPipeline":
        """Load a checkpoint from a local directory (never downloads: ``local_files_only``).

        ``preset`` supplies the mask / EOS ids, logits shift, attention kind, mask format and the
        loader class (``AutoModel`` or ``AutoModelForCausalLM``); ``trust_remote_code`` defaults
        to what the family needs. Further keyword arguments override the preset's pipeline
        arguments (e.g. ``backend="torch"``).
    """
        if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
            raise ValueError(f"`path` must be a local checkpoint directory (nothing is downloaded), got {path!r}.")
        spec = get_preset(preset) if preset is not None else None
        if trust_remote_code is None:
            trust_remote_code = spec.trust_remote_code if spec is not None else False
        import transformers

        loader = getattr(transformers, spec.model_class if spec is not None else "AutoModelForCausalLM")
        kwargs = dict(model_kwargs or {})
        kwargs.update(local_files_only=True, trust_remote_code=trust_remote_code)
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = loader.from_pretrained(path, **kwargs).eval()
        if device is not None:
            model = model.to(device)
        if tokenizer is None:
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(
                    path, local_files_only=True, trust_remote_code=trust_remote_code
                )
            except (OSError, ValueError):
                tokenizer = None
        options = spec.pipeline_kwargs() if spec is not None else {}
        options.update(pipeline_kwargs)
        return cls(model, tokenizer, **options)

    @property
    def _execution_device(self) -> torch.device:
        return execution_device(self.model)

    # ------------------------------------------------------------------------------------------
    # diffusers-style stages
    # ------------------------------------------------------------------------------------------
    def check_inputs(
        self,
        prompt,
        input_ids,
        attention_mask,
        max_new_tokens,
        block_length,
        steps_per_block,
        temperature,
        remasking,
        confidence_from,
        threshold,
        factor,
        editing_threshold,
        max_post_steps,
        cfg_scale,
        logits_shift,
        eos_early_stop,
        seed,
        generator,
        use_chat_template,
        output_type,
        callback_on_step_end,
        progress,
    ) -> None:
        if (prompt is None) == (input_ids is None):
            raise ValueError("pass exactly one of `prompt` and `input_ids`.")
        if prompt is not None and self.tokenizer is None:
            raise ValueError("`prompt` needs a tokenizer; pass `input_ids` or give the pipeline a tokenizer.")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor):
                raise TypeError(f"`input_ids` must be a torch.Tensor, got {type(input_ids).__name__}.")
            if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.dim() not in (1, 2):
                raise ValueError(f"`input_ids` must be an integer [P] or [B, P] tensor, got {input_ids.dtype} "
                                 f"{tuple(input_ids.shape)}.")
        if attention_mask is not None:
            if input_ids is None:
                raise ValueError("`attention_mask` goes with `input_ids`; prompts are padded by the tokenizer.")
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                raise ValueError("`attention_mask` must be a tensor shaped like `input_ids`.")
        if not is_int(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be an int >= 1, got {max_new_tokens!r}.")
        if not is_int(block_length) or block_length < 1:
            raise ValueError(f"`block_length` must be an int >= 1, got {block_length!r}.")
        if steps_per_block is not None:
            if not is_int(steps_per_block) or steps_per_block < 1:
                raise ValueError(f"`steps_per_block` must be an int >= 1, got {steps_per_block!r}.")
            if steps_per_block > block_length:
                raise ValueError(
                    f"`steps_per_block` ({steps_per_block}) cannot exceed `block_length` ({block_length}): "
                    "every step must be able to commit at least one token."
                )
        if steps_per_block is None and threshold is None and factor is None:
            raise ValueError(
                "no commit rule: give `steps_per_block` (LLaDA's schedule), `threshold` (Fast-dLLM; with "
                "`steps_per_block` too: SDAR / LLaDA2 dynamic), or `factor` (Fast-dLLM dynamic)."
            )
        if factor is not None:
            if steps_per_block is not None or threshold is not None:
                raise ValueError("`factor` (Fast-dLLM's dynamic rule) cannot be combined with `steps_per_block` or "
                                 "`threshold`.")
            if not is_real(factor) or not factor > 0:
                raise ValueError(f"`factor` must be a number > 0, got {factor!r}.")
        if threshold is not None and (not is_real(threshold) or not 0.0 <= threshold <= 1.0):
            raise ValueError(f"`threshold` must be a number in [0, 1], got {threshold!r}.")
        if not is_real(temperature) or not temperature >= 0:
            raise ValueError(f"`temperature` must be a number >= 0, got {temperature!r}.")
        if remasking not in REMASKING:
            raise ValueError(f"`remasking` must be one of {tuple(REMASKING)}, got {remasking!r}.")
        if confidence_from not in CONFIDENCE_FROM:
            raise ValueError(f"`confidence_from` must be one of {CONFIDENCE_FROM}, got {confidence_from!r}.")
        if editing_threshold is not None and not is_real(editing_threshold):
            raise ValueError(f"`editing_threshold` must be a number, got {editing_threshold!r}.")
        if not is_int(max_post_steps) or max_post_steps < 0:
            raise ValueError(f"`max_post_steps` must be an int >= 0, got {max_post_steps!r}.")
        if max_post_steps > 0 and editing_threshold is None:
            raise ValueError("`max_post_steps` only applies with `editing_threshold` (post-decoding edits).")
        if not is_real(cfg_scale) or not cfg_scale >= 0:
            raise ValueError(f"`cfg_scale` must be a number >= 0, got {cfg_scale!r}.")
        for name, flag in (("logits_shift", logits_shift), ("eos_early_stop", eos_early_stop),
                           ("use_chat_template", use_chat_template), ("progress", progress)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be a bool, got {type(flag).__name__}.")
        if seed is not None and generator is not None:
            raise ValueError("pass either `seed` or `generator`, not both.")
        if seed is not None and not is_int(seed):
            raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError("`callback_on_step_end` must be callable.")

    def encode_prompt(self, prompt, input_ids, attention_mask, use_chat_template: bool, device):
        """``(input_ids [B, P], valid [B, P] bool)`` with prompts left-padded."""
        if prompt is not None:
            ids, mask = encode_prompts(self.tokenizer, prompt, use_chat_template=use_chat_template, device=device)
        else:
            ids = input_ids.to(device=device, dtype=torch.int64)
            mask = None if attention_mask is None else attention_mask.to(device)
            if ids.dim() == 1:
                ids = ids[None]
                mask = None if mask is None else mask[None]
            if mask is None:
                mask = torch.ones_like(ids)
        if ids.shape[1]:
            check_left_padded(mask)
        if bool((ids[mask.bool()] == self.mask_token_id).any()):
            raise ValueError("the prompt contains the mask token; it would be decoded as a position to fill.")
        return ids, mask.bool()

    def prepare_latents(self, input_ids: torch.Tensor, valid: torch.Tensor, max_new_tokens: int):
        """The initial sequence (prompt + ``max_new_tokens`` mask tokens) and its validity mask."""
        batch = input_ids.shape[0]
        masks = torch.full((batch, max_new_tokens), self.mask_token_id, dtype=torch.int64, device=input_ids.device)
        x = torch.cat([input_ids, masks], dim=1)
        valid = torch.cat([valid, torch.ones_like(masks, dtype=torch.bool)], dim=1)
        return x, valid

    # ------------------------------------------------------------------------------------------
    # layout: blocks, attention masks, model calls
    # ------------------------------------------------------------------------------------------
    def _context_length(self) -> Optional[int]:
        config = getattr(self.model, "config", None)
        for name in ("max_position_embeddings", "max_sequence_length", "n_positions"):
            value = getattr(config, name, None)
            if is_int(value):
                return value
        return None

    def _blocks(self, prompt_len: int, total: int, block_length: int) -> list[_Block]:
        blocks = []
        if self.attention == "bidirectional":
            for start in range(prompt_len, total, block_length):
                blocks.append(_Block(start, start, min(start + block_length, total)))
            return blocks
        # absolute alignment (SDAR / LLaDA2 / BD3LM / diffusers BlockRefinement)
        first = (prompt_len // block_length) * block_length
        for attn_start in range(first, total, block_length):
            blocks.append(_Block(attn_start, max(attn_start, prompt_len), min(attn_start + block_length, total)))
        return blocks

    def _attention_masks(self, valid: torch.Tensor, block_length: int, dtype: torch.dtype):
        """The full ``[B, 1, T, T]`` mask in the model's format (or the ``[B, T]`` padding mask)."""
        if self.attention_mask_format == "2d":
            return valid.to(torch.int64)
        total = valid.shape[1]
        cols = torch.arange(total, device=valid.device)
        if self.attention == "bidirectional":
            pattern = torch.ones(total, total, dtype=torch.bool, device=valid.device)
        elif self.attention == "block_causal":
            blk = cols // block_length
            pattern = blk[None, :] <= blk[:, None]
        else:
            pattern = cols[None, :] <= cols[:, None]
        allowed = (pattern[None] & valid[:, None, :]) | torch.eye(total, dtype=torch.bool, device=valid.device)[None]
        allowed = allowed[:, None]
        if self.attention_mask_format == "4d_bool":
            return allowed
        additive = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
        return additive.masked_fill_(~allowed, torch.finfo(dtype).min)

    def _forward(self, ctx, x: torch.Tensor, block: _Block) -> torch.Tensor:
        """Logits ``[B, L_block, V]`` for the generated columns of ``block`` (shifted, guided)."""
        shift = 1 if ctx.logits_shift else 0
        src = torch.arange(block.start - shift, block.end - shift, device=x.device)
        if self.attention == "bidirectional":
            start, end = 0, x.shape[1]
        elif ctx.cache is not None:
            start, end = ctx.cached_len, block.end
        else:
            start, end = 0, block.end
        ids = x[:, start:end]
        if ctx.cfg:
            uncond = torch.where(ctx.prompt_cols[:, start:end], self.mask_token_id, ids)
            ids = torch.cat([ids, uncond], dim=0)
        kwargs = {"input_ids": ids}
        if self.attention_mask_format == "2d":
            kwargs["attention_mask"] = ctx.attn[:, :end]
        else:
            kwargs["attention_mask"] = ctx.attn[:, :, start:end, :end]
        if "position_ids" in self._forward_params:
            kwargs["position_ids"] = ctx.positions[:, start:end]
        if ctx.cache is not None:
            kwargs["past_key_values"] = ctx.cache
            kwargs["use_cache"] = True
        elif "use_cache" in self._forward_params:
            kwargs["use_cache"] = False
        keep = src - start
        kept = "logits_to_keep" in self._forward_params
        if kept:
            kwargs["logits_to_keep"] = keep
        out = self.model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        ctx.nfe += 1
        if not kept:
            logits = logits[:, keep]
        if ctx.cache is not None:
            keep_len = min(block.attn_start, block.start - shift)
            _crop_cache(ctx.cache, keep_len)
            ctx.cached_len = keep_len
        if ctx.cfg:
            cond, uncond = logits.chunk(2, dim=0)
            logits = uncond + (ctx.cfg_scale + 1) * (cond - uncond)
        return logits

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except (TypeError, AttributeError):
            return DynamicCache()

    # ------------------------------------------------------------------------------------------
    # call
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str], None] = None,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        max_new_tokens: int = 128,
        block_length: int = 32,
        steps_per_block: Optional[int] = None,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        remasking: str = "low_confidence",
        confidence_from: str = "raw",
        threshold: Optional[float] = None,
        factor: Optional[float] = None,
        editing_threshold: Optional[float] = None,
        max_post_steps: int = 0,
        cfg_scale: float = 0.0,
        logits_shift: bool = False,
        suppress_tokens: Union[int, Sequence[int], torch.Tensor, None] = None,
        eos_token_id: Union[int, Sequence[int], None] = None,
        eos_early_stop: bool = True,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        use_chat_template: bool = False,
        output_type: str = "text",
        callback_on_step_end: Optional[Callable] = None,
        progress: bool = True,
    ) -> BlockDiffusionPipelineOutput:
        r"""Generate ``max_new_tokens`` tokens after each prompt.

        Args:
            prompt: a string or a list of strings (tokenised with left padding), or
            input_ids: ``[P]`` / ``[B, P]`` token ids, with
            attention_mask: ``[B, P]`` 0/1, left padding only (zeros first).
            max_new_tokens: exactly this many positions are generated (fewer are returned only
                when every row stopped at EOS).
            block_length: tokens per block; the last block may be shorter.
            steps_per_block: denoising steps per block, with LLaDA's even budget
                (:func:`ddiff.num_transfer_tokens`). With ``threshold`` too: SDAR's
                ``low_confidence_dynamic`` / LLaDA2 (all above the threshold if at least the
                budget passes, else the budget's top-k).
            temperature, top_k, top_p, min_p: sampling (:func:`ddiff.predict_tokens`); 0 is greedy.
            remasking: ``"low_confidence"`` (probability of the token), ``"random"``,
                ``"margin"`` (top-1 minus top-2) or ``"entropy"`` (negative entropy).
            confidence_from: ``"raw"`` (softmax of the logits: LLaDA, Fast-dLLM) or
                ``"sampling"`` (the tempered, filtered distribution: Dream, SDAR, LLaDA2).
            threshold: commit every masked token whose confidence exceeds it (at least one):
                Fast-dLLM parallel decoding.
            factor: Fast-dLLM's dynamic rule (alone).
            editing_threshold: LLaDA2.1 editing: decoded (non-prompt) tokens of the block whose
                new prediction differs with confidence above this are re-written.
            max_post_steps: extra editing-only steps after a block has no masks left.
            cfg_scale: LLaDA's unsupervised classifier-free guidance (prompt masked in the
                unconditional rows): ``uncond + (cfg_scale + 1) * (cond - uncond)``.
            logits_shift: predict position i from the output at i - 1 (Dream). Forced on when the
                pipeline was built with ``logits_shift=True`` (e.g. the Dream preset).
            suppress_tokens: ids never generated (the mask id is always suppressed).
            eos_token_id: EOS id(s); default the pipeline's (preset), then the tokenizer's.
            eos_early_stop: after a block, rows whose output holds an EOS (with everything before
                it decoded) stop; once all rows stopped, decoding ends and ``sequences`` is cut
                after the last EOS (shorter rows padded).
            seed: one seed for the whole call; step ``i`` draws with ``offset=i``. Or
            generator: a ``torch.Generator`` each op call draws its seed from.
            use_chat_template: wrap string prompts in the tokenizer's chat template.
            output_type: ``"text"`` (also decode) or ``"ids"``.
            callback_on_step_end: ``fn(pipe, step, step_in_block, callback_kwargs) -> dict``;
                ``callback_kwargs`` holds ``x`` (the whole sequence), ``tokens``, ``confidence``,
                ``transfer_index`` and ``edit_index`` (shaped like the block's generated columns
                ``x[:, block_start:block_end]``) and the ints ``block_start`` / ``block_end``; a
                returned ``"x"`` replaces the sequence (other returned keys are ignored; with a KV
                cache, changes to already committed blocks are not seen by the model).
            progress: show a tqdm bar over blocks (see ``set_progress_bar_config``).

        Returns:
            :class:`BlockDiffusionPipelineOutput`.
        """
        self.check_inputs(
            prompt, input_ids, attention_mask, max_new_tokens, block_length, steps_per_block, temperature,
            remasking, confidence_from, threshold, factor, editing_threshold, max_post_steps, cfg_scale,
            logits_shift, eos_early_stop, seed, generator, use_chat_template, output_type, callback_on_step_end,
            progress,
        )
        eos_ids = token_id_list(eos_token_id, "eos_token_id") or self.eos_token_ids
        if not eos_ids and self.tokenizer is not None:
            eos_ids = token_id_list(getattr(self.tokenizer, "eos_token_id", None), "eos_token_id")
        suppress = token_id_list(suppress_tokens, "suppress_tokens")
        suppress = [self.mask_token_id] + [i for i in dict.fromkeys(suppress) if i != self.mask_token_id]
        logits_shift = logits_shift or self.logits_shift
        device = self._execution_device

        # 1. prompt and latents
        ids, valid = self.encode_prompt(prompt, input_ids, attention_mask, use_chat_template, device)
        batch, prompt_len = ids.shape
        if logits_shift and prompt_len < 1:
            raise ValueError("`logits_shift` needs a prompt of at least one token (position 0 has no predecessor).")
        total = prompt_len + max_new_tokens
        context = self._context_length()
        if context is not None and total > context:
            what = "the prompt alone" if prompt_len > context else f"prompt ({prompt_len}) + max_new_tokens"
            raise ValueError(f"{what} needs {total} positions but the model's context is {context} tokens.")
        x, valid = self.prepare_latents(ids, valid, max_new_tokens)

        # 2. layout
        blocks = self._blocks(prompt_len, total, block_length)
        cfg = cfg_scale > 0
        attn = self._attention_masks(valid, block_length, model_dtype(self.model))
        positions = (valid.to(torch.int64).cumsum(1) - 1).clamp_(min=0)
        prompt_cols = (torch.arange(total, device=device)[None, :] < prompt_len) & valid
        if cfg:
            attn = torch.cat([attn, attn], dim=0)
            positions = torch.cat([positions, positions], dim=0)
        cache = self._new_cache() if self.attention != "bidirectional" and self.use_kv_cache else None
        ctx = _Context(cache=cache, cached_len=0, nfe=0, logits_shift=logits_shift, cfg=cfg, cfg_scale=cfg_scale,
                       attn=attn, positions=positions, prompt_cols=prompt_cols)
        eos_t = torch.tensor(eos_ids, dtype=torch.int64, device=device) if eos_ids else None
        suppress_t = torch.tensor(suppress, dtype=torch.int64, device=device)
        predict_kwargs = dict(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, confidence=REMASKING[remasking],
            confidence_from=confidence_from, suppress_tokens=suppress_t, generator=generator, backend=self.backend,
        )
        fixed_schedule = threshold is None and factor is None and editing_threshold is None
        stop_early = eos_early_stop and eos_t is not None

        # 3. denoising loop
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        step = 0
        block_times: list[float] = []
        block_steps: list[int] = []
        overrides = {} if progress else {"disable": True}  # never written back: the user's config survives
        bar = self.progress_bar(total=len(blocks), defaults={"desc": "blocks"}, **overrides)
        # The ops' value checks would wait for the device at every step; invalid rows come back
        # as token -1 instead, and one check after the loop turns them into the usual error.
        with sync_checks(False):
            try:
                for block in blocks:
                    started = time.perf_counter()
                    s, e = block.start, block.end
                    active = ~finished if stop_early else None
                    masked = x[:, s:e] == self.mask_token_id
                    if active is not None:
                        masked &= active[:, None]
                    n_steps = min(steps_per_block, e - s) if steps_per_block is not None else 0
                    schedule = ops.num_transfer_tokens(masked, n_steps) if n_steps else None
                    gen = torch.ones_like(masked) if active is None else active[:, None].expand_as(masked)
                    i = post = 0
                    rebound = False  # a callback replaced x: the fixed schedule may end early
                    limit = (e - s) + n_steps + max_post_steps + 1
                    while i < limit:
                        if fixed_schedule:
                            if i >= n_steps or (rebound and not bool(masked.any())):
                                break
                            any_masked = True
                        else:
                            any_masked = bool(masked.any())
                            if not any_masked:
                                if editing_threshold is None or post >= max_post_steps:
                                    break
                                post += 1
                        logits = self._forward(ctx, x, block)
                        pred_mask = masked if editing_threshold is None else gen
                        tokens, conf = ops.predict_tokens(
                            logits, pred_mask, seed=seed, offset=step, **predict_kwargs
                        )
                        current = x[:, s:e]
                        if any_masked:
                            if factor is not None:
                                rule = {"factor": factor}
                            elif schedule is not None:
                                rule = {"num_transfer": schedule[:, min(i, n_steps - 1)], "threshold": threshold}
                            else:
                                rule = {"threshold": threshold}
                            commit = ops.select_transfer(conf, masked, backend=self.backend, **rule)
                        else:
                            commit = torch.zeros_like(masked)
                        edits = None
                        if editing_threshold is not None:
                            editable = gen & ~masked
                            edits = ops.select_edits(tokens, conf, current, editable, editing_threshold)
                            update = commit | edits
                        else:
                            update = commit
                        x[:, s:e] = torch.where(update, tokens, current)
                        masked = masked & ~commit
                        if callback_on_step_end is not None:
                            out = run_callback(callback_on_step_end, self, step, i, {
                                "x": x, "tokens": tokens, "confidence": conf, "transfer_index": commit,
                                "edit_index": edits if edits is not None else torch.zeros_like(commit),
                                "block_start": s, "block_end": e,
                            })
                            if "x" in out:
                                x, rebound = out["x"], True
                                masked = x[:, s:e] == self.mask_token_id
                                if active is not None:
                                    masked &= active[:, None]
                        step += 1
                        i += 1
                        if not any_masked and not bool(edits.any()):
                            break
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    block_times.append(time.perf_counter() - started)
                    block_steps.append(i)
                    bar.update(1)
                    if stop_early:
                        finished |= torch.isin(x[:, prompt_len:e], eos_t).any(dim=1)
                        if bool(finished.all()):
                            break
            finally:
                bar.close()
        if bool((x == -1).any()):
            raise ValueError("the model produced logits with NaN or +inf (or an all -inf row after "
                             "`suppress_tokens`) at a decoded position.")

        # 4. outputs
        generated = x[:, prompt_len:]
        if eos_t is not None:
            is_eos = torch.isin(generated, eos_t)
            has_eos = is_eos.any(dim=1)
        else:
            has_eos = torch.zeros(batch, dtype=torch.bool, device=device)
        if stop_early:
            first = torch.where(has_eos, is_eos.to(torch.int64).argmax(dim=1), max_new_tokens)
            stop = torch.where(has_eos, first + 1, max_new_tokens)
            length = stop.max().item()
            pad_id = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
            if pad_id is None:
                pad_id = getattr(getattr(self.model, "config", None), "pad_token_id", None)
            pad_id = pad_id if is_int(pad_id) else eos_ids[0]
            cols = torch.arange(length, device=device)[None, :]
            sequences = torch.where(cols < stop[:, None], generated[:, :length], pad_id)
        else:
            sequences = generated.clone()
        texts = decode_sequences(self.tokenizer, sequences) if output_type == "text" else None
        return BlockDiffusionPipelineOutput(
            sequences=sequences, texts=texts, nfe=ctx.nfe, steps=step, block_times=block_times,
            finished=has_eos, block_steps=block_steps,
        )
