"""Which masked positions to commit: ``select_transfer``, ``num_transfer_tokens``, ``select_edits``."""

from __future__ import annotations

from typing import Optional, Union

import torch

from ddiff._backend import launch_wrapper, resolve_backend
from ddiff._checks import (check_device, check_dim, check_per_row_tensor, check_shape, check_tensor, eager,
                           is_int, normalize_temperature, row_param)
from ddiff._params import rng_args, rows_of, seed_rows
from ddiff.reference import selection as _ref

__all__ = ["num_transfer_tokens", "select_edits", "select_transfer"]

Scalar = Union[int, float]


# --------------------------------------------------------------------------------------
# torch.library registration: the PyTorch path and the Triton path (whose launcher,
# ``ddiff.kernels.selection.select_transfer_fwd``, is imported lazily).
# --------------------------------------------------------------------------------------
@torch.library.custom_op("ddiff::select_transfer_torch", mutates_args=())
def _select_transfer_torch(
    confidence: torch.Tensor,
    mask: torch.Tensor,
    k: Optional[torch.Tensor],
    k_scalar: int,
    threshold: Optional[torch.Tensor],
    threshold_scalar: float,
    factor: Optional[torch.Tensor],
    factor_scalar: float,
    rule: int,
    min_transfer: int,
) -> torch.Tensor:
    # The entropy bound travels in the threshold slot (one schema for every rule).
    bound_rule = rule == _ref.RULE_ENTROPY_BOUND
    return _ref.select_transfer_reference(
        confidence,
        mask,
        num_transfer=None
        if rule in (_ref.RULE_THRESHOLD, _ref.RULE_FACTOR) or bound_rule
        else (k if k is not None else k_scalar),
        threshold=None
        if rule in (_ref.RULE_TOPK, _ref.RULE_FACTOR) or bound_rule
        else (threshold if threshold is not None else threshold_scalar),
        factor=None if rule != _ref.RULE_FACTOR else (factor if factor is not None else factor_scalar),
        entropy_bound=(threshold if threshold is not None else threshold_scalar) if bound_rule else None,
        min_transfer=min_transfer,
    )


@_select_transfer_torch.register_fake
def _select_transfer_fake(confidence, mask, k, k_scalar, threshold, threshold_scalar, factor, factor_scalar, rule, min_transfer):
    return confidence.new_empty(confidence.shape, dtype=torch.bool)


@torch.library.triton_op("ddiff::select_transfer_triton", mutates_args=())
def _select_transfer_triton(
    confidence: torch.Tensor,
    mask: torch.Tensor,
    k: Optional[torch.Tensor],
    k_scalar: int,
    threshold: Optional[torch.Tensor],
    threshold_scalar: float,
    factor: Optional[torch.Tensor],
    factor_scalar: float,
    rule: int,
    min_transfer: int,
) -> torch.Tensor:
    from ddiff.kernels import selection as kernels

    return kernels.select_transfer_fwd(confidence, mask, k, k_scalar, threshold, threshold_scalar, factor,
                                       factor_scalar, rule, min_transfer, wrap=launch_wrapper())


# --------------------------------------------------------------------------------------
# argument checking
# --------------------------------------------------------------------------------------
def _check_2d(name: str, t, shape=None) -> None:
    check_tensor(name, t)
    check_dim(name, t, 2, "[B, L]")
    if shape is not None:
        check_shape(name, t, shape, "the shape of `confidence`")


def _split(name: str, value, ref: torch.Tensor, *, integer: bool):
    """(tensor or None, scalar) for the op schema; a scalar count must be >= 0."""
    if isinstance(value, torch.Tensor):
        check_per_row_tensor(name, value, ref.shape[0], ref.device, integer=integer, other="`confidence`")
        return value, 0 if integer else 0.0
    tensor, scalar = row_param(name, value, ref.shape[0], ref.device, integer=integer, default=0 if integer else 0.0)
    if integer and scalar < 0:
        raise ValueError(f"`{name}` must be >= 0, got {scalar}.")
    return tensor, int(scalar) if integer else float(scalar)


# --------------------------------------------------------------------------------------
# public ops
# --------------------------------------------------------------------------------------
def select_transfer(
    confidence: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_transfer: Optional[Union[int, torch.Tensor]] = None,
    threshold: Optional[Union[Scalar, torch.Tensor]] = None,
    factor: Optional[Union[Scalar, torch.Tensor]] = None,
    entropy_bound: Optional[Union[Scalar, torch.Tensor]] = None,
    min_transfer: int = 1,
    temperature: Optional[Union[Scalar, torch.Tensor]] = None,
    seed=None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Choose which masked positions to commit (unmask) at this denoising step.

    The candidates of a row are the positions where ``mask`` is True; only they can be
    chosen. Let N be a row's candidate count and "top-k" its k most confident candidates,
    ties going to the lower position. Comparisons are made in fp32 (confidence cast to
    fp32, Python-float thresholds rounded to fp32); NaN confidence counts as ``-inf``.

    Rules (pick with the keyword arguments):

    * ``num_transfer=k`` — LLaDA ``low_confidence`` remasking: the top-min(k, N).
      ``k = 0`` selects nothing.
    * ``threshold=τ`` — Fast-dLLM / dInfer parallel decoding: every candidate with
      confidence ``> τ`` (strict). If fewer than ``min_transfer`` pass, the
      top-min(``min_transfer``, N) instead (so by default at least one token).
    * ``num_transfer=k, threshold=τ`` — SDAR ``low_confidence_dynamic`` / diffusers
      ``BlockRefinementScheduler``: all candidates above τ if at least k pass, otherwise
      the top-min(k, N). ``min_transfer`` is ignored.
    * ``factor=f`` — Fast-dLLM ``get_transfer_index_dynamic``. Sort a row's candidate
      confidences c_1 >= c_2 >= ... >= c_N. Rank n >= 2 passes when
      ``c_n >= 1 - f / (n + 1)`` (bar computed in float64, rounded to fp32; rank 1
      always passes). Let n* be the number of leading ranks that pass; the top-n* are
      committed, except that if the first failing rank is N itself, all N are committed
      (as in Fast-dLLM's code). Needs ``f > 0``. ``factor`` cannot be combined with
      ``num_transfer`` or ``threshold`` (Fast-dLLM's dynamic path ignores both; a mix
      has no defined meaning) and ``min_transfer`` does not apply (it commits >= 1).
    * ``entropy_bound=b`` — the entropy-bound sampler (arXiv 2505.24857; DiffusionGemma's
      ``EntropyBoundSampler.accept_canvas``), with ``confidence`` the negative entropy that
      ``predict_tokens(..., confidence="neg_entropy")`` returns. Each candidate costs its
      entropy ``e = max(-confidence, 0)``; sorted by cost, the n-th candidate is accepted when
      the costs of the candidates before it sum to at most b (``e_1 + ... + e_{n-1} <= b``,
      i.e. ``sum - max <= b`` over the accepted set), so the least uncertain one always is.
      Sums are float64, the bound is rounded to fp32. Needs ``b >= 0``; alone, like
      ``factor``, and ``min_transfer`` does not apply. Where tied entropies straddle the
      bound the lower positions are taken (transformers' sort takes an arbitrary subset).
    * ``num_transfer=k, temperature=τ`` — Dream's ``alg_temp``: k candidates drawn without
      replacement with probabilities ``softmax(confidence / τ)`` over the row's candidates,
      i.e. ``torch.multinomial(softmax(confidence / τ), k)``. Sampled as a Gumbel-top-k: the
      top-k of ``confidence / τ + G`` with ``G`` Gumbel noise from ddiff's Philox stream
      ``STREAM_SELECT`` at ``(seed, offset, row, position)`` (see ``selection_keys_reference``),
      so both backends draw the same positions. ``τ = 0`` (or None) is the plain top-k; ``τ``
      may be a ``[B]`` tensor. Only with ``num_transfer`` alone.

    Rows without candidates select nothing under every rule.

    Args:
        confidence: ``[B, L]`` float16 / bfloat16 / float32 (float64 is rounded to fp32)
            confidence of each position's prediction; ``-inf`` is allowed.
        mask: ``[B, L]`` bool, True where a position may be committed (still masked).
        num_transfer: int, or ``[B]`` (or 0-dim) integer tensor: tokens per row.
            Negative tensor entries count as 0 (not checked, to avoid a host sync).
        threshold: float, or ``[B]`` (or 0-dim) floating tensor.
        factor: float > 0, or ``[B]`` (or 0-dim) floating tensor with positive entries.
        entropy_bound: float >= 0, or ``[B]`` (or 0-dim) floating tensor (entries >= 0).
        min_transfer: int >= 0, the floor of the threshold-only rule.
        temperature: float >= 0, or ``[B]`` (or 0-dim) floating tensor: sample the
            ``num_transfer`` positions instead of taking the most confident. The rule of
            :func:`ddiff.sample`: finite in fp32 (else ValueError), below 1e-5 it is 0.
        seed, offset, generator: the draw of ``temperature`` > 0, as in :func:`ddiff.sample`
            (per-row ``seed`` tensors allowed; neither ``seed`` nor ``generator``: torch's
            default generator).
        backend: ``"auto"`` (Triton on CUDA, PyTorch otherwise), ``"torch"`` or ``"triton"``.

    Returns:
        ``[B, L]`` bool tensor, True at the positions to commit (always a subset of ``mask``).

    Example::

        >>> conf = torch.tensor([[0.9, 0.2, 0.95, 0.5]])
        >>> mask = torch.tensor([[True, True, False, True]])
        >>> select_transfer(conf, mask, num_transfer=2)
        tensor([[ True, False, False,  True]])
        >>> select_transfer(conf, mask, threshold=0.95)  # nobody passes: top-1
        tensor([[ True, False, False, False]])
        >>> neg_entropy = torch.tensor([[-0.02, -0.5, -0.05, -0.06]])
        >>> select_transfer(neg_entropy, torch.ones(1, 4, dtype=torch.bool), entropy_bound=0.1)
        tensor([[ True, False,  True,  True]])
        >>> picked = select_transfer(conf, mask, num_transfer=2, temperature=0.5, seed=0)  # sampled
    """
    _check_2d("confidence", confidence)
    _check_2d("mask", mask, confidence.shape)
    check_device("mask", mask, confidence.device, "`confidence`")
    if not confidence.is_floating_point():
        raise TypeError(f"`confidence` must have a floating dtype, got {confidence.dtype}.")
    if mask.dtype != torch.bool:
        raise TypeError(f"`mask` must be a bool tensor, got {mask.dtype}.")
    if num_transfer is None and threshold is None and factor is None and entropy_bound is None:
        raise ValueError(
            "select_transfer needs a rule: give `num_transfer`, `threshold` and/or `factor`, or `entropy_bound`."
        )
    if factor is not None and (num_transfer is not None or threshold is not None):
        raise ValueError(
            "`factor` (Fast-dLLM's dynamic rule) cannot be combined with `num_transfer` or `threshold`."
        )
    if entropy_bound is not None and (num_transfer is not None or threshold is not None or factor is not None):
        raise ValueError("`entropy_bound` cannot be combined with `num_transfer`, `threshold` or `factor`.")
    if temperature is not None and (num_transfer is None or threshold is not None or factor is not None
                                    or entropy_bound is not None):
        raise ValueError("`temperature` samples the `num_transfer` positions: it takes `num_transfer` alone "
                         "(no `threshold`, `factor` or `entropy_bound`).")
    if not is_int(min_transfer):
        raise TypeError(f"`min_transfer` must be an int, got {type(min_transfer).__name__}.")
    if min_transfer < 0:
        raise ValueError(f"`min_transfer` must be >= 0, got {min_transfer}.")
    k, k_scalar = _split("num_transfer", num_transfer, confidence, integer=True)
    thr, thr_scalar = _split("threshold", threshold, confidence, integer=False)
    fac, fac_scalar = _split("factor", factor, confidence, integer=False)
    if factor is not None and fac is None and not fac_scalar > 0:
        raise ValueError(f"`factor` must be > 0, got {factor}.")
    if entropy_bound is not None:
        thr, thr_scalar = _split("entropy_bound", entropy_bound, confidence, integer=False)
        if thr is None and not thr_scalar >= 0:  # also rejects NaN
            raise ValueError(f"`entropy_bound` must be >= 0, got {entropy_bound}.")
        if thr is not None and eager() and thr.numel() and bool(((thr < 0) | torch.isnan(thr)).any()):
            raise ValueError("every value of `entropy_bound` must be >= 0.")

    if factor is not None:
        rule = _ref.RULE_FACTOR
    elif entropy_bound is not None:
        rule = _ref.RULE_ENTROPY_BOUND
    elif num_transfer is not None:
        rule = _ref.RULE_BOTH if threshold is not None else _ref.RULE_TOPK
    else:
        rule = _ref.RULE_THRESHOLD
    if temperature is not None:
        confidence = _sampling_keys(confidence, temperature, seed, offset, generator)
    length = confidence.shape[1]  # counts beyond L mean "all candidates": clamp (keeps int64 safe)
    args = (confidence, mask, k, min(k_scalar, length), thr, thr_scalar, fac, fac_scalar, rule, min(int(min_transfer), length))

    if resolve_backend(backend, confidence) == "triton":
        return torch.ops.ddiff.select_transfer_triton(*args)
    return torch.ops.ddiff.select_transfer_torch(*args)


def _sampling_keys(confidence, temperature, seed, offset, generator) -> torch.Tensor:
    """The perturbed confidences of the ``temperature`` rule, on either backend's input side:
    both then run the same deterministic top-k on them."""
    batch, device = confidence.shape[0], confidence.device
    tau, tau_scalar = _split("temperature", temperature, confidence, integer=False)
    tau, tau_scalar = normalize_temperature("temperature", tau, tau_scalar)  # finite in fp32; < 1e-5 is 0
    if tau is None and tau_scalar == 0.0:
        return confidence
    rng = rng_args(seed, offset, generator, batch, device)
    return _ref.selection_keys_reference(confidence, rows_of(tau, tau_scalar, batch, torch.float32, device),
                                         seed_rows(rng, batch, device), rng.offset)


def num_transfer_tokens(mask: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's per-step token budget (``get_num_transfer_tokens`` in LLaDA's generate.py).

    Each row's masked count n is split evenly over ``steps``: every step commits
    ``n // steps`` tokens and the first ``n % steps`` steps one more, so a row's budget
    sums to n. Plain PyTorch (tiny, vectorised, no host sync).

    Args:
        mask: ``[B, L]`` bool, True at masked positions (e.g. a block's masks).
        steps: int >= 1, the number of denoising steps.

    Returns:
        ``[B, steps]`` int64 tensor on ``mask``'s device.

    Example::

        >>> num_transfer_tokens(torch.tensor([[True] * 7 + [False]]), 3)
        tensor([[3, 2, 2]])
    """
    _check_2d("mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"`mask` must be a bool tensor, got {mask.dtype}.")
    if not is_int(steps):
        raise TypeError(f"`steps` must be an int, got {type(steps).__name__}.")
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps}.")
    return _ref.num_transfer_tokens_reference(mask, int(steps))


def select_edits(
    pred_tokens: torch.Tensor,
    confidence: torch.Tensor,
    x: torch.Tensor,
    editable: torch.Tensor,
    threshold: Union[Scalar, torch.Tensor],
) -> torch.Tensor:
    """LLaDA2's token-editing rule: which already-decoded tokens to re-write.

    A position is re-written when it is ``editable`` (decoded, not prompt), the model's
    prediction differs from the current token (``pred_tokens != x``) and its confidence
    is strictly above ``threshold`` (compared in fp32; NaN never passes). Elementwise
    PyTorch.

    Args:
        pred_tokens: ``[B, L]`` integer predicted tokens.
        confidence: ``[B, L]`` floating confidence of ``pred_tokens``.
        x: ``[B, L]`` integer current tokens.
        editable: ``[B, L]`` bool.
        threshold: float, or ``[B]`` (or 0-dim) floating tensor.

    Returns:
        ``[B, L]`` bool tensor, True where ``x`` should take ``pred_tokens``.

    Example::

        >>> select_edits(torch.tensor([[5, 6]]), torch.tensor([[0.99, 0.99]]),
        ...              torch.tensor([[5, 7]]), torch.tensor([[True, True]]), 0.9)
        tensor([[False,  True]])
    """
    _check_2d("confidence", confidence)
    for name, t in (("pred_tokens", pred_tokens), ("x", x), ("editable", editable)):
        _check_2d(name, t, confidence.shape)
        check_device(name, t, confidence.device, "`confidence`")
    if not confidence.is_floating_point():
        raise TypeError(f"`confidence` must have a floating dtype, got {confidence.dtype}.")
    if editable.dtype != torch.bool:
        raise TypeError(f"`editable` must be a bool tensor, got {editable.dtype}.")
    for name, t in (("pred_tokens", pred_tokens), ("x", x)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"`{name}` must have an integer dtype, got {t.dtype}.")
    if threshold is None:
        raise TypeError("`threshold` must be a float or a floating [B] tensor, got None.")
    _split("threshold", threshold, confidence, integer=False)
    return _ref.select_edits_reference(pred_tokens, confidence, x, editable, threshold)
