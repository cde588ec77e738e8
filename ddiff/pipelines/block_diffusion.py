"""BlockDiffusionPipeline: prompt-conditioned decoding by confidence remasking, block by block.

One loop covers the decoders of LLaDA (``generate``: semi-autoregressive blocks, whole-sequence
forward, ``low_confidence`` / ``random`` remasking, unsupervised CFG, ``confidence_eos_eot_inf``),
Dream (``diffusion_generate``: ``origin``, ``maskgit_plus``, ``topk_margin``, ``entropy``,
``alg_temp``, Dream's ``1 − s/t`` schedule, logits shifted by one), Fast-dLLM (threshold and factor
parallel decoding), SDAR (block-causal, ``low_confidence_static`` / ``_dynamic``, ``sequential``),
LLaDA2 (threshold, ``editing_threshold``, ``max_post_steps``, EOS stop inside a block) and block
refinement of ordinary causal LMs.

The pipeline keeps the model calls, the layout and the callbacks; each step's rule (predict,
commit, edit) is :meth:`BlockDiffusionScheduler.step`, which calls :mod:`ddiff.ops`, and
:meth:`BlockDiffusionScheduler.is_done` says when a block is finished. The model is called
through :func:`ddiff.denoiser.model_logits`.

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
decodes exactly as it would alone at temperature 0; with sampling the ops' noise is keyed by the
row index, so a row other than the first draws other noise than it would alone. With
``"block_causal"`` / ``"causal"`` blocks are aligned to
the columns of the padded batch, so a padded row's block boundaries move by its padding (its
tokens can differ from a solo run unless the model was trained with varying block alignment).

The mask id
-----------
As in every upstream loop, the mask id is predicted like any other token unless it is in
``suppress_tokens``: a position whose committed prediction is the mask id stays masked. With a
fixed schedule (LLaDA, Dream) a block may then end with masks left; in ``"bidirectional"`` mode
they stay candidates in the later blocks (LLaDA's ``mask_index`` covers the whole sequence), in
the block-causal modes they stay masks (SDAR, LLaDA2), and the output may hold them.

Host synchronisation: LLaDA's and Dream's fixed schedules never wait on the device within a
block; threshold / factor / editing rules and the partly prompt-filled first block check once
per step whether the block still has masks; EOS early stop checks once per step; block timing
(and, in ``"bidirectional"`` mode with the mask id allowed, the search for masks left in earlier
blocks) synchronises once per block.

Invalid logits: a position whose logits row is invalid (NaN / +inf, or entirely -inf after
``suppress_tokens`` and the filters, e.g. through ``cfg_scale`` or an overflowing temperature)
gets ``-1`` from the ops, which run without value checks inside the loop. That ``-1`` is never
written into the sequence (the position keeps its mask, so the model never sees an invalid id);
the step is recorded on the device, and at the end of the block (one host read, where the
block's timing already waits for the device) a ValueError names the first step, batch row and
position. ``suppress_tokens`` covering every id and ``cfg_scale = inf`` are refused up front.

Differences from the upstream loops (same tokens otherwise, at temperature 0)
-----------------------------------------------------------------------------
* Noise: sampling draws come from ddiff's Philox streams, not ``torch.rand``: the same
  distributions, not the same draws (LLaDA's float64 Gumbel-max, Dream's / SDAR's
  ``multinomial``, Dream's ``alg_temp`` multinomial, which is a Gumbel-top-``k`` here).
* Comparisons: confidences are ranked and thresholded in fp32 (LLaDA's and Fast-dLLM's are
  float64, Dream's are cast to the model dtype before its top-``k``); among tied confidences
  the lower position wins (``torch.topk`` leaves it unspecified).
* Lengths: ``max_new_tokens`` need not be a multiple of ``block_length`` and ``steps_per_block``
  is per block (LLaDA asserts both and divides a total). SDAR / LLaDA2 generate whole blocks
  past ``gen_length``; here the last block stops at ``max_new_tokens``, so its tokens match
  upstream's only when prompt + ``max_new_tokens`` ends on a block boundary.
* LLaDA: ``confidence_eos_eot_inf`` reproduces upstream's aliasing (EOT loses its confidence
  always, EOS only at temperature 0).
* Dream: the count ``int(m · (1 − s/t))`` uses each row's masks (upstream: the batch average,
  which re-masks decoded tokens when rows differ); Dream applies top-p before top-k (here
  top-k, then top-p); its entropy adds ``1e-10`` inside the log. A row's top-p keeps a token
  while the mass above it is below ``top_p`` (transformers; Dream and SDAR: at most ``top_p``),
  which only differs on exact ties of the cumulative sum.
* Fast-dLLM: upstream commits confidences ``>= threshold``, ddiff ``> threshold`` (SDAR and
  LLaDA2 use ``>``). Upstream's ``while True`` never ends when the model keeps predicting the
  mask id; ddiff stops a threshold / factor block after ``block_length`` steps.
* SDAR: upstream divides by a temperature of 0 (NaN); here 0 is greedy. When a step's count
  exceeds the masks left, upstream's ``topk`` also picks non-mask positions and overwrites them
  (prompt tokens in the first block); ddiff caps the count at the masks left. SDAR runs one
  more forward per finished block to store its KV cache (not here: ``nfe`` is lower); when
  masks are left after ``denoising_steps`` (a predicted mask id) upstream raises an
  ``IndexError``, ddiff leaves them.
* LLaDA2: the published LLaDA2.0 ``generate`` samples with ``multinomial`` even at temperature
  0 (it only skips the division); here 0 is greedy, as in diffusers' LLaDA2 pipeline. Its
  in-step EOS stop returns prompt + tokens, its normal return only tokens; here always only
  generated tokens. Upstream decodes one prompt at a time; here rows stop independently.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from ddiff._checks import check_seed, logits_location
from ddiff._params import sync_checks
from ddiff.denoiser import crop_cache, model_logits, new_cache
from ddiff.pipelines.block_diffusion_scheduler import (BlockDiffusionScheduler, BlockDiffusionSchedulerOutput,
                                                       REMASKING, SCHEDULES)
from ddiff.pipelines.presets import BlockDiffusionPreset, get_preset
from ddiff.pipelines.utils import (
    DiscreteDiffusionPipelineOutput,
    ProgressBarMixin,
    check_left_padded,
    check_token_ids,
    decode_sequences,
    encode_prompts,
    execution_device,
    is_int,
    is_real,
    check_callback_ids,
    model_dtype,
    model_output_size,
    model_vocab_size,
    run_callback,
    token_id_list,
)

__all__ = ["BlockDiffusionPipeline", "BlockDiffusionPipelineOutput"]

ATTENTION_KINDS = ("bidirectional", "block_causal", "causal")
MASK_FORMATS = ("4d", "4d_bool", "2d")
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


@dataclass
class _Run:
    """Per-call decoding state."""

    x: torch.Tensor  # [B, T] the whole sequence
    prompt_len: int
    attn: torch.Tensor  # [B(*2), T] padding mask or [B(*2), 1, T, T] attention mask
    positions: torch.Tensor  # [B(*2), T]
    prompt_cols: torch.Tensor  # [B, T] bool, real prompt tokens (masked in CFG's unconditional rows)
    cache: object  # transformers DynamicCache or None
    logits_shift: bool
    cfg_scale: float
    finished: torch.Tensor  # [B] bool, rows stopped at EOS
    eos: Optional[torch.Tensor]  # [E] int64 or None
    stop_early: bool
    mask_suppressed: bool
    cached_len: int = 0
    nfe: int = 0
    step: int = 0
    invalid_step: Optional[torch.Tensor] = None  # [B, T] int64: first step whose logits row there was invalid, or -1


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
        scheduler: a :class:`BlockDiffusionScheduler` whose config gives the defaults of the
            rule arguments of ``__call__`` (``schedule``, ``remasking``, ``confidence_from``,
            ``threshold``, ...; a preset sets Dream's schedule and the families' confidence
            source). Default: ``BlockDiffusionScheduler()`` (LLaDA's).

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
        scheduler: Optional[BlockDiffusionScheduler] = None,
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
        if scheduler is not None and not isinstance(scheduler, BlockDiffusionScheduler):
            raise TypeError(f"`scheduler` must be a BlockDiffusionScheduler, got {type(scheduler).__name__}.")
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
        self.scheduler = (scheduler or BlockDiffusionScheduler()).replace(mask_token_id=mask_token_id)

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
        torch_dtype: Optional[torch.dtype] = None,
        **pipeline_kwargs,
    ) -> "BlockDiffusionPipeline":
        """Load a checkpoint from a local directory (never downloads: ``local_files_only``).

        ``preset`` supplies the mask / EOS ids, logits shift, attention kind, mask format, the
        scheduler (Dream's schedule) and the loader class (``AutoModel`` or
        ``AutoModelForCausalLM``); ``trust_remote_code`` defaults to what the family needs.
        ``dtype`` (``torch_dtype`` is its deprecated name) and ``device`` place the model.
        Further keyword arguments override the preset's pipeline arguments (e.g. ``backend="torch"``).
        Errors name the path, file or key at fault (see :mod:`ddiff.pipelines.loading`).
        """
        from ddiff.pipelines.loading import load_transformers_model, read_json, resolve_checkpoint_dir, resolve_dtype

        dtype = resolve_dtype(dtype, torch_dtype, caller="BlockDiffusionPipeline.from_pretrained")
        path = resolve_checkpoint_dir(path, "BlockDiffusionPipeline checkpoint (`path`)")
        spec = get_preset(preset) if preset is not None else None
        if trust_remote_code is None:
            trust_remote_code = spec.trust_remote_code if spec is not None else False
        import transformers

        model = load_transformers_model(path, loader=spec.model_class if spec is not None else "AutoModelForCausalLM",
                                        dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                        model_kwargs=model_kwargs, what="BlockDiffusionPipeline checkpoint (`path`)")
        if tokenizer is None:
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if os.path.exists(os.path.join(path, name)):
                    read_json(os.path.join(path, name))  # a corrupt tokenizer file is an error, not "no tokenizer"
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
        schedule=None,
        selection_temperature=None,
        confidence_eos_eot_inf=False,
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
        if remasking in ("sequential", "origin") and steps_per_block is None:
            raise ValueError(f"remasking={remasking!r} commits a scheduled count: give `steps_per_block`.")
        if confidence_from not in CONFIDENCE_FROM:
            raise ValueError(f"`confidence_from` must be one of {CONFIDENCE_FROM}, got {confidence_from!r}.")
        if schedule is not None and schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {schedule!r}.")
        if selection_temperature is not None and (not is_real(selection_temperature)
                                                  or not selection_temperature >= 0):
            raise ValueError(f"`selection_temperature` must be a number >= 0, got {selection_temperature!r}.")
        if selection_temperature and steps_per_block is None:
            raise ValueError("`selection_temperature` samples a scheduled count of positions: give `steps_per_block`.")
        if editing_threshold is not None and not is_real(editing_threshold):
            raise ValueError(f"`editing_threshold` must be a number, got {editing_threshold!r}.")
        if not is_int(max_post_steps) or max_post_steps < 0:
            raise ValueError(f"`max_post_steps` must be an int >= 0, got {max_post_steps!r}.")
        if max_post_steps > 0 and editing_threshold is None:
            raise ValueError("`max_post_steps` only applies with `editing_threshold` (post-decoding edits).")
        if not is_real(cfg_scale) or not 0 <= cfg_scale < float("inf"):
            raise ValueError(f"`cfg_scale` must be a finite number >= 0, got {cfg_scale!r}.")
        for name, flag in (("logits_shift", logits_shift), ("eos_early_stop", eos_early_stop),
                           ("use_chat_template", use_chat_template), ("progress", progress),
                           ("confidence_eos_eot_inf", confidence_eos_eot_inf)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be a bool, got {type(flag).__name__}.")
        if seed is not None and generator is not None:
            raise ValueError("pass either `seed` or `generator`, not both.")
        if seed is not None:
            check_seed("seed", seed)  # any integer type in [-2**63, 2**64), as every op
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError("`callback_on_step_end` must be callable.")

    def encode_prompt(self, prompt, input_ids, attention_mask, use_chat_template: bool, device):
        """``(input_ids [B, P], valid [B, P] bool)`` with prompts left-padded."""
        if isinstance(prompt, (list, tuple)) and not prompt:  # an empty batch
            ids = torch.zeros(0, 0, dtype=torch.int64, device=device)
            mask = torch.ones_like(ids)
        elif prompt is not None:
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
        # padding ids reach the model's embedding too (they are only masked out of attention)
        check_token_ids("input_ids" if input_ids is not None else "prompt", ids, model_vocab_size(self.model))
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

    def _forward(self, run: _Run, block: _Block, start_col: int, end_col: int) -> torch.Tensor:
        """Logits ``[B, end_col - start_col, V]`` for generated columns of ``block`` (shifted, guided)."""
        shift = 1 if run.logits_shift else 0
        if self.attention == "bidirectional":
            start, end = 0, run.x.shape[1]
        elif run.cache is not None:
            start, end = run.cached_len, block.end
        else:
            start, end = 0, block.end
        ids = run.x[:, start:end]
        if run.cfg_scale > 0:
            uncond = torch.where(run.prompt_cols[:, start:end], self.mask_token_id, ids)
            ids = torch.cat([ids, uncond], dim=0)
        if self.attention_mask_format == "2d":
            mask = run.attn[:, :end]
        else:
            mask = run.attn[:, :, start:end, :end]
        keep = torch.arange(start_col - shift - start, end_col - shift - start, device=ids.device)
        logits = model_logits(self.model, ids, attention_mask=mask, position_ids=run.positions[:, start:end],
                              past_key_values=run.cache, logits_to_keep=keep)
        run.nfe += 1
        if run.cache is not None:
            run.cached_len = min(block.attn_start, block.start - shift)
            crop_cache(run.cache, run.cached_len)
        if run.cfg_scale > 0:
            cond, uncond = logits.chunk(2, dim=0)
            logits = uncond + (run.cfg_scale + 1) * (cond - uncond)
        return logits

    # ------------------------------------------------------------------------------------------
    # the denoising loop
    # ------------------------------------------------------------------------------------------
    def _window_start(self, run: _Run, block: _Block) -> int:
        """First column the block's steps cover: the block, or (``"bidirectional"``, mask id
        allowed) the first earlier column still masked, which LLaDA's top-k keeps as a candidate."""
        if self.attention != "bidirectional" or run.mask_suppressed or block.start <= run.prompt_len:
            return block.start
        left = run.x[:, run.prompt_len:block.start] == self.mask_token_id
        if run.stop_early:
            left &= ~run.finished[:, None]
        cols = left.any(dim=0)
        if not bool(cols.any()):
            return block.start
        return run.prompt_len + int(cols.to(torch.int8).argmax())

    def _candidates(self, run: _Run, start_col: int, end_col: int):
        """``(masked, generated)`` of the columns: masks that may be committed and positions the
        step may touch (None: all); rows that stopped at EOS are frozen."""
        masked = run.x[:, start_col:end_col] == self.mask_token_id
        if not run.stop_early:
            return masked, None
        active = ~run.finished[:, None]
        return masked & active, active.expand_as(masked)

    def _eos_rows(self, run: _Run, end_col: int, *, decoded_prefix: bool) -> torch.Tensor:
        """``[B]`` rows whose generated tokens up to ``end_col`` hold an EOS (with no mask before
        the first one, when ``decoded_prefix``)."""
        gen = run.x[:, run.prompt_len:end_col]
        is_eos = torch.isin(gen, run.eos)
        has = is_eos.any(dim=1)
        if not decoded_prefix:
            return has
        first = torch.where(has, is_eos.to(torch.int8).argmax(dim=1), gen.shape[1])
        cols = torch.arange(gen.shape[1], device=gen.device)[None, :]
        return has & ~((gen == self.mask_token_id) & (cols < first[:, None])).any(dim=1)

    def _stopped_in_step(self, run: _Run, out: BlockDiffusionSchedulerOutput, end_col: int) -> bool:
        """LLaDA2's stop inside a block: a row whose step wrote an EOS, with every generated
        position before its first EOS decoded, is finished; True once every row is."""
        wrote_eos = (torch.isin(out.tokens, run.eos) & (out.transfer_index | out.edit_index)).any(dim=1)
        run.finished |= wrote_eos & self._eos_rows(run, end_col, decoded_prefix=True)
        return bool(run.finished.all())

    def _callback(self, run: _Run, callback, step_in_block: int, out: BlockDiffusionSchedulerOutput, start_col: int,
                  end_col: int) -> bool:
        """Run ``callback_on_step_end``; True when it replaced ``x``."""
        if callback is None:
            return False
        returned = run_callback(callback, self, run.step, step_in_block, {
            "x": run.x, "tokens": out.tokens, "confidence": out.confidence, "transfer_index": out.transfer_index,
            "edit_index": out.edit_index, "block_start": start_col, "block_end": end_col,
        })
        if returned.get("x") is None:
            return False
        run.x = check_callback_ids(returned["x"], run.x, model_vocab_size(self.model))
        return True

    def _denoise_block(self, run: _Run, scheduler: BlockDiffusionScheduler, block: _Block,
                       steps_per_block: Optional[int], step_kwargs: dict, callback) -> int:
        """Decode one block; returns the number of steps it took."""
        start_col, end_col = self._window_start(run, block), block.end
        columns = block.end - block.attn_start
        steps = min(steps_per_block, columns) if steps_per_block is not None else None
        scheduler.set_timesteps(steps, columns, num_masked=block.end - block.start)
        i, out, x_changed = 0, None, False
        while True:
            masked, generated = self._candidates(run, start_col, end_col)
            if scheduler.is_done(i, masked, out, x_changed=x_changed):
                break
            logits = self._forward(run, block, start_col, end_col)
            out = scheduler.step(logits, run.x[:, start_col:end_col], masked, i, generated=generated,
                                 offset=run.step, **step_kwargs)
            run.x[:, start_col:end_col] = out.x
            if out.invalid_index is not None:  # device-side bookkeeping only: no host sync per step
                seen = run.invalid_step[:, start_col:end_col]
                run.invalid_step[:, start_col:end_col] = torch.where(out.invalid_index & (seen < 0), run.step, seen)
            x_changed |= self._callback(run, callback, i, out, start_col, end_col)
            run.step += 1
            i += 1
            if run.stop_early and self._stopped_in_step(run, out, end_col):
                break
        return i

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
        remasking: Optional[str] = None,
        confidence_from: Optional[str] = None,
        threshold: Optional[float] = None,
        factor: Optional[float] = None,
        editing_threshold: Optional[float] = None,
        max_post_steps: Optional[int] = None,
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
        schedule: Optional[str] = None,
        selection_temperature: Optional[float] = None,
        confidence_eos_eot_inf: bool = False,
    ) -> BlockDiffusionPipelineOutput:
        r"""Generate ``max_new_tokens`` tokens after each prompt.

        The rule arguments (``remasking``, ``confidence_from``, ``threshold``, ``factor``,
        ``editing_threshold``, ``max_post_steps``, ``schedule``, ``selection_temperature``)
        default to the pipeline scheduler's config (``BlockDiffusionScheduler()``: LLaDA's
        schedule, ``"low_confidence"``, ``"raw"``, no threshold; the presets set Dream's schedule
        and the families' confidence source).

        Args:
            prompt: a string or a list of strings (tokenised with left padding), or
            input_ids: ``[P]`` / ``[B, P]`` token ids, with
            attention_mask: ``[B, P]`` 0/1, left padding only (zeros first). Bool, integer or float,
                but only exact 0 and 1 (``0.5`` or NaN is a ValueError, never truncated). Padding
                ids reach the embedding too: every id must lie in ``[0, V)``, under 0 as well.
                An empty batch (``[0, P]`` ids, or ``prompt=[]``) returns empty results
                (``sequences`` ``[0, max_new_tokens]``) without calling the model, as the ops do.
            max_new_tokens: exactly this many positions are generated (fewer are returned only
                when every row stopped at EOS).
            block_length: tokens per block; the last block may be shorter. Dream decodes the
                whole answer as one block: ``block_length >= max_new_tokens``.
            steps_per_block: denoising steps per block; the schedule gives each step's count.
                With ``threshold`` too: SDAR's ``low_confidence_dynamic`` / LLaDA2 (all above
                the threshold if at least the count passes, else the count's top-k). Default,
                when neither ``threshold`` nor ``factor`` is given (by the call or the
                scheduler's config): ``block_length``, LLaDA's schedule committing one token
                per step (as LLaDA's ``generate`` with ``steps == gen_length``).
            temperature, top_k, top_p, min_p: sampling (:func:`ddiff.predict_tokens`); 0 is greedy.
            remasking: ``"low_confidence"`` (probability of the token; Dream ``maskgit_plus``),
                ``"random"``, ``"margin"`` (top-1 minus top-2: Dream ``topk_margin``),
                ``"entropy"`` (negative entropy: Dream ``entropy``), ``"sequential"`` (SDAR:
                left to right from the first mask) or ``"origin"`` (Dream: each mask revealed
                with probability ``1 − s/t``).
            confidence_from: ``"raw"`` (softmax of the logits: LLaDA, Fast-dLLM) or
                ``"sampling"`` (the tempered, filtered distribution: Dream, SDAR, LLaDA2).
            threshold: commit every masked token whose confidence exceeds it (at least one):
                Fast-dLLM parallel decoding.
            factor: Fast-dLLM's dynamic rule (alone).
            editing_threshold: LLaDA2.1 editing: decoded (non-prompt) tokens of the block whose
                new prediction differs with confidence above this are re-written.
            max_post_steps: extra editing-only steps after a block has no masks left.
            cfg_scale: LLaDA's unsupervised classifier-free guidance (prompt masked in the
                unconditional rows): ``uncond + (cfg_scale + 1) * (cond - uncond)``; finite, >= 0.
            logits_shift: predict position i from the output at i - 1 (Dream). Forced on when the
                pipeline was built with ``logits_shift=True`` (e.g. the Dream preset).
            suppress_tokens: ids never generated. The mask id is allowed unless listed here, as
                in the upstream loops (module docstring); LLaDA's ``logits_eos_inf`` is
                ``suppress_tokens=[126081]``. Every id must lie in ``[0, V)`` (V: the model's
                logit columns) and at least one id must be left; a ValueError otherwise (with
                ``confidence_eos_eot_inf`` the EOS ids are checked the same way).
            eos_token_id: EOS id(s); default the pipeline's (preset), then the tokenizer's.
            eos_early_stop: a row stops as soon as a step writes an EOS with every generated
                position before the first EOS decoded (LLaDA2), or at the end of a block holding
                such an EOS (block-causal modes: any EOS, as SDAR and LLaDA2); once every row
                stopped, decoding ends and ``sequences`` is cut after the first EOS (shorter rows
                padded). The tokens up to the first EOS are those of a run without the stop
                (except with editing, which a stop also ends).
            seed: one seed for the whole call; step ``i`` draws with ``offset=i`` (any integer
                type in ``[-2**63, 2**64)``, the ops' seed rule; else ValueError). Or
            generator: a ``torch.Generator`` each op call draws its seed from.
            use_chat_template: wrap string prompts in the tokenizer's chat template.
            output_type: ``"text"`` (also decode) or ``"ids"``.
            callback_on_step_end: ``fn(pipe, step, step_in_block, callback_kwargs) -> dict``;
                ``callback_kwargs`` holds ``x`` (the whole sequence), ``tokens``, ``confidence``,
                ``transfer_index`` and ``edit_index`` (shaped like the step's columns
                ``x[:, block_start:block_end]``) and the ints ``block_start`` / ``block_end``; a
                returned ``"x"`` replaces the sequence (other returned keys are ignored; with a KV
                cache, changes to already committed blocks are not seen by the model): a
                ``torch.Tensor`` of an integer dtype shaped like ``x`` with ids in ``[0, V)``
                (TypeError / ValueError naming ``callback_on_step_end`` otherwise); ``None``
                changes nothing.
            progress: show a tqdm bar over blocks (see ``set_progress_bar_config``).
            schedule: ``"llada"`` (even split of the block) or ``"dream"`` (Dream's
                ``int(m · (1 − s/t))``); see :class:`BlockDiffusionScheduler`.
            selection_temperature: Dream's ``alg_temp``: sample the committed positions without
                replacement from ``softmax(confidence / τ)`` instead of taking the top-k.
            confidence_eos_eot_inf: LLaDA's flag: the EOS ids lose their confidence (their
                probability is removed from the distribution the confidence is measured under).
                As upstream's aliasing does, at temperature > 0 the first EOS id (LLaDA's
                ``<|endoftext|>``) keeps its confidence and only the others lose it.

        Returns:
            :class:`BlockDiffusionPipelineOutput`.
        """
        config = self.scheduler.config
        remasking = config["remasking"] if remasking is None else remasking
        confidence_from = config["confidence_from"] if confidence_from is None else confidence_from
        threshold = config["threshold"] if threshold is None else threshold
        factor = config["factor"] if factor is None else factor
        editing_threshold = config["editing_threshold"] if editing_threshold is None else editing_threshold
        max_post_steps = config["max_post_steps"] if max_post_steps is None else max_post_steps
        selection_temperature = (config["selection_temperature"] if selection_temperature is None
                                 else selection_temperature)
        if steps_per_block is None and threshold is None and factor is None:
            steps_per_block = block_length  # the default commit rule: LLaDA's, one token per step
        self.check_inputs(
            prompt, input_ids, attention_mask, max_new_tokens, block_length, steps_per_block, temperature,
            remasking, confidence_from, threshold, factor, editing_threshold, max_post_steps, cfg_scale,
            logits_shift, eos_early_stop, seed, generator, use_chat_template, output_type, callback_on_step_end,
            progress, schedule, selection_temperature, confidence_eos_eot_inf,
        )
        scheduler = self.scheduler.replace(
            schedule=schedule or config["schedule"], remasking=remasking, confidence_from=confidence_from,
            threshold=threshold, factor=factor, editing_threshold=editing_threshold, max_post_steps=max_post_steps,
            selection_temperature=selection_temperature,
        )
        eos_ids = token_id_list(eos_token_id, "eos_token_id") or self.eos_token_ids
        if not eos_ids and self.tokenizer is not None:
            eos_ids = token_id_list(getattr(self.tokenizer, "eos_token_id", None), "eos_token_id")
        suppress = list(dict.fromkeys(token_id_list(suppress_tokens, "suppress_tokens")))
        self._check_suppressed(suppress, eos_ids if confidence_eos_eot_inf else [])
        logits_shift = logits_shift or self.logits_shift
        device = self._execution_device

        # 1. prompt and latents
        ids, valid = self.encode_prompt(prompt, input_ids, attention_mask, use_chat_template, device)
        batch, prompt_len = ids.shape
        if batch == 0:  # an empty batch: empty results, as the ops give, and no model call
            return self._empty_outputs(max_new_tokens, output_type, device)
        if logits_shift and prompt_len < 1:
            raise ValueError("`logits_shift` needs a prompt of at least one token (position 0 has no predecessor).")
        total = prompt_len + max_new_tokens
        context = self._context_length()
        if context is not None and total > context:
            what = "the prompt alone" if prompt_len > context else f"prompt ({prompt_len}) + max_new_tokens"
            raise ValueError(f"{what} needs {total} positions but the model's context is {context} tokens.")
        x, valid = self.prepare_latents(ids, valid, max_new_tokens)

        # 2. layout and per-call state
        blocks = self._blocks(prompt_len, total, block_length)
        run = self._prepare_run(x, valid, prompt_len, block_length, logits_shift, cfg_scale, eos_ids, suppress,
                                eos_early_stop)
        suppress_t = torch.tensor(suppress, dtype=torch.int64, device=device) if suppress else None
        step_kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, suppress_tokens=suppress_t,
                           confidence_suppress_tokens=self._confidence_suppress(confidence_eos_eot_inf, eos_ids,
                                                                                temperature, device),
                           seed=None if seed is None else check_seed("seed", seed), generator=generator,
                           backend=self.backend)

        # 3. denoising loop. The ops' value checks would wait for the device at every step;
        # invalid rows come back as token -1 instead: never written, recorded, raised after their block.
        block_times: list[float] = []
        block_steps: list[int] = []
        overrides = {} if progress else {"disable": True}  # never written back: the user's config survives
        bar = self.progress_bar(total=len(blocks), defaults={"desc": "blocks"}, **overrides)
        with sync_checks(False):
            try:
                for block in blocks:
                    started = time.perf_counter()
                    block_steps.append(self._denoise_block(run, scheduler, block, steps_per_block, step_kwargs,
                                                           callback_on_step_end))
                    block_times.append(self._elapsed(started, device))  # waits for the device on CUDA
                    self._raise_invalid(run)
                    bar.update(1)
                    if run.stop_early and self._finished_after_block(run, block):
                        break
            finally:
                bar.close()
        return self._outputs(run, eos_ids, max_new_tokens, output_type, block_times, block_steps)

    # ------------------------------------------------------------------------------------------
    # call helpers
    # ------------------------------------------------------------------------------------------
    def _prepare_run(self, x, valid, prompt_len, block_length, logits_shift, cfg_scale, eos_ids, suppress,
                     eos_early_stop) -> _Run:
        device = x.device
        attn = self._attention_masks(valid, block_length, model_dtype(self.model))
        positions = (valid.to(torch.int64).cumsum(1) - 1).clamp_(min=0)
        prompt_cols = (torch.arange(x.shape[1], device=device)[None, :] < prompt_len) & valid
        if cfg_scale > 0:
            attn = torch.cat([attn, attn], dim=0)
            positions = torch.cat([positions, positions], dim=0)
        cache = new_cache(self.model) if self.attention != "bidirectional" and self.use_kv_cache else None
        eos = torch.tensor(eos_ids, dtype=torch.int64, device=device) if eos_ids else None
        return _Run(x=x, prompt_len=prompt_len, attn=attn, positions=positions, prompt_cols=prompt_cols,
                    cache=cache, logits_shift=logits_shift, cfg_scale=cfg_scale,
                    finished=torch.zeros(x.shape[0], dtype=torch.bool, device=device), eos=eos,
                    stop_early=eos_early_stop and eos is not None, mask_suppressed=self.mask_token_id in suppress,
                    invalid_step=torch.full(x.shape, -1, dtype=torch.int64, device=device))

    def _check_suppressed(self, suppress: list, eos_ids: list) -> None:
        """``suppress_tokens`` (and, with ``confidence_eos_eot_inf``, the EOS ids) must be ids of the
        model's logits ``[0, V)``, and ``suppress_tokens`` must leave at least one id."""
        size = model_output_size(self.model)
        for name, ids in (("suppress_tokens", suppress), ("eos_token_id", eos_ids)):
            for i in ids:
                if i < 0 or (size is not None and i >= size):
                    limit = f"[0, {size})" if size is not None else "ids >= 0"
                    raise ValueError(f"`{name}` holds token id {i}, outside the model's logits {limit}.")
        if size is not None and len(suppress) >= size:
            raise ValueError(f"`suppress_tokens` covers all {size} ids of the model's logits: no token could be "
                             "generated.")

    def _empty_outputs(self, max_new_tokens: int, output_type: str, device) -> "BlockDiffusionPipelineOutput":
        sequences = torch.zeros(0, max_new_tokens, dtype=torch.int64, device=device)
        texts = decode_sequences(self.tokenizer, sequences) if output_type == "text" else None
        return BlockDiffusionPipelineOutput(sequences=sequences, texts=texts, nfe=0, steps=0, block_times=[],
                                            finished=torch.zeros(0, dtype=torch.bool, device=device),
                                            block_steps=[])

    @staticmethod
    def _raise_invalid(run: _Run) -> None:
        """Raise for the first (earliest step, then first row and position) invalid logits row seen.

        One host read; the loop calls it once per block, after the block's timing has waited for
        the device anyway."""
        seen = run.invalid_step >= 0
        if not bool(seen.any()):
            return
        step = int(run.invalid_step[seen].min())
        first = int(torch.nonzero((run.invalid_step == step).reshape(-1))[0])
        where = logits_location(first, run.invalid_step.shape)
        raise ValueError(f"at step {step}, the model's logits predicting the token {where} of the sequence (prompt "
                         "included) held NaN or +inf, or were all -inf after `suppress_tokens` and the top-k / "
                         "top-p / min-p filters (or overflowed at this temperature / `cfg_scale`): no token can be "
                         "drawn there.")

    @staticmethod
    def _confidence_suppress(enabled: bool, eos_ids: list[int], temperature, device) -> Optional[torch.Tensor]:
        """LLaDA's ``confidence_eos_eot_inf``: upstream's ``logits_with_noise[..., EOS] =
        logits[..., EOT] = -inf`` hits ``logits`` twice only at temperature 0 (where
        ``logits_with_noise`` is ``logits``)."""
        if not enabled or not eos_ids:
            return None
        ids = eos_ids if temperature == 0 or len(eos_ids) == 1 else eos_ids[1:]
        return torch.tensor(ids, dtype=torch.int64, device=device)

    def _finished_after_block(self, run: _Run, block: _Block) -> bool:
        """Mark rows stopped at EOS after a block; True once every row is."""
        # block-causal modes never revisit an earlier block, so an EOS ends the row (SDAR,
        # LLaDA2); bidirectional blocks can still fill masks left before it
        run.finished |= self._eos_rows(run, block.end, decoded_prefix=self.attention == "bidirectional")
        return bool(run.finished.all())

    @staticmethod
    def _elapsed(started: float, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    def _outputs(self, run: _Run, eos_ids, max_new_tokens, output_type, block_times, block_steps):
        generated = run.x[:, run.prompt_len:]
        batch, device = generated.shape[0], generated.device
        if run.eos is not None:
            is_eos = torch.isin(generated, run.eos)
            has_eos = is_eos.any(dim=1)
        else:
            has_eos = torch.zeros(batch, dtype=torch.bool, device=device)
        if run.stop_early:
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
            sequences=sequences, texts=texts, nfe=run.nfe, steps=run.step, block_times=block_times,
            finished=has_eos, block_steps=block_steps,
        )
