"""Decoding steps of discrete diffusion LMs: ``predict_tokens``, ``mdlm_step``, ``udlm_step``."""

from __future__ import annotations

from typing import Optional

import torch
from torch.library import custom_op, triton_op

from ddiff._backend import launch_wrapper, resolve_backend
from ddiff._checks import (check_bool, check_choice, check_device, check_dtype, check_logits,
                           check_shape, check_tensor, check_token_id, eager, is_int, is_integer_dtype, is_real,
                           normalize_temperature, row_param)
from ddiff._params import RngArgs, rng_args, seed_rows
from ddiff.ops.sampling import (
    _filter_params,
    _filters_active,
    _locate_invalid_rows,
    _raise_invalid_rows,
    check_top_p_mode,
    flag_invalid_rows,
)
from ddiff.reference.decoding import CONFIDENCE_KINDS, udlm_choose, unmask_probability
from ddiff.torch_fast import decoding as torch_fast

Tensor = torch.Tensor
CONFIDENCE_FROM = ("raw", "sampling")


# ---------------------------------------------------------------------------------------------
# Registered ops
# ---------------------------------------------------------------------------------------------


@custom_op("ddiff::predict_tokens_torch", mutates_args=())
def _predict_torch(
    logits: Tensor, mask: Optional[Tensor], suppress: Optional[Tensor],
    temperature: Optional[Tensor], temperature_value: float, top_k: Optional[Tensor], top_k_value: int,
    top_p: Optional[Tensor], top_p_value: float, min_p: Optional[Tensor], min_p_value: float,
    seed: Optional[Tensor], seed_value: int, offset: int, confidence: str, confidence_from: str,
    top_p_mode: str, confidence_suppress: Optional[Tensor], return_argmax: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    # ddiff.torch_fast computes ddiff.reference.decoding's tokens with fewer passes.
    tokens, conf, argmax, bad = torch_fast.predict_tokens(
        logits, mask, suppress, (temperature, temperature_value), (top_k, top_k_value), (top_p, top_p_value),
        (min_p, min_p_value), (seed, seed_value), offset, confidence=confidence, confidence_from=confidence_from,
        top_p_mode=top_p_mode, confidence_suppress=confidence_suppress, return_argmax=return_argmax)
    _raise_invalid_rows(bad)
    tokens, conf = flag_invalid_rows(bad, tokens, conf)
    return tokens, conf, torch.where(bad, -1, argmax) if return_argmax else tokens.new_empty(0)


def _fake_predict(logits, *args):
    """Fake outputs of predict_tokens: tokens, confidences and the argmax (empty unless asked for)."""
    rows, return_argmax = logits.shape[0], args[-1]
    return (logits.new_empty(rows, dtype=torch.int64), logits.new_empty(rows, dtype=torch.float32),
            logits.new_empty(rows if return_argmax else 0, dtype=torch.int64))


_predict_torch.register_fake(_fake_predict)


@triton_op("ddiff::predict_tokens_triton", mutates_args=())
def _predict_triton(
    logits: Tensor, mask: Optional[Tensor], suppress: Optional[Tensor],
    temperature: Optional[Tensor], temperature_value: float, top_k: Optional[Tensor], top_k_value: int,
    top_p: Optional[Tensor], top_p_value: float, min_p: Optional[Tensor], min_p_value: float,
    seed: Optional[Tensor], seed_value: int, offset: int, confidence: str, confidence_from: str,
    top_p_mode: str, confidence_suppress: Optional[Tensor], return_argmax: bool, filtered: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from ddiff.kernels import sampling as kernels

    out = kernels.predict_tokens_fwd(logits, mask, suppress, temperature, temperature_value, top_k, top_k_value, top_p,
                                     top_p_value, min_p, min_p_value, seed, seed_value, offset, confidence=confidence,
                                     conf_raw=confidence_from == "raw", filtered=filtered, top_p_mode=top_p_mode,
                                     conf_suppress=confidence_suppress, return_argmax=return_argmax,
                                     wrap=launch_wrapper())
    return out if return_argmax else (out[0], out[1], out[0].new_empty(0))


@custom_op("ddiff::mdlm_step_torch", mutates_args=())
def _mdlm_torch(logits: Tensor, x_t: Tensor, mask_token_id: int, alpha_t: Tensor, alpha_s: Tensor,
                temperature: Optional[Tensor], temperature_value: float, top_k: Optional[Tensor], top_k_value: int,
                top_p: Optional[Tensor], top_p_value: float, min_p: Optional[Tensor], min_p_value: float,
                top_p_mode: str, seed: Optional[Tensor], seed_value: int, offset: int) -> Tensor:
    # Only the masked rows whose posterior coin reveals them are read (as in the kernel); an
    # invalid revealed row stays masked.
    x_s, bad = torch_fast.mdlm_step(logits, x_t, mask_token_id, alpha_t, alpha_s, (temperature, temperature_value),
                                    (top_k, top_k_value), (top_p, top_p_value), (min_p, min_p_value),
                                    (seed, seed_value), offset, top_p_mode)
    _raise_invalid_rows(bad)
    return x_s


@_mdlm_torch.register_fake
def _(logits, x_t, *args):
    return torch.empty_like(x_t)


@triton_op("ddiff::mdlm_step_triton", mutates_args=())
def _mdlm_triton(logits: Tensor, x_t: Tensor, mask_token_id: int, alpha_t: Tensor, alpha_s: Tensor,
                 temperature: Optional[Tensor], temperature_value: float, top_k: Optional[Tensor], top_k_value: int,
                 top_p: Optional[Tensor], top_p_value: float, min_p: Optional[Tensor], min_p_value: float,
                 top_p_mode: str, seed: Optional[Tensor], seed_value: int, offset: int) -> tuple[Tensor, Tensor]:
    from ddiff.kernels import sampling as kernels

    filtered = _filters_active((top_k, top_k_value), (top_p, top_p_value), (min_p, min_p_value), logits.shape[1])
    suppress = torch.full((1,), mask_token_id, dtype=torch.int64, device=logits.device)
    tokens, conf = kernels.predict_tokens_fwd(
        logits, x_t == mask_token_id, suppress, temperature, temperature_value, top_k, top_k_value, top_p, top_p_value,
        min_p, min_p_value, seed, seed_value, offset, confidence="prob", conf_raw=False, filtered=filtered,
        top_p_mode=top_p_mode, gate=unmask_probability(alpha_t, alpha_s).contiguous(), wrap=launch_wrapper(),
    )
    return torch.where(tokens >= 0, tokens, x_t), conf


@custom_op("ddiff::udlm_step_torch", mutates_args=())
def _udlm_torch(logits: Tensor, x_t: Tensor, alpha_t: Tensor, alpha_s: Tensor, seed: Optional[Tensor],
                seed_value: int, offset: int) -> Tensor:
    x_s, bad = torch_fast.udlm_step(logits, x_t, alpha_t, alpha_s, (seed, seed_value), offset)
    _raise_invalid_rows(bad)
    return torch.where(bad, -1, x_s)  # an invalid row is token -1, as in every op


@_udlm_torch.register_fake
def _(logits, x_t, *args):
    return torch.empty_like(x_t)


@triton_op("ddiff::udlm_step_triton", mutates_args=())
def _udlm_triton(logits: Tensor, x_t: Tensor, alpha_t: Tensor, alpha_s: Tensor, seed: Optional[Tensor],
                 seed_value: int, offset: int) -> tuple[Tensor, Tensor]:
    from ddiff.kernels import sampling as kernels

    tokens, p_xt = kernels.predict_tokens_fwd(
        logits, None, None, None, 1.0, None, 0, None, 1.0, None, 0.0, seed, seed_value, offset,
        confidence="prob", conf_raw=True, filtered=False, query=x_t, wrap=launch_wrapper(),
    )
    seeds = seed_rows(RngArgs(seed, seed_value, offset), logits.shape[0], logits.device)
    x_s = udlm_choose(tokens, p_xt, x_t, alpha_t, alpha_s, logits.shape[1], seeds, offset)
    return torch.where(torch.isnan(p_xt), -1, x_s), p_xt  # an invalid row is token -1, as in every op


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_positions(name: str, tensor, shape, device, *, dtype_kind: str) -> Tensor:
    check_tensor(name, tensor)
    check_shape(name, tensor, shape, "the logits' leading dims")
    check_device(name, tensor, device)
    check_dtype(name, tensor, dtype_kind)
    return tensor.reshape(-1)


def _check_suppress(suppress_tokens, vocab: int, device, name: str = "suppress_tokens") -> Optional[Tensor]:
    if suppress_tokens is None:
        return None
    if isinstance(suppress_tokens, torch.Tensor):
        if not is_integer_dtype(suppress_tokens.dtype):
            raise TypeError(f"`{name}` must hold integer ids, got {suppress_tokens.dtype}.")
        ids = suppress_tokens.reshape(-1).to(torch.int64)  # uint64 ids >= 2**63 wrap to negative: still rejected
        # Host (CPU) ids are checked always: reading them waits on no device. Device ids are
        # checked while the checks are on; outside them the ops ignore an id outside [0, V), on
        # both backends (ddiff.torch_fast.sampling.suppress_columns_).
        out_of_range = (eager() or ids.device.type == "cpu") and ids.numel() and bool(((ids < 0) | (ids >= vocab)).any())
        ids = ids.to(device)
    else:
        values = [suppress_tokens] if is_int(suppress_tokens) else suppress_tokens
        try:
            values = list(values)
        except TypeError:
            raise TypeError(f"`{name}` must be an int, a sequence of ints or an integer tensor.") from None
        if not all(is_int(i) for i in values):
            raise TypeError(f"`{name}` must hold ints.")
        out_of_range = any(not 0 <= i < vocab for i in values)  # checked on the host values: no sync
        ids = torch.tensor(values, dtype=torch.int64, device=device)
    if ids.numel() > 64:
        raise ValueError(f"`{name}` holds {ids.numel()} ids; at most 64 are supported.")
    if out_of_range:
        raise ValueError(f"every id in `{name}` must lie in [0, {vocab}).")
    return ids if ids.numel() else None


def _alpha_rows(name: str, value, x_shape, device) -> Tensor:
    """α as a scalar, a [B] tensor (per sequence) or a tensor of x_t's shape, as fp32 [R]."""
    rows = 1
    for d in x_shape:
        rows *= d
    if isinstance(value, torch.Tensor):
        check_dtype(name, value, "float")
        check_device(name, value, device)
        if value.dim() == 0:
            out = value.reshape(1).expand(rows)
        elif len(x_shape) >= 1 and tuple(value.shape) == (x_shape[0],):
            out = value.reshape((x_shape[0],) + (1,) * (len(x_shape) - 1)).expand(x_shape).reshape(-1)
        elif tuple(value.shape) == tuple(x_shape):
            out = value.reshape(-1)
        else:
            raise ValueError(f"`{name}` must be a scalar, a [B] tensor or have x_t's shape {tuple(x_shape)}, "
                             f"got {tuple(value.shape)}.")
        return out.to(torch.float32).contiguous()
    if not is_real(value):
        raise TypeError(f"`{name}` must be a float or a float tensor, got {type(value).__name__}.")
    return torch.full((rows,), float(value), dtype=torch.float32, device=device)


def _check_alphas(alpha_t, alpha_s, x_shape, device):
    a_t = _alpha_rows("alpha_t", alpha_t, x_shape, device)
    a_s = _alpha_rows("alpha_s", alpha_s, x_shape, device)
    if isinstance(alpha_t, torch.Tensor) or isinstance(alpha_s, torch.Tensor):
        checks = [(a_t, "alpha_t"), (a_s, "alpha_s")] if eager() else []
        values_t, values_s = a_t, a_s
    else:  # plain floats: checked on constants, so torch.compile sees no sync
        values_t, values_s = torch.tensor([alpha_t], dtype=torch.float64), torch.tensor([alpha_s], dtype=torch.float64)
        checks = [(values_t, "alpha_t"), (values_s, "alpha_s")]
    for a, name in checks:
        if a.numel() and bool(((a < 0) | (a > 1) | torch.isnan(a)).any()):
            raise ValueError(f"`{name}` must lie in [0, 1].")
    if checks and values_t.numel() and bool((values_s < values_t).any()):
        raise ValueError("`alpha_s` must be >= `alpha_t`: s is the less noisy time (s < t).")
    return a_t, a_s


def _posterior_inputs(logits, x_t, alpha_t, alpha_s):
    """Checks shared by the posterior steps: logits [..., V], x_t [...] ids, 0 <= α_t <= α_s <= 1."""
    logits2d = check_logits(logits)
    x_rows = _check_positions("x_t", x_t, logits.shape[:-1], logits.device, dtype_kind="int").to(torch.int64)
    a_t, a_s = _check_alphas(alpha_t, alpha_s, x_t.shape, logits.device)
    return logits2d, x_rows, a_t, a_s


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def predict_tokens(logits: Tensor, mask: Optional[Tensor] = None, temperature=0.0, top_k=None, top_p=None,
                   min_p=None, *, top_p_mode: str = "inclusive", confidence: str = "prob", confidence_from: str = "raw",
                   suppress_tokens=None, confidence_suppress_tokens=None, return_argmax: bool = False,
                   seed=None, offset: int = 0, generator: Optional[torch.Generator] = None, backend: str = "auto"):
    """Predict a token for each masked position and score how confident the prediction is.

    The first half of every confidence-remasking decoder step (LLaDA ``generate``, Dream,
    Fast-dLLM, SDAR, LLaDA2), in one pass over the vocabulary per masked position, with no
    ``[B, L, V]`` intermediate.

    Tokens follow :func:`ddiff.sample` exactly, with the same noise streams and row index
    ``b * L + l``: with the same seed (and no ``suppress_tokens``) they equal
    ``ddiff.sample(logits.flatten(0, -2), ...)``. ``temperature`` 0 is greedy.

    Args:
        logits: ``[B, L, V]`` (any leading dims) float32 / float16 / bfloat16.
        mask: bool ``[B, L]``; None means every position. Where False nothing is computed:
            the token is -1 and the confidence ``-inf``.
        temperature, top_k, top_p, min_p: as in :func:`ddiff.sample`, scalar or per row
            (``[B * L]``).
        top_p_mode: ``"inclusive"`` (transformers) or ``"bd3lm"`` (BD3LM's nucleus, which drops
            the token that crosses ``top_p``); see :func:`ddiff.filter_logits`.
        confidence: ``"prob"`` (probability of the chosen token: LLaDA low_confidence, Dream
            maskgit_plus, Fast-dLLM), ``"margin"`` (top-1 minus top-2 probability: Dream
            topk_margin), ``"neg_entropy"`` (sum of p log p: Dream entropy) or ``"random"`` (a
            uniform from its own noise stream, independent of the token noise: LLaDA
            remasking="random").
        confidence_from: the distribution the confidence is measured under: ``"raw"``, the
            softmax of the logits after ``suppress_tokens`` (LLaDA, Fast-dLLM, dInfer), or
            ``"sampling"``, the tempered and filtered sampling distribution (Dream, diffusers
            BlockRefinement); at temperature 0 that is the filtered softmax at temperature 1.
        suppress_tokens: ids set to ``-inf`` before anything else (the mask token, EOS:
            LLaDA's ``logits_eos_inf``): an int, a sequence or an int tensor (at most 64).
            Every id must lie in ``[0, V)``: ValueError naming it on both backends, checked
            always for ints, sequences and CPU tensors (no device read); a device tensor is
            checked while the checks are on, and inside ``ddiff.sync_checks(False)`` its
            out-of-range ids are ignored by both backends.
        confidence_suppress_tokens: ids set to ``-inf`` only in the distribution the
            confidence is measured under (after the filters; the kept set is not recomputed),
            never in the one the token is drawn from; same id rules as ``suppress_tokens``.
            A drawn token among them gets ``"prob"`` confidence 0, and ``"margin"`` /
            ``"neg_entropy"`` are those of the distribution renormalised without them; a row
            left with no mass gets 0 (``prob``, ``margin``) or ``-inf`` (``neg_entropy``);
            ``"random"`` ignores them. This is LLaDA ``generate``'s ``confidence_eos_eot_inf``:
            upstream writes ``logits_with_noise[..., 126081] = logits[..., 126348] = -inf`` after
            the argmax, so the confidence softmax loses EOT (126348) always and EOS (126081)
            only at temperature 0, where ``logits_with_noise`` is ``logits`` itself. Pass
            ``[126348]`` (T > 0) or ``[126081, 126348]`` (T = 0) to reproduce it.
        return_argmax: also return the first argmax of the logits after ``suppress_tokens``
            (what DiffusionGemma's step takes as ``argmax(processed_logits)``), from the same
            pass; -1 where ``mask`` is False.
        seed, offset, generator, backend: as in :func:`ddiff.sample`.

    Returns:
        ``(tokens, confidence)``: int64 and fp32, both shaped like ``logits.shape[:-1]``;
        ``(tokens, confidence, argmax)`` with ``return_argmax``.

    Example:
        >>> tokens, conf = ddiff.predict_tokens(logits, mask=x == MASK_ID, suppress_tokens=[MASK_ID])
        >>> commit = ddiff.select_transfer(conf, x == MASK_ID, num_transfer=4)
        >>> x = torch.where(commit, tokens, x)
    """
    logits2d = check_logits(logits)
    rows, vocab = logits2d.shape
    device = logits.device
    check_choice("confidence", confidence, CONFIDENCE_KINDS)
    check_choice("confidence_from", confidence_from, CONFIDENCE_FROM)
    mask_rows = None if mask is None else _check_positions("mask", mask, logits.shape[:-1], device, dtype_kind="bool")
    temp = row_param("temperature", temperature, rows, device, integer=False, default=0.0)
    temp = normalize_temperature("temperature", *temp)
    k, p, m = _filter_params(top_k, top_p, min_p, rows, device, vocab)
    top_p_mode = check_top_p_mode(top_p_mode)
    suppress = _check_suppress(suppress_tokens, vocab, device)
    conf_suppress = _check_suppress(confidence_suppress_tokens, vocab, device, name="confidence_suppress_tokens")
    check_bool("return_argmax", return_argmax)
    rng = rng_args(seed, offset, generator, rows, device)
    impl = resolve_backend(backend, logits)

    args = (logits2d, mask_rows, suppress, temp[0], temp[1], k[0], k[1], p[0], p[1], m[0], m[1],
            rng.seed, rng.seed_value, rng.offset, confidence, confidence_from, top_p_mode, conf_suppress, return_argmax)
    shape = logits.shape[:-1]
    if impl == "torch":
        with _locate_invalid_rows(shape):
            tokens, conf, argmax = torch.ops.ddiff.predict_tokens_torch(*args)
    else:
        tokens, conf, argmax = torch.ops.ddiff.predict_tokens_triton(*args, _filters_active(k, p, m, vocab))
        _raise_invalid_rows(torch.isnan(conf), shape)
    if return_argmax:
        return tokens.view(shape), conf.view(shape), argmax.view(shape)
    return tokens.view(shape), conf.view(shape)


def mdlm_step(logits: Tensor, x_t: Tensor, mask_token_id: int, alpha_t, alpha_s, *, temperature=1.0, top_k=None,
              top_p=None, min_p=None, top_p_mode: str = "inclusive", seed=None, offset: int = 0,
              generator: Optional[torch.Generator] = None, backend: str = "auto") -> Tensor:
    """One reverse step of the absorbing (masked) diffusion posterior (MDLM / BD3LM, SUBS).

    Each masked position (``x_t == mask_token_id``) is revealed with probability
    ``(α_s − α_t) / (1 − α_t)`` (1 when ``α_t = 1``), to a token drawn from
    ``softmax(filter(logits / temperature))`` with the mask logit at ``-inf``; otherwise it
    stays masked. Unmasked positions are copied. This is the
    categorical posterior of MDLM's ``_ddpm_update``, sampled without building ``q_xs``: the
    coin comes first (noise stream ``STREAM_POSTERIOR``), and positions that stay masked never
    read their logits.

    Args:
        logits: ``[B, L, V]`` (any leading dims) float32 / float16 / bfloat16.
        x_t: int64 ``[B, L]`` current tokens.
        mask_token_id: the absorbing token id, in ``[0, V)``.
        alpha_t, alpha_s: α at the current (noisier) time t and the next time s < t, so
            ``0 <= α_t <= α_s <= 1``: floats, ``[B]`` tensors or tensors shaped like ``x_t``.
            See :func:`ddiff.alpha_schedule`.
        temperature: float >= 0 or per-row tensor (0 reveals the argmax); the rule of
            :func:`ddiff.sample` (finite in fp32, below 1e-5 greedy).
        top_k, top_p, min_p: filters of the revealed token's distribution, as in
            :func:`ddiff.sample` (top-k: Dream ``alg="origin"``; top-p: BD3LM's nucleus
            sampling, with ``top_p_mode="bd3lm"`` for BD3LM's exact rule).
        top_p_mode: ``"inclusive"`` (transformers) or ``"bd3lm"``; see :func:`ddiff.filter_logits`.
        seed, offset, generator, backend: as in :func:`ddiff.sample`.

    Returns:
        ``x_s``: int64, shaped like ``x_t``.
    """
    logits2d, x_rows, a_t, a_s = _posterior_inputs(logits, x_t, alpha_t, alpha_s)
    rows, vocab = logits2d.shape
    device = logits.device
    mask_token_id = check_token_id("mask_token_id", mask_token_id, vocab)
    temp = row_param("temperature", temperature, rows, device, integer=False, default=1.0)
    temp = normalize_temperature("temperature", *temp)
    k, p, m = _filter_params(top_k, top_p, min_p, rows, device, vocab)
    top_p_mode = check_top_p_mode(top_p_mode)
    rng = rng_args(seed, offset, generator, rows, device)
    impl = resolve_backend(backend, logits)

    args = (logits2d, x_rows, mask_token_id, a_t, a_s, temp[0], temp[1], k[0], k[1], p[0], p[1], m[0], m[1],
            top_p_mode, rng.seed, rng.seed_value, rng.offset)
    if impl == "torch":
        with _locate_invalid_rows(logits.shape[:-1]):
            x_s = torch.ops.ddiff.mdlm_step_torch(*args)
    else:
        x_s, conf = torch.ops.ddiff.mdlm_step_triton(*args)
        _raise_invalid_rows(torch.isnan(conf), logits.shape[:-1])
    return x_s.view(x_t.shape)


def udlm_step(logits: Tensor, x_t: Tensor, alpha_t, alpha_s, *, seed=None, offset: int = 0,
              generator: Optional[torch.Generator] = None, backend: str = "auto") -> Tensor:
    """One reverse step of the uniform-noise posterior (UDLM, kuleshov-group/discrete-diffusion-guidance).

    With ``x̂0 = softmax(logits)``, ``α_ts = α_t / α_s`` and ``N = V``, the closed-form posterior is

    ``q(x_s = j | x_t, x̂0) = [ (α_s − α_t) x̂0_j + (1 − α_ts)(1 − α_s) / N + 1[j = x_t] (α_t N x̂0_{x_t} + α_ts − α_t) ]
    / (α_t N x̂0_{x_t} + 1 − α_t)``.

    It is a mixture of three parts (draw from x̂0, draw uniformly, keep x_t), so it is sampled
    exactly without materialising q over V: one pass over the row gives the Gumbel race on
    x̂0 and ``x̂0_{x_t}``, and two uniforms of ``STREAM_POSTERIOR`` pick the part.

    Args:
        logits: ``[B, L, V]`` (any leading dims) float32 / float16 / bfloat16.
        x_t: int64 ``[B, L]`` current tokens, in ``[0, V)`` (ValueError naming ``x_t``
            otherwise; inside ``ddiff.sync_checks(False)`` such a position comes back as -1).
        alpha_t, alpha_s: ``0 <= α_t <= α_s <= 1``: floats, ``[B]`` tensors or shaped like ``x_t``.
        seed, offset, generator, backend: as in :func:`ddiff.sample`.

    Returns:
        ``x_s``: int64, shaped like ``x_t``. Invalid rows (NaN / +inf logits, an all ``-inf``
        row, an ``x_t`` id outside the vocabulary) raise ValueError, or, inside
        ``ddiff.sync_checks(False)``, come back as token -1 on both backends, as in every op.
    """
    logits2d, x_rows, a_t, a_s = _posterior_inputs(logits, x_t, alpha_t, alpha_s)
    rows, vocab = logits2d.shape
    device = logits.device
    x_bad = (x_rows < 0) | (x_rows >= vocab)
    if eager() and x_rows.numel() and bool(x_bad.any()):
        raise ValueError(f"every token of `x_t` must lie in [0, {vocab}).")
    rng = rng_args(seed, offset, generator, rows, device)
    impl = resolve_backend(backend, logits)
    # Unchecked (sync_checks(False)): an x_t id outside [0, V) makes its row invalid (-1); the ops
    # see an in-range id there, so neither backend reads outside the row.
    x_in = torch.where(x_bad, 0, x_rows).contiguous()
    args = (logits2d, x_in, a_t, a_s, rng.seed, rng.seed_value, rng.offset)
    if impl == "torch":
        with _locate_invalid_rows(logits.shape[:-1]):
            x_s = torch.ops.ddiff.udlm_step_torch(*args)
    else:
        x_s, p_xt = torch.ops.ddiff.udlm_step_triton(*args)
        _raise_invalid_rows(torch.isnan(p_xt), logits.shape[:-1])
    return torch.where(x_bad, -1, x_s).view(x_t.shape)
