r"""transformers' DiffusionGemma with its denoising step on ddiff's ops.

``DiffusionGemmaForBlockDiffusion.generate`` (transformers' ``generation_diffusion_gemma.py``)
denoises a canvas of ``canvas_length`` tokens per block. Each step of its
``_denoising_step`` runs over the canvas logits ``[B, L, V]`` (``V = 262144`` for Gemma):

1. ``processed = logits / T`` (``LinearTemperatureScheduleLogitsProcessor``:
   ``T = t_min + (t_max - t_min) · n / N`` with ``n`` the steps remaining, ``N`` =
   ``max_denoising_steps``);
2. ``softmax(processed)`` in fp32 (materialised), ``torch.multinomial``, ``argmax``;
3. ``EntropyBoundSampler.accept_canvas``: ``Categorical(logits).entropy()``, a sort, a cumsum
   and a scatter: accept the k lowest-entropy positions with ``Σ H − max H <= entropy_bound``
   (arXiv 2505.24857);
4. ``renoise_canvas``: every other position gets a ``torch.randint`` token;
5. ``StableAndConfidentStoppingCriteria``: ``Categorical(logits).entropy()`` again; stop a row
   when its argmax canvas equals the previous ``stability_threshold`` ones and its mean
   entropy is below ``confidence_threshold``;
6. ``processed`` becomes the next step's self-conditioning input.

:func:`generate` runs that same ``generate`` loop (encoder prefill, KV cache, canvases, EOS
and padding, streamers, ``tokens_per_forward``) with the step replaced by
:func:`entropy_bound_step` and :func:`stable_and_confident`:

1. the division is done **in place** on the model's fp32 logits, bit for bit transformers'
   ``processed`` (the self-conditioning input of the next step needs exactly these logits: the
   decoder applies its own softmax to them, so they cannot be skipped);
2. + 3. + 5. **one** pass of :func:`ddiff.predict_tokens` over each row gives the sampled
   token, the first argmax and the entropy of ``softmax(processed)``;
   :func:`ddiff.select_transfer` with ``entropy_bound`` picks the accepted set by a per-row
   bisection (no sort);
4. :func:`ddiff.renoise_uniform` draws the rejected positions;
5. the stability history and the mean of the same entropies (no second pass).

So a step reads the logits three times (division, the fused pass, the cast for
self-conditioning when the model is not fp32) instead of transformers' six or more, never
materialises probabilities, and has no host synchronisation: the only sync is the loop's own
``torch.all(finished)`` check (transformers'), and the value checks of the ops are deferred to
it.

Intended differences from transformers (everything else is the same computation):

* **Randomness**: the sampled tokens and the renoised tokens come from ddiff's counter-based
  Philox streams (``seed``, one ``offset`` per draw), not from ``torch.multinomial`` /
  ``torch.randint``. The distributions are the same (tested by chi-square); the draws differ.
* **Entropies** come from ddiff's fused kernel (fp32 accumulation) instead of
  ``Categorical.entropy``; they agree to float rounding, so a decision can only differ when
  an entropy sum lies within rounding of the bound or a mean entropy within rounding of
  ``confidence_threshold``. The bound's sums are accumulated in float64.
* **Ties**: where equal entropies straddle the bound, the lowest positions are accepted
  (transformers' ``torch.sort`` keeps an arbitrary subset of the tie). The number accepted is
  the same.

With ``do_sample=False`` the denoiser canvas is the argmax instead of a sample (transformers'
loop always samples); with the renoising draws made equal (see the tests), this reproduces
transformers' ``generate`` token for token.

Example::

    >>> from transformers import AutoProcessor, DiffusionGemmaForBlockDiffusion
    >>> from ddiff.integrations import diffusion_gemma
    >>> model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    >>> out = diffusion_gemma.generate(model, input_ids, max_new_tokens=256, max_denoising_steps=48,
    ...                                entropy_bound=0.1, t_min=0.4, t_max=0.8, seed=0)
    >>> out.sequences, out.tokens_per_forward
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Optional

import torch

from ddiff import ops
from ddiff._checks import check_seed, sync_checks

__all__ = [
    "DdiffEntropyBoundSampler",
    "EntropyBoundStepOutput",
    "entropy_bound_step",
    "generate",
    "linear_temperature",
    "stable_and_confident",
    "use_ddiff",
]

Tensor = torch.Tensor
INVALID_LOGITS = "the model produced logits with NaN or +inf (or an all -inf row) on the canvas."


def _transformers_generation():
    from transformers.models.diffusion_gemma import generation_diffusion_gemma

    return generation_diffusion_gemma


# ---------------------------------------------------------------------------------------------
# The step, on given logits
# ---------------------------------------------------------------------------------------------


@dataclass
class EntropyBoundStepOutput:
    """One entropy-bound denoising step.

    Attributes:
        canvas: int64 ``[B, L]``: the next canvas (accepted sampled tokens, the rest renoised).
        tokens: int64 ``[B, L]``: the denoiser's sampled canvas (``argmax`` when not sampling).
        argmax: int64 ``[B, L]``: the first argmax of the logits (the stopping rule's canvas).
        entropy: fp32 ``[B, L]``: entropy of ``softmax(logits / temperature)``.
        accepted: bool ``[B, L]``: positions whose sampled token was kept.
    """

    canvas: Tensor
    tokens: Tensor
    argmax: Tensor
    entropy: Tensor
    accepted: Tensor


def linear_temperature(cur_step: int, t_min: float, t_max: float, max_denoising_steps: int, device=None) -> Tensor:
    """``LinearTemperatureScheduleLogitsProcessor``'s temperature as the same 0-dim fp32 tensor.

    ``cur_step`` counts the steps remaining (``N .. 1``). Computed with the same tensor
    operations as transformers (an int32 step divided by ``N``, then ``t_min + (t_max −
    t_min) · ratio`` in fp32), so dividing by it gives transformers' processed logits exactly.
    """
    step = torch.tensor(cur_step, device=device, dtype=torch.int32)
    return t_min + ((t_max - t_min) * (step / max_denoising_steps))


def entropy_bound_step(logits: Tensor, *, entropy_bound, temperature=1.0, do_sample: bool = True,
                       accept_mask: Optional[Tensor] = None, seed=None, offset: int = 0,
                       generator: Optional[torch.Generator] = None, backend: str = "auto") -> EntropyBoundStepOutput:
    """The entropy-bound sampler's step on ``[B, L, V]`` logits, in one pass over them.

    Samples a token per position from ``softmax(logits / temperature)`` (greedy with
    ``do_sample=False``), takes the first argmax and the entropy of that distribution
    (:func:`ddiff.predict_tokens`), accepts positions by the entropy bound
    (:func:`ddiff.select_transfer`, ``entropy_bound=``) and renoises the others with uniform
    tokens (:func:`ddiff.renoise_uniform`). Token sampling and renoising both draw at
    ``(seed, offset)``, on different noise streams.

    Args:
        logits: ``[B, L, V]`` float32 / float16 / bfloat16.
        entropy_bound: float >= 0 or ``[B]`` tensor (see ``select_transfer``).
        temperature: float > 0 or ``[B * L]`` tensor. DiffusionGemma's step passes logits already
            divided by its scheduled temperature and ``temperature=1``.
        do_sample: False takes the argmax as the denoiser's canvas.
        accept_mask: bool ``[B, L]``, positions that may be accepted (default: all).
        seed, offset, generator, backend: as in :func:`ddiff.sample`.

    Returns:
        :class:`EntropyBoundStepOutput`.

    Example::

        >>> out = entropy_bound_step(logits / 0.8, entropy_bound=0.1, seed=0, offset=step)
        >>> canvas = out.canvas
    """
    if logits.dim() != 3:
        raise ValueError(f"`logits` must be [B, L, V], got shape {tuple(logits.shape)}.")
    if not isinstance(do_sample, bool):
        raise TypeError(f"`do_sample` must be a bool, got {type(do_sample).__name__}.")
    batch, length, vocab = logits.shape
    if generator is not None:  # one seed for both draws of the step
        if seed is not None:
            raise ValueError("pass either `seed` or `generator`, not both.")
        seed = torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device).to(logits.device)
    elif seed is None:
        seed = torch.randint(0, 2**63 - 1, (1,), device=logits.device)
    elif not isinstance(seed, torch.Tensor) or (seed.dim() == 0 and seed.device.type == "cpu"):
        seed = check_seed("seed", seed)  # any integer type in [-2**63, 2**64), as every op
    tokens, neg_entropy, argmax = ops.predict_tokens(
        logits, temperature=temperature if do_sample else 0.0, confidence="neg_entropy",
        confidence_from="sampling", return_argmax=True, seed=seed, offset=offset, backend=backend)
    if accept_mask is None:
        accept_mask = torch.ones((batch, length), dtype=torch.bool, device=logits.device)
    accepted = ops.select_transfer(neg_entropy, accept_mask, entropy_bound=entropy_bound, backend=backend)
    canvas = ops.renoise_uniform(tokens, accepted, vocab_size=vocab, seed=seed, offset=offset, backend=backend)
    return EntropyBoundStepOutput(canvas=canvas, tokens=tokens, argmax=argmax, entropy=-neg_entropy,
                                  accepted=accepted)


def stable_and_confident(history: Optional[Tensor], argmax: Tensor, entropy: Tensor, *, stability_threshold: int,
                         confidence_threshold: float) -> tuple[Tensor, Optional[Tensor]]:
    """``StableAndConfidentStoppingCriteria`` on the entropies the step already has.

    A row stops when its argmax canvas equals each of the last ``stability_threshold`` ones
    (``history``, ``[S, B, L]``, initialised to -1 so the first ``S`` steps never count as
    stable; ``S = 0`` is always stable) and the mean of its token entropies is below
    ``confidence_threshold``. Returns ``(stop [B] bool, updated history)``: the same state
    transformers keeps in ``argmax_canvas_history`` (pass ``None`` at the start of a canvas).
    """
    batch = argmax.shape[0]
    if stability_threshold == 0:
        stable = torch.ones(batch, dtype=torch.bool, device=argmax.device)
    else:
        if history is None:
            history = torch.full((stability_threshold, *argmax.shape), -1, dtype=argmax.dtype, device=argmax.device)
        stable = (history == argmax[None]).all(dim=-1).all(dim=0)
        history = torch.roll(history, shifts=-1, dims=0)
        history[-1] = argmax
    confident = torch.mean(entropy, dim=-1) < confidence_threshold
    return stable & confident, history


# ---------------------------------------------------------------------------------------------
# The sampler and the patched step
# ---------------------------------------------------------------------------------------------


class DdiffEntropyBoundSampler:
    """The entropy-bound sampler of :func:`generate`: transformers' interface, ddiff's ops and noise.

    Holds the RNG state of one ``generate`` call: a seed and an offset that advances by one
    per draw (a canvas initialisation or a denoising step), so a call is a pure function of
    its seed. ``accept_canvas`` / ``renoise_canvas`` keep transformers' interface (used when
    transformers compiles its step functions); :func:`generate`'s step calls
    :func:`entropy_bound_step` directly.
    """

    def __init__(self, config, canvas_length: int, vocab_size: int, max_denoising_steps: int, *,
                 seed: Tensor, backend: str = "auto", do_sample: bool = True):
        self.entropy_bound = config.entropy_bound
        self.canvas_length = canvas_length
        self.vocab_size = vocab_size
        self.max_denoising_steps = max_denoising_steps
        self.accepted_token_mask = None
        self.seed = seed
        self.offset = 0
        self.backend = backend
        self.do_sample = do_sample
        self.invalid = None  # [1] bool on the device: a step saw NaN / inf logits (checked lazily)

    def next_offset(self) -> int:
        offset = self.offset
        self.offset += 1
        return offset

    def initialize_canvas(self, batch_size: int, device) -> Tensor:
        """``x_T``: ``[batch_size, canvas_length]`` uniform tokens (:func:`ddiff.renoise_uniform`)."""
        shape_only = torch.empty((batch_size, self.canvas_length), dtype=torch.int64, device=device)
        return ops.renoise_uniform(shape_only, None, vocab_size=self.vocab_size, seed=self.seed.to(device),
                                   offset=self.next_offset(), backend=self.backend)

    def accept_canvas(self, current_canvas: Tensor, denoiser_canvas: Tensor, logits: Tensor, cur_step) -> Tensor:
        _, neg_entropy = ops.predict_tokens(logits, temperature=0.0, confidence="neg_entropy",
                                            confidence_from="sampling", backend=self.backend)
        self.accepted_token_mask = ops.select_transfer(neg_entropy, torch.ones_like(current_canvas, dtype=torch.bool),
                                                       entropy_bound=self.entropy_bound, backend=self.backend)
        return torch.where(self.accepted_token_mask, denoiser_canvas, current_canvas)

    def renoise_canvas(self, accepted_canvas: Tensor, cur_step) -> Tensor:
        return ops.renoise_uniform(accepted_canvas, self.accepted_token_mask, vocab_size=self.vocab_size,
                                   seed=self.seed.to(accepted_canvas.device), offset=self.next_offset(),
                                   backend=self.backend)

    def finished_rows(self, finished: Tensor) -> list[int]:
        """The rows already finished, read in one transfer together with the deferred validity
        check (the loop synchronised on ``finished`` after the previous step, so this waits for
        nothing); raises before an invalid canvas reaches the model."""
        flags = finished.tolist() if self.invalid is None else torch.cat([self.invalid, finished]).tolist()
        if self.invalid is not None:
            if flags[0]:
                raise ValueError(INVALID_LOGITS)
            flags = flags[1:]
        return [row for row, done in enumerate(flags) if done]

    def check(self) -> None:
        """Raise if a step met logits with NaN / +inf (deferred so the loop never waits on it)."""
        if self.invalid is not None and bool(self.invalid.any()):
            raise ValueError(INVALID_LOGITS)


def _temperature_processors(logits_processor):
    """The list's processors if every one is the linear temperature schedule, else None."""
    gen = _transformers_generation()
    procs = list(logits_processor) if logits_processor is not None else []
    if all(isinstance(p, gen.LinearTemperatureScheduleLogitsProcessor) for p in procs):
        return procs
    return None


def _ddiff_denoising_step(self, decoder_forward, current_canvas, argmax_canvas, input_ids, decoder_position_ids,
                          self_conditioning_logits, mask_mapping, cache, finished_denoising, cur_step, sampler,
                          logits_processor, diffusion_stopping_criteria, **model_kwargs):
    """Drop-in for ``DiffusionGemmaGenerationMixin._denoising_step`` (same arguments and returns)."""
    gen = _transformers_generation()
    frozen_rows = sampler.finished_rows(finished_denoising)
    cur_step_t = torch.tensor(cur_step, device=current_canvas.device, dtype=torch.int32)
    torch.compiler.cudagraph_mark_step_begin()

    decoder_outputs = decoder_forward(
        decoder_input_ids=current_canvas,
        self_conditioning_logits=self_conditioning_logits,
        decoder_attention_mask=mask_mapping,
        cache=cache,
        decoder_position_ids=decoder_position_ids,
        **model_kwargs,
    )
    logits = decoder_outputs.logits
    schedule = _temperature_processors(logits_processor)
    if schedule is None:  # user processors: run the list as transformers does
        processed = logits_processor(input_ids, logits, cur_step=cur_step_t)
    else:
        # transformers' `scores / temperature`, bit for bit; in place on the model's fresh fp32
        # logits, except when the decoder is a compiled (CUDA-graph) callable owning its output.
        processed = logits
        in_place = decoder_forward == self.forward  # bound methods compare equal, never identical
        for proc in schedule:
            temperature = proc.t_min + ((proc.t_max - proc.t_min) * (cur_step_t / proc.max_denoising_steps))
            processed = processed.div_(temperature) if in_place else processed / temperature
            in_place = True

    with sync_checks(False):
        step = entropy_bound_step(processed, entropy_bound=sampler.entropy_bound, do_sample=sampler.do_sample,
                                  seed=sampler.seed.to(processed.device), offset=sampler.next_offset(),
                                  backend=sampler.backend)
    bad = ((step.tokens < 0).any() | (step.argmax < 0).any()).reshape(1)
    sampler.invalid = bad if sampler.invalid is None else sampler.invalid | bad
    sampler.accepted_token_mask = step.accepted
    new_canvas, new_argmax, entropy = step.canvas, step.argmax, step.entropy

    if diffusion_stopping_criteria is not None:
        if frozen_rows:  # finished rows keep their canvas, argmax and self-conditioning logits
            keep = finished_denoising[:, None]
            new_argmax = torch.where(keep, argmax_canvas, new_argmax)
            new_canvas = torch.where(keep, current_canvas, new_canvas)
            if self_conditioning_logits is not None:  # only the finished rows are copied
                rows = torch.tensor(frozen_rows, device=processed.device)
                processed.index_copy_(0, rows, self_conditioning_logits.index_select(0, rows).to(processed.dtype))
        if isinstance(diffusion_stopping_criteria, gen.StableAndConfidentStoppingCriteria):
            stop, diffusion_stopping_criteria.argmax_canvas_history = stable_and_confident(
                diffusion_stopping_criteria.argmax_canvas_history, new_argmax, entropy,
                stability_threshold=diffusion_stopping_criteria.stability_threshold,
                confidence_threshold=diffusion_stopping_criteria.confidence_threshold)
        else:  # another adaptive stopping rule: give it the logits, as transformers does
            stop = diffusion_stopping_criteria(new_argmax, processed)
        finished_denoising |= stop
    embeddings_dtype = self.model.decoder.embed_tokens.weight.dtype
    return new_canvas, new_argmax, processed.to(embeddings_dtype), finished_denoising


@contextlib.contextmanager
def use_ddiff(model, *, seed=None, generator: Optional[torch.Generator] = None, backend: str = "auto",
              do_sample: bool = True):
    """Within the block, ``model.generate`` runs its denoising steps on ddiff's ops.

    Patches the instance (not the class) for the duration: its sampler becomes a
    :class:`DdiffEntropyBoundSampler` and its ``_denoising_step`` the fused step described in
    the module docstring. ``seed`` (int), ``generator`` or, with neither, torch's default
    generator fixes the noise of every ``generate`` call made inside the block.

    Example::

        >>> with use_ddiff(model, seed=0):
        ...     out = model.generate(input_ids, max_new_tokens=64)
    """
    gen = _transformers_generation()
    if not isinstance(model, gen.DiffusionGemmaGenerationMixin):
        raise TypeError(f"`model` must be a transformers DiffusionGemma model (DiffusionGemmaGenerationMixin), "
                        f"got {type(model).__name__}.")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"`backend` must be one of ('auto', 'torch', 'triton'), got {backend!r}.")
    if not isinstance(do_sample, bool):
        raise TypeError(f"`do_sample` must be a bool, got {type(do_sample).__name__}.")
    if seed is not None and generator is not None:
        raise ValueError("pass either `seed` or `generator`, not both.")
    if seed is not None:
        seed = check_seed("seed", seed)  # any integer type in [-2**63, 2**64), as every op
    samplers = []

    def prepare_sampler(self, generation_config):
        if seed is not None:
            bits = seed & (2**64 - 1)
            seed_t = torch.tensor([bits - 2**64 if bits >= 2**63 else bits], dtype=torch.int64)
        elif generator is not None:
            seed_t = torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device).cpu()
        else:
            seed_t = torch.randint(0, 2**63 - 1, (1,))
        sampler = DdiffEntropyBoundSampler(generation_config.sampler_config, self.config.canvas_length,
                                           self.config.text_config.vocab_size, generation_config.max_denoising_steps,
                                           seed=seed_t.to(self.device), backend=backend, do_sample=do_sample)
        samplers.append(sampler)
        return sampler

    compiled_names = ("_compiled_accept_canvas", "_compiled_renoise_canvas", "_compiled_diffusion_stopping_criteria")
    compiled_before = {name for name in compiled_names if hasattr(model, name)}
    model._prepare_sampler = types.MethodType(prepare_sampler, model)
    model._denoising_step = types.MethodType(_ddiff_denoising_step, model)
    try:
        yield samplers
        for sampler in samplers:
            sampler.check()
    finally:
        del model._prepare_sampler
        del model._denoising_step
        # transformers caches compiled sampler methods on the model; ours must not outlive the block
        for name in compiled_names:
            if name not in compiled_before and hasattr(model, name):
                delattr(model, name)


def generate(model, input_ids: Optional[Tensor] = None, *, entropy_bound: Optional[float] = None, seed=None,
             generator: Optional[torch.Generator] = None, do_sample: bool = True, backend: str = "auto",
             **generate_kwargs):
    """``model.generate(input_ids, **generate_kwargs)`` with the denoising step on ddiff's ops.

    Takes every argument of transformers' ``DiffusionGemmaGenerationMixin.generate`` and of
    ``DiffusionGemmaGenerationConfig`` (``max_new_tokens``, ``max_denoising_steps``,
    ``t_min``, ``t_max``, ``stability_threshold``, ``confidence_threshold``,
    ``generation_config``, ``streamer``, ``cache_implementation``, ...), with the same defaults
    (the model's generation config, then transformers' global defaults), plus:

    Args:
        model: a ``transformers.DiffusionGemmaForBlockDiffusion``.
        input_ids: ``[B, P]`` prompt ids.
        entropy_bound: shorthand for ``sampler_config=EntropyBoundSamplerConfig(entropy_bound)``
            (a float > 0, as transformers validates it).
        seed, generator: the noise of the whole call (an int seed, or a ``torch.Generator`` to
            draw it from; with neither, torch's default generator, so ``torch.manual_seed``
            makes a call repeat).
        do_sample: False uses the argmax as the denoiser's canvas instead of a sample.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for every op of the step.

    Returns:
        What transformers' ``generate`` returns: a ``DiffusionGemmaGenerationOutput``
        (``sequences``, ``tokens_per_forward``, ``cache``) or, with
        ``return_dict_in_generate=False``, the sequences.
    """
    if entropy_bound is not None:
        if "sampler_config" in generate_kwargs:
            raise ValueError("pass either `entropy_bound` or `sampler_config`, not both.")
        generate_kwargs["sampler_config"] = _transformers_generation().EntropyBoundSamplerConfig(
            entropy_bound=entropy_bound)
    with use_ddiff(model, seed=seed, generator=generator, backend=backend, do_sample=do_sample):
        return model.generate(input_ids, **generate_kwargs)
