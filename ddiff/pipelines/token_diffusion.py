"""``TokenDiffusionPipeline``: MDLM / UDLM / hybrid / BD3LM sampling on the ddiff ops.

The pipeline only orchestrates: it draws the prior, calls the denoiser, hands the logits to
:class:`~ddiff.pipelines.token_diffusion_scheduler.TokenDiffusionScheduler` (whose steps are
``ddiff.mdlm_step`` / ``ddiff.udlm_step`` / compositions of ddiff ops) and re-imposes the
fixed tokens. It holds no sampling logic of its own.
"""

from __future__ import annotations

import numbers
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from ddiff._backend import BACKENDS
from ddiff._checks import check_seed, logits_location
from ddiff._params import sync_checks
from ddiff.denoiser import attention_pattern, block_causal_mask, crop_cache, denoiser_logits, new_cache
from ddiff.ops.sampling import InvalidLogitsError
from ddiff.pipelines.token_diffusion_scheduler import FORWARD_PROCESSES, TokenDiffusionScheduler
from ddiff.pipelines.utils import (DiscreteDiffusionPipelineOutput, ProgressBarMixin, check_callback_ids,
                                   check_token_ids, decode_sequences, execution_device, is_int, model_output_size,
                                   model_vocab_size, run_callback)

Tensor = torch.Tensor
TOP_P_MODES = ("inclusive", "bd3lm")

__all__ = ["TokenDiffusionPipeline", "TokenDiffusionPipelineOutput", "TokenDiffusionScheduler"]


@dataclass
class TokenDiffusionPipelineOutput(DiscreteDiffusionPipelineOutput):
    """Output of :class:`TokenDiffusionPipeline` (see ``DiscreteDiffusionPipelineOutput``).

    ``sequences``: int64 ``[B, seq_len]``, the whole sequence (fixed tokens included);
    ``texts``: decoded (special tokens skipped) with ``output_type="text"`` and a tokenizer, else
    None; ``nfe``: denoiser forward passes; ``steps``: reverse steps taken; ``block_times``:
    seconds per generated block.
    """


class TokenDiffusionPipeline(ProgressBarMixin):
    r"""Sample from a discrete diffusion LM: MDLM (absorbing), UDLM (uniform), hybrid, BD3LM.

    Args:
        model: the denoiser: ``model(input_ids=...)`` returning logits ``[B, L, V]`` (or an output
            with ``.logits``). A transformers decoder declares its attention pattern in
            ``config.ddiff_attention`` (``"bidirectional"`` or ``"block_causal"`` with
            ``config.ddiff_block_size``, see :mod:`ddiff.denoiser`) and then receives a 4-D mask;
            a model that declares nothing must be bidirectional by itself. The denoiser is
            time-agnostic (MDLM / BD3LM's SUBS models without time conditioning): it gets no
            time, which is what makes logits caching exact.
        tokenizer: optional, to decode ``texts`` and to supply ``mask_token_id`` / ``vocab_size``.
        process: ``"absorbing"``, ``"uniform"`` or ``"hybrid"``; see
            :class:`TokenDiffusionScheduler` for the transitions, their posteriors and what the
            hybrid default (``mask_fraction=0.5``) does differently from absorbing.
        mask_token_id: required by absorbing / hybrid, where it defaults to
            ``tokenizer.mask_token_id``. For uniform, None (the default, whatever the tokenizer
            has: no mask token, noise over all ``vocab_size`` ids) or the last id
            ``vocab_size − 1`` (noise over the others; anything else is rejected).
        alpha_schedule, eps: α(t), see :func:`ddiff.alpha_schedule`.
        backend: ``"auto"`` | ``"torch"`` | ``"triton"``, passed to every ddiff op.
        vocab_size: ids the process works on; defaults to ``len(tokenizer)`` or
            ``model.config.vocab_size``.
        mask_fraction: λ of the hybrid process (default 0.5).

    Sampling (``__call__``):

    * Steps go from t = 1 to t = 0 on ``num_inference_steps`` equal intervals; step ``k`` uses
      ``offset = k`` with one seed, so every step draws fresh noise and a seed fixes the run on
      either backend. (With blocks, ``k`` counts the scheduled steps of the earlier blocks, so a
      block that stops early never shifts a later block's draws.)
    * Early stop (absorbing): a block stops stepping once none of its positions to generate is
      a mask, since an absorbing step only ever changes masks: nothing can change any more
      (``steps`` then counts the steps taken). The uniform and hybrid processes run every step:
      their posterior may resample or re-mask any token until t = 0. (``first_hitting`` takes one
      step per masked position.) The check reads one flag per step, in the same host read that
      decides whether the logits can be reused.
    * Logits caching (MDLM's ``ddpm_cache``): when a step changes no position, the next step
      reuses the logits instead of calling the model, so ``nfe <= num_inference_steps``.
    * ``block_size`` turns on semi-autoregressive block-wise sampling (the seed's
      ``sample_block_token_diffusion.py``; BD3LM's ``_semi_ar_sampler``): blocks are generated
      left to right and only the active block changes. ``num_inference_steps`` is the **total**
      budget, split evenly over the blocks that have positions to generate (the earlier blocks
      take the remainder), so NFE stays ``<= num_inference_steps``; it must be at least the
      number of such blocks. (The diffusers example and BD3LM run ``num_inference_steps`` per
      block instead: pass ``steps_per_block * num_blocks`` to match them.) A bidirectional model
      sees the whole sequence, later blocks still noisy. A block-causal model (BD3LM) sees the
      active block and the finished blocks before it; with ``use_kv_cache`` the finished blocks'
      keys and values are cached: the first forward of a block also runs the block finished
      just before it, clean, and keeps its KV (one forward, counted once), later forwards run
      the active block only. A block-causal model without ``block_size`` uses its own.
    * ``first_hitting`` (absorbing only; BD3LM's ``sampling.first_hitting``, after Zheng et al.
      2024): each step reveals exactly one masked position, chosen uniformly, with a token from
      x̂_0 (top-p applied: BD3LM's nucleus sampling), and the clock jumps to the first-hitting
      time ``t · u^(1/n)`` (reported to the callback; a time-agnostic model does not read it).
      It takes one step per generated position, whatever ``num_inference_steps``.
    * ``top_p`` (nucleus sampling of x̂_0) follows ``top_p_mode``: ``"bd3lm"``, BD3LM's
      ``_nucleus_sample`` (keep the tokens whose cumulative probability *including their own*
      is at most ``top_p``, and always the top one), or ``"inclusive"``, transformers'
      ``TopPLogitsWarper`` (also keep the token that crosses ``top_p``). Default: ``"bd3lm"`` on
      the BD3LM path (a block-causal denoiser), ``"inclusive"`` otherwise. The two keep
      different sets whenever the crossing token exists, i.e. almost always.
    * ``prefix_ids`` (``[P]`` or ``[B, P]``) fixes positions ``[0, P)``. ``infill_mask`` (bool
      ``[B, seq_len]``, True = generate, as in the seed) fixes every other position to its
      token in ``infill_ids`` (``[B or 1, seq_len]``) or in the prefix. Fixed tokens never change.
    * ``callback_on_step_end(pipe, step, t, {"x": x, "block_start": s, "block_end": e})`` (as in
      ``BlockDiffusionPipeline``; ``t`` is the time reached) may return ``{"x": new_x}``: a
      ``torch.Tensor`` of an integer dtype shaped like ``x`` with ids in ``[0, vocab_size)``
      (else TypeError / ValueError naming ``callback_on_step_end``); fixed tokens are
      re-imposed on it. ``{"x": None}`` changes nothing.
    * ``prefix_ids`` / ``infill_ids`` must hold integers (``[1.5]`` is a TypeError, not token 1);
      ``seq_len`` must fit the model's context (``config.max_position_embeddings``).
    * Ids are drawn in ``[0, vocab_size)`` only: logit columns past it (a padded head) are never
      sampled.
    * Invalid logits (NaN / +inf, or entirely -inf after top-p) raise a ValueError. On CPU the
      ops' own checks raise it; on CUDA the ops run without host-syncing value checks
      (``ddiff.sync_checks(False)``): a uniform or hybrid step then returns -1 at an invalid row,
      which is never written into the sequence (nor fed to the model) and raises, naming the
      step, batch row and position, at that step's host read; an absorbing step leaves the
      position masked and the check after the loop names it.

    Differences from the published samplers (the posterior and the nucleus are theirs):

    * MDLM (``_sample`` with ``ddpm_cache``) steps on ``linspace(1, eps, n + 1)`` and then
      replaces the masks left by the argmax of one more forward (``noise_removal``); here the
      grid is ``linspace(1, 0, n + 1)`` and the last step (α = 1) samples every mask left, so
      NFE is at most ``n`` rather than ``n + 1``.
    * BD3LM (``_semi_ar_sampler``) runs ``num_steps`` steps per block on ``linspace(1, 0,
      num_steps)`` with ``s = t − 1/num_steps``; here ``num_inference_steps`` is the total
      budget over the blocks (see ``block_size``) on the grid above. With ``first_hitting`` the
      grid does not matter for a time-agnostic denoiser and the two agree (one uniformly chosen
      mask per step). BD3LM runs one extra forward per finished block to store its KV cache;
      here the next block's first forward does it. Both draw from ddiff's Philox streams
      instead of ``torch.rand`` (BD3LM's float64 Gumbel race), so a seed gives other draws.

    Example::

        >>> pipe = TokenDiffusionPipeline.from_pretrained("tests/assets/tiny_token_mdlm")
        >>> out = pipe(batch_size=4, seq_len=16, num_inference_steps=64, seed=0, output_type="ids")
        >>> out.sequences.shape, out.nfe
        (torch.Size([4, 16]), 40)
    """

    def __init__(self, model, tokenizer=None, *, process: str = "absorbing", mask_token_id: Optional[int] = None,
                 alpha_schedule: str = "log_linear", eps: float = 1e-3, backend: str = "auto",
                 vocab_size: Optional[int] = None, mask_fraction: float = 0.5):
        if process not in FORWARD_PROCESSES:
            raise ValueError(f"`process` must be one of {FORWARD_PROCESSES}, got {process!r}.")
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
        if mask_token_id is None and tokenizer is not None and process != "uniform":
            # uniform: None means no mask token (the tokenizer's is not imposed on the process)
            mask_token_id = getattr(tokenizer, "mask_token_id", None)
        if vocab_size is None:
            vocab_size = len(tokenizer) if tokenizer is not None else getattr(getattr(model, "config", None),
                                                                             "vocab_size", None)
        if vocab_size is None:
            raise ValueError("cannot infer `vocab_size`: pass it, a tokenizer, or a model with config.vocab_size.")
        embedded = model_vocab_size(model)
        if embedded is not None and isinstance(vocab_size, numbers.Integral) and vocab_size > embedded:
            raise ValueError(f"`vocab_size` ({vocab_size}) exceeds the model's vocabulary of {embedded} ids: the "
                             "process would feed it ids its embedding does not have.")
        self.model = model
        self.tokenizer = tokenizer
        self.backend = backend
        self.scheduler = TokenDiffusionScheduler(vocab_size=vocab_size, mask_token_id=mask_token_id,
                                                 forward_process=process, alpha_schedule=alpha_schedule, eps=eps,
                                                 mask_fraction=mask_fraction)
        attention_pattern(model)  # validate the declared pattern early

    @property
    def process(self) -> str:
        return self.scheduler.forward_process

    @property
    def mask_token_id(self) -> Optional[int]:
        return self.scheduler.mask_token_id

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], *, backend: str = "auto", device=None,
                        dtype=None, torch_dtype=None, **overrides) -> "TokenDiffusionPipeline":
        """Load a checkpoint written by ``python -m ddiff.train`` from a local directory: the model
        (transformers ``AutoModelForCausalLM``), the tokenizer when present, and
        ``scheduler_config.json``. ``dtype`` (default: the stored one; ``torch_dtype`` is its
        deprecated name) and ``device`` place the model. ``overrides`` replace scheduler fields
        (``process``, ``alpha_schedule``, ...). Errors name the path, file or key at fault (see
        :mod:`ddiff.pipelines.loading`); nothing is downloaded. The stored ``vocab_size`` must not
        exceed the model's output logits and, when the checkpoint holds a tokenizer, must equal
        its length (what ``ddiff.train`` writes): a ValueError otherwise (a scheduler config from
        another run)."""
        from transformers import AutoTokenizer

        from ddiff.pipelines.loading import load_transformers_model, read_json, resolve_checkpoint_dir, resolve_dtype

        dtype = resolve_dtype(dtype, torch_dtype, caller="TokenDiffusionPipeline.from_pretrained")
        path = resolve_checkpoint_dir(path, "TokenDiffusionPipeline checkpoint")
        sched = TokenDiffusionScheduler.from_config(path).config  # cheap: config errors before the model loads
        model = load_transformers_model(path, dtype=dtype, device=device, what="TokenDiffusionPipeline checkpoint")
        tokenizer = None
        tokenizer_files = [os.path.join(path, n) for n in ("tokenizer.json", "tokenizer_config.json")
                           if os.path.exists(os.path.join(path, n))]
        if tokenizer_files:
            for file in tokenizer_files:
                read_json(file)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        stored, head = sched["vocab_size"], model_output_size(model)
        if head is not None and stored > head:
            raise ValueError(f"{os.path.join(path, 'scheduler_config.json')}: vocab_size={stored} exceeds the "
                             f"model's {head} output logits; the scheduler config does not belong to these weights.")
        if tokenizer is not None and len(tokenizer) != stored:
            raise ValueError(f"{os.path.join(path, 'scheduler_config.json')}: vocab_size={stored} but the "
                             f"checkpoint's tokenizer has {len(tokenizer)} tokens (ddiff.train writes the tokenizer's "
                             "length); the scheduler config does not belong to this checkpoint.")
        kwargs = dict(process=sched["forward_process"], mask_token_id=sched["mask_token_id"],
                      alpha_schedule=sched["alpha_schedule"], eps=sched["eps"], vocab_size=sched["vocab_size"],
                      mask_fraction=sched["mask_fraction"])
        kwargs.update(overrides)
        return cls(model, tokenizer, backend=backend, **kwargs)

    # -----------------------------------------------------------------------------------------
    # Inputs
    # -----------------------------------------------------------------------------------------

    @staticmethod
    def _as_ids(name, value, batch_size, device, max_len=None) -> Tensor:
        if not isinstance(value, torch.Tensor):
            try:  # no dtype: a float such as 1.5 must be refused, not truncated to 1
                value = torch.tensor(value)
            except Exception:
                raise TypeError(f"`{name}` must be a LongTensor or a (nested) list of ints.") from None
            if value.numel() == 0:  # [] is float by default
                value = value.long()
        if value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"`{name}` must hold integer token ids, got {value.dtype}.")
        if value.dim() == 1:
            value = value[None]
        if value.dim() != 2 or value.shape[0] not in (1, batch_size):
            raise ValueError(f"`{name}` must have shape [len] or [1 or batch_size={batch_size}, len], "
                             f"got {tuple(value.shape)}.")
        return value.to(device=device, dtype=torch.long).expand(batch_size, value.shape[1])

    def check_inputs(self, batch_size, seq_len, num_inference_steps, prefix_ids, infill_mask, infill_ids,
                     temperature, top_p, block_size, first_hitting, seed, generator, output_type, progress,
                     callback_on_step_end):
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len),
                            ("num_inference_steps", num_inference_steps)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")
        if block_size is not None:
            if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) or block_size < 1:
                raise ValueError(f"`block_size` must be None or an int >= 1, got {block_size!r}.")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0:
            raise ValueError(f"`temperature` must be a float >= 0, got {temperature!r}.")
        if temperature == 0 and self.process != "absorbing":
            raise ValueError(f"temperature 0 (greedy) is only defined for the absorbing process, not {self.process}.")
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                                  or not 0.0 < top_p <= 1.0):
            raise ValueError(f"`top_p` must be None or a float in (0, 1], got {top_p!r}.")
        if first_hitting and self.process != "absorbing":
            raise ValueError("`first_hitting` is defined for the absorbing process only.")
        if seed is not None and generator is not None:
            raise ValueError("pass either `seed` or `generator`, not both.")
        if seed is not None:
            check_seed("seed", seed)  # any integer type in [-2**63, 2**64), as every op
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}.")
        if output_type not in ("text", "ids"):
            raise ValueError(f"`output_type` must be 'text' or 'ids', got {output_type!r}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError("`callback_on_step_end` must be callable.")
        if infill_ids is not None and infill_mask is None:
            raise ValueError("`infill_ids` is only used together with `infill_mask`.")
        if infill_mask is not None:
            if not isinstance(infill_mask, torch.Tensor) or infill_mask.dtype != torch.bool:
                raise TypeError("`infill_mask` must be a bool tensor (True = position to generate).")
            if tuple(infill_mask.shape) != (batch_size, seq_len):
                raise ValueError(f"`infill_mask` must have shape {(batch_size, seq_len)} (batch_size, seq_len), "
                                 f"got {tuple(infill_mask.shape)}.")
        if prefix_ids is not None and not isinstance(prefix_ids, (torch.Tensor, list, tuple)):
            raise TypeError("`prefix_ids` must be a LongTensor or a list of ints.")

    def _fixed_tokens(self, batch_size, seq_len, prefix_ids, infill_mask, infill_ids, device):
        """``(fixed, values)``: bool ``[B, L]`` of positions that never change and their tokens."""
        fixed = torch.zeros(batch_size, seq_len, dtype=torch.bool, device=device)
        values = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        if infill_mask is not None:
            keep = ~infill_mask.to(device)
            if infill_ids is not None:
                ids = self._as_ids("infill_ids", infill_ids, batch_size, device)
                if ids.shape[1] != seq_len:
                    raise ValueError(f"`infill_ids` must have seq_len={seq_len} columns, got {ids.shape[1]}.")
                self._check_fixed_ids("infill_ids", ids, keep)
                values = torch.where(keep, ids, values)
                fixed |= keep
        if prefix_ids is not None:
            prefix = self._as_ids("prefix_ids", prefix_ids, batch_size, device)
            if prefix.shape[1] > seq_len:
                raise ValueError(f"`prefix_ids` has length {prefix.shape[1]}, longer than seq_len={seq_len}.")
            self._check_fixed_ids("prefix_ids", prefix)
            values[:, : prefix.shape[1]] = prefix
            fixed[:, : prefix.shape[1]] = True
        if infill_mask is not None:
            missing = ~infill_mask.to(device) & ~fixed
            if bool(missing.any()):
                b, pos = (int(i) for i in torch.nonzero(missing)[0])
                raise ValueError(f"`infill_mask` keeps position {pos} of row {b} fixed but no token was given for "
                                 "it: pass `infill_ids` (or a prefix that covers it).")
        sched = self.scheduler
        if bool(fixed.any()):
            given = values[fixed]
            if sched.mask_token_id is not None and bool((given == sched.mask_token_id).any()):
                raise ValueError("fixed tokens (`prefix_ids` / `infill_ids`) must not be the mask token.")
        return fixed, values

    def _check_fixed_ids(self, name, ids, where=None):
        """Fixed tokens lie in the ids the process works on (the uniform noise's range for uniform)."""
        sched = self.scheduler
        limit = sched.num_uniform_tokens if self.process == "uniform" else sched.vocab_size
        check_token_ids(name, ids, limit, where, what=f"the ids of the {self.process} process")

    def prepare_latents(self, batch_size, seq_len, fixed, values, seed_value, device) -> Tensor:
        """``x_1``: the scheduler's prior (``sample_prior``, drawn with a generator seeded by the
        run's seed), with the fixed tokens in place."""
        generator = torch.Generator(device=device).manual_seed(seed_value)
        x = self.scheduler.sample_prior((batch_size, seq_len), generator=generator, device=device)
        return torch.where(fixed, values, x)

    def _resolve_seed(self, seed, generator, device) -> int:
        if seed is not None:
            return check_seed("seed", seed)
        gen_device = generator.device if generator is not None else device
        drawn = torch.randint(0, 2**62, (1,), generator=generator, device=gen_device)
        return int(drawn.item())

    # -----------------------------------------------------------------------------------------
    # Denoiser calls
    # -----------------------------------------------------------------------------------------

    def _window_logits(self, x, start, end, state):
        """Logits ``[B, end - start, V]`` of the active window; one model call."""
        if not state["block_causal"]:
            return denoiser_logits(self.model, x)[:, start:end]
        bs = state["block_size"]
        cache = state["cache"]
        if cache is None:
            mask = block_causal_mask(0, end, end, bs, device=x.device)
            return denoiser_logits(self.model, x[:, :end], attention_mask=mask)[:, start:end]
        done = state["cache_len"]  # clean positions [0, done) are cached
        mask = block_causal_mask(done, end, end, bs, device=x.device)
        logits = denoiser_logits(self.model, x[:, done:end], attention_mask=mask, past_key_values=cache)
        crop_cache(cache, start)  # keep the clean KV of [done, start), drop the noisy block's
        state["cache_len"] = start
        return logits[:, start - done:]

    # -----------------------------------------------------------------------------------------
    # Sampling
    # -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, seq_len: int = 64, num_inference_steps: int = 128,
                 prefix_ids: Optional[Union[Tensor, Sequence]] = None, infill_mask: Optional[Tensor] = None,
                 temperature: float = 1.0, top_p: Optional[float] = None, block_size: Optional[int] = None,
                 first_hitting: bool = False, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, output_type: str = "text",
                 callback_on_step_end: Optional[Callable] = None, progress: bool = True, *,
                 infill_ids: Optional[Tensor] = None, use_kv_cache: bool = True,
                 top_p_mode: Optional[str] = None) -> TokenDiffusionPipelineOutput:
        """Generate ``batch_size`` sequences of ``seq_len`` tokens; see the class docstring.

        ``top_p_mode``: ``"bd3lm"`` or ``"inclusive"`` (None: ``"bd3lm"`` for a block-causal
        denoiser, ``"inclusive"`` otherwise).
        """
        self.check_inputs(batch_size, seq_len, num_inference_steps, prefix_ids, infill_mask, infill_ids,
                          temperature, top_p, block_size, first_hitting, seed, generator, output_type, progress,
                          callback_on_step_end)
        if top_p_mode is not None and top_p_mode not in TOP_P_MODES:
            raise ValueError(f"`top_p_mode` must be None or one of {TOP_P_MODES}, got {top_p_mode!r}.")
        context = self._context_length()
        if context is not None and seq_len > context:
            raise ValueError(f"`seq_len` ({seq_len}) exceeds the model's context of {context} positions "
                             "(config.max_position_embeddings).")
        device = execution_device(self.model)
        sched = self.scheduler
        fixed, values = self._fixed_tokens(batch_size, seq_len, prefix_ids, infill_mask, infill_ids, device)
        seed_value = self._resolve_seed(seed, generator, device)

        pattern, model_block = attention_pattern(self.model)
        block_causal = pattern == "block_causal"
        if top_p_mode is None:  # BD3LM's own nucleus on the BD3LM path
            top_p_mode = "bd3lm" if block_causal else "inclusive"
        if block_size is None and block_causal:
            block_size = model_block
        window = block_size or seq_len
        blocks = [(s, min(s + window, seq_len)) for s in range(0, seq_len, window)]
        active = [(s, e) for s, e in blocks if not bool(fixed[:, s:e].all())]

        if first_hitting:
            budgets = [int((~fixed[:, s:e]).sum(-1).max()) for s, e in active]
        else:
            if num_inference_steps < len(active):
                raise ValueError(f"num_inference_steps={num_inference_steps} is the total step budget and must be "
                                 f">= the number of blocks to generate ({len(active)}).")
            base, extra = divmod(num_inference_steps, max(len(active), 1))
            budgets = [base + (i < extra) for i in range(len(active))]

        x = self.prepare_latents(batch_size, seq_len, fixed, values, seed_value, device)

        state = dict(block_causal=block_causal, block_size=window,
                     cache=new_cache(self.model) if block_causal and use_kv_cache else None, cache_len=0)
        bar = self.progress_bar(total=sum(budgets), defaults={"desc": "token diffusion", "leave": False},
                                **({} if progress else {"disable": True}))
        nfe, step, block_times = 0, 0, []
        planned = 0  # offset of the block's first step as scheduled: an early stop never shifts later draws
        try:
            with sync_checks(device.type != "cuda"):  # host syncs are free on CPU: keep the checks there
                for (start, end), budget in zip(active, budgets):
                    started = time.perf_counter()
                    can_change = ~fixed[:, start:end]
                    logits = None
                    if first_hitting:
                        t = torch.ones(batch_size, dtype=torch.float64, device=device)
                        for _ in range(budget):
                            xw = x[:, start:end]
                            num_masked = ((xw == sched.mask_token_id) & can_change).sum(-1)
                            if not bool(num_masked.any()):
                                break
                            t = sched.first_hitting_time(t, num_masked, seed=seed_value, offset=step)
                            if logits is None:
                                logits = self._window_logits(x, start, end, state)
                                nfe += 1
                            new = sched.first_hitting_step(logits, xw, temperature=temperature, top_p=top_p,
                                                           top_p_mode=top_p_mode, seed=seed_value, offset=step,
                                                           backend=self.backend, can_change=can_change)
                            x, logits, _ = self._commit(x, new, start, end, fixed, values, logits, step)
                            x, logits, _ = self._callback(callback_on_step_end, step, t, x, start, end, fixed,
                                                          values, logits)
                            step += 1
                            bar.update(1)
                    else:
                        sched.set_timesteps(budget, device=device)
                        alphas = sched.alphas.tolist()
                        times = sched.timesteps.tolist()
                        for k in range(budget):
                            if logits is None:
                                logits = self._window_logits(x, start, end, state)
                                nfe += 1
                            new = sched.step(logits, x[:, start:end], alphas[k], alphas[k + 1],
                                             temperature=temperature, top_p=top_p, top_p_mode=top_p_mode,
                                             seed=seed_value, offset=planned + k, backend=self.backend)
                            x, logits, left = self._commit(x, new, start, end, fixed, values, logits, step)
                            x, logits, replaced = self._callback(callback_on_step_end, step, times[k + 1], x, start,
                                                                 end, fixed, values, logits)
                            if replaced:
                                left = self._can_change(x, start, end, fixed)
                            step += 1
                            bar.update(1)
                            if not left:  # absorbing: no mask left in the block, nothing can change any more
                                break
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    block_times.append(time.perf_counter() - started)
                    planned += budget
        except InvalidLogitsError as error:  # the ops saw the active window's columns: report sequence positions
            if error.leading_shape is None or len(error.leading_shape) != 2:
                raise
            b, col = divmod(error.row, error.leading_shape[1])
            raise InvalidLogitsError(b * seq_len + start + col, (batch_size, seq_len)) from None
        finally:
            bar.close()

        left = (x == sched.mask_token_id) & ~fixed if self.process == "absorbing" else None
        if left is not None and bool(left.any()):
            where = logits_location(int(torch.nonzero(left.reshape(-1))[0]), left.shape)
            raise ValueError(f"the token {where} is still masked after the last step: the model's logits there held "
                             "NaN or +inf (or were entirely -inf outside the mask token).")
        texts = decode_sequences(self.tokenizer, x) if output_type == "text" else None
        return TokenDiffusionPipelineOutput(sequences=x, texts=texts, nfe=nfe, steps=step, block_times=block_times)

    def _commit(self, x, new, start, end, fixed, values, logits, step):
        """Write the window back, re-impose fixed tokens, and drop the logits if anything changed.

        Returns ``(x, logits, left)``; ``left`` is False once nothing can change in the window
        (absorbing: no mask left at a position to generate; always True for uniform / hybrid).
        A position to generate whose logits row was invalid (the step's ``-1``) is never written:
        the ValueError names the step, the batch row and the position. One host read per step
        (the same one that decides whether the logits can be reused)."""
        old, keep = x[:, start:end], fixed[:, start:end]
        invalid = (new < 0) & ~keep
        new = torch.where(keep, values[:, start:end], torch.where(invalid, old, new))
        flags = [invalid.any(), (new != old).any()]
        if self.process == "absorbing":
            flags.append(((new == self.scheduler.mask_token_id) & ~keep).any())
        flags = torch.stack(flags).tolist()
        if flags[0]:
            b, col = (int(i) for i in torch.nonzero(invalid)[0])
            where = logits_location(b * x.shape[1] + start + col, x.shape)
            raise ValueError(f"at step {step}, the model's logits predicting the token {where} held NaN or +inf "
                             "(or were entirely -inf after top-p): no token can be drawn there.")
        if flags[1]:
            logits = None
        x = x.clone()
        x[:, start:end] = new
        return x, logits, flags[2] if self.process == "absorbing" else True

    def _can_change(self, x, start, end, fixed) -> bool:
        """Whether a step can still change the window (see :meth:`_commit`); one host read."""
        if self.process != "absorbing":
            return True
        return bool(((x[:, start:end] == self.scheduler.mask_token_id) & ~fixed[:, start:end]).any())

    def _context_length(self):
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            config = config.get_text_config()
        for name in ("max_position_embeddings", "max_sequence_length", "n_positions"):
            value = getattr(config, name, None)
            if is_int(value):
                return int(value)
        return None

    def _callback(self, callback, step, t, x, start, end, fixed, values, logits):
        """Run ``callback_on_step_end``; returns ``(x, logits, replaced)``. A returned ``x`` must
        be an integer tensor shaped like ``x`` with ids in ``[0, vocab_size)`` (checked: one host
        read); fixed tokens are re-imposed on it."""
        if callback is None:
            return x, logits, False
        out = run_callback(callback, self, step, t, {"x": x, "block_start": start, "block_end": end})
        if out.get("x") is None:
            return x, logits, False
        given = check_callback_ids(out["x"], x, self.scheduler.vocab_size,
                                   what=f"the ids of the {self.process} process")
        new = torch.where(fixed, values, given)
        if not torch.equal(new, x):
            logits = None
        return new, logits, True
