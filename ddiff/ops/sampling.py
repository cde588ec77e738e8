"""Categorical sampling and top-k / top-p / min-p filtering: ``sample`` and ``filter_logits``."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch.library import custom_op, triton_op

from ddiff._backend import launch_wrapper, resolve_backend
from ddiff._checks import (check_bool, check_choice, check_logits, check_range, eager, logits_location,
                           normalize_temperature, row_param)
from ddiff._params import rng_args
from ddiff.reference.sampling import TOP_P_MODES
from ddiff.torch_fast import sampling as torch_fast

Tensor = torch.Tensor


class InvalidLogitsError(ValueError):
    """A row of ``logits`` holds NaN / +inf or is entirely ``-inf``; ``row`` is its flattened index.

    The registered ops see ``[R, V]`` logits only, so they raise with ``leading_shape`` None and
    :func:`_locate_invalid_rows` (around the op call in the public function) re-raises with the
    caller's leading dims: ``[B, L, V]`` logits are reported as batch and position.
    """

    def __init__(self, row: int, leading_shape=None):
        self.row, self.leading_shape = row, leading_shape
        super().__init__(
            f"`logits` {logits_location(row, leading_shape)} contains NaN or +inf (after dividing by the "
            "temperature) or is entirely -inf; no distribution can be sampled from it."
        )


def _raise_invalid_rows(bad: Tensor, leading_shape=None) -> None:
    """Raise :class:`InvalidLogitsError` for the first True row of ``bad`` (``[R]``), if any."""
    if eager() and bad.numel() and bool(bad.any()):
        raise InvalidLogitsError(int(torch.nonzero(bad.reshape(-1))[0, 0]), leading_shape)


@contextlib.contextmanager
def _locate_invalid_rows(leading_shape):
    """Re-raise an op's :class:`InvalidLogitsError` with the logits' leading dims ``leading_shape``."""
    try:
        yield
    except InvalidLogitsError as error:
        if error.leading_shape is not None:
            raise
        raise InvalidLogitsError(error.row, leading_shape) from None


def _nan_invalid_rows(filtered: Tensor, bad: Tensor) -> Tensor:
    """With the checks off, an invalid row of ``filter_logits`` comes back all NaN on both backends,
    so the op it feeds flags it in turn (the checks on, it has raised already)."""
    return filtered if eager() else filtered.masked_fill_(bad[:, None], float("nan"))


def flag_invalid_rows(bad: Tensor, tokens: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Mark invalid rows as the kernels do (token -1, value NaN), for callers that skip checks."""
    return torch.where(bad, -1, tokens), torch.where(bad, float("nan"), values)


# ---------------------------------------------------------------------------------------------
# Registered ops. Per-row parameters travel as (Tensor?, scalar) pairs.
# ---------------------------------------------------------------------------------------------


@custom_op("ddiff::sample_torch", mutates_args=())
def _sample_torch(
    logits: Tensor, temperature: Optional[Tensor], temperature_value: float,
    top_k: Optional[Tensor], top_k_value: int, top_p: Optional[Tensor], top_p_value: float,
    min_p: Optional[Tensor], min_p_value: float, seed: Optional[Tensor], seed_value: int, offset: int,
    top_p_mode: str, return_probs: bool,
) -> tuple[Tensor, Tensor]:
    # ddiff.torch_fast computes ddiff.reference.sampling's tokens with fewer passes; the
    # probabilities (empty unless asked for) cost a normaliser the tokens do not need.
    tokens, probs, bad = torch_fast.sample(logits, (temperature, temperature_value), (top_k, top_k_value),
                                           (top_p, top_p_value), (min_p, min_p_value), (seed, seed_value), offset,
                                           top_p_mode, return_probs=return_probs)
    _raise_invalid_rows(bad)
    if not return_probs:
        return torch.where(bad, -1, tokens), probs
    return flag_invalid_rows(bad, tokens, probs)


@_sample_torch.register_fake
def _(logits, *args):
    """Fake outputs: int64 tokens, one per row, and fp32 probabilities (empty unless asked for)."""
    rows, return_probs = logits.shape[0], args[-1]
    return logits.new_empty(rows, dtype=torch.int64), logits.new_empty(rows if return_probs else 0, dtype=torch.float32)


@triton_op("ddiff::sample_triton", mutates_args=())
def _sample_triton(
    logits: Tensor, temperature: Optional[Tensor], temperature_value: float,
    top_k: Optional[Tensor], top_k_value: int, top_p: Optional[Tensor], top_p_value: float,
    min_p: Optional[Tensor], min_p_value: float, seed: Optional[Tensor], seed_value: int, offset: int,
    top_p_mode: str, filtered: bool,
) -> tuple[Tensor, Tensor]:
    from ddiff.kernels import sampling as kernels

    return kernels.sample_fwd(logits, temperature, temperature_value, top_k, top_k_value, top_p, top_p_value,
                              min_p, min_p_value, seed, seed_value, offset, filtered=filtered, top_p_mode=top_p_mode,
                              wrap=launch_wrapper())


@custom_op("ddiff::filter_logits_torch", mutates_args=())
def _filter_torch(logits: Tensor, top_k: Optional[Tensor], top_k_value: int, top_p: Optional[Tensor],
                  top_p_value: float, min_p: Optional[Tensor], min_p_value: float, top_p_mode: str) -> Tensor:
    filtered, bad = torch_fast.filter_logits(logits, (top_k, top_k_value), (top_p, top_p_value), (min_p, min_p_value),
                                             top_p_mode)
    _raise_invalid_rows(bad)
    return _nan_invalid_rows(filtered, bad)


@_filter_torch.register_fake
def _(logits, *args):
    return torch.empty_like(logits)


@triton_op("ddiff::filter_logits_triton", mutates_args=())
def _filter_triton(logits: Tensor, top_k: Optional[Tensor], top_k_value: int, top_p: Optional[Tensor],
                   top_p_value: float, min_p: Optional[Tensor], min_p_value: float,
                   top_p_mode: str) -> tuple[Tensor, Tensor]:
    from ddiff.kernels import sampling as kernels

    return kernels.filter_logits_fwd(logits, top_k, top_k_value, top_p, top_p_value, min_p, min_p_value,
                                     top_p_mode=top_p_mode, wrap=launch_wrapper())


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _filter_params(top_k, top_p, min_p, rows: int, device, vocab: Optional[int] = None):
    """Check and normalise the three filters; returns ((k, k0), (p, p0), (m, m0)).

    A scalar ``top_k >= vocab`` keeps everything: it is clamped to ``vocab`` here, before
    dispatch, so any Python int (``2**63`` and above included) reaches the op schema as an int64;
    so does a uint64 tensor entry of ``2**63`` or more (which int64 cannot hold).
    """
    k = row_param("top_k", top_k, rows, device, integer=True, default=0)
    if k[0] is not None and isinstance(top_k, Tensor) and top_k.dtype == torch.uint64:
        k = (torch.where(k[0] < 0, 2**63 - 1, k[0]), k[1])  # uint64 >= 2**63 wrapped to negative: keep all
    check_range("top_k", k[0], k[1], 0, None)
    if vocab is not None and k[0] is None:
        k = (None, min(int(k[1]), vocab))
    p = row_param("top_p", top_p, rows, device, integer=False, default=1.0)
    check_range("top_p", p[0], p[1], 0.0, 1.0, low_open=True)
    m = row_param("min_p", min_p, rows, device, integer=False, default=0.0)
    check_range("min_p", m[0], m[1], 0.0, 1.0)
    return k, p, m


def check_top_p_mode(top_p_mode) -> str:
    return check_choice("top_p_mode", top_p_mode, TOP_P_MODES)


def _filters_active(k, p, m, vocab: int) -> bool:
    if k[0] is not None or p[0] is not None or m[0] is not None:
        return True
    return 0 < k[1] < vocab or p[1] < 1.0 or m[1] > 0.0


def filter_logits(logits: Tensor, top_k=None, top_p=None, min_p=None, *, top_p_mode: str = "inclusive",
                  backend: str = "auto") -> Tensor:
    """Apply top-k, then top-p, then min-p filtering; filtered entries become ``-inf``.

    The semantics are transformers' ``TopKLogitsWarper`` -> ``TopPLogitsWarper`` ->
    ``MinPLogitsWarper`` (``min_tokens_to_keep=1``), each applied to what the one before
    left, computed in fp32 whatever the input dtype. **Ties are kept**: every token equal to
    the k-th largest logit survives top-k, and every token tied with the last token top-p
    keeps survives top-p (transformers keeps an arbitrary part of such a tie, decided by its
    sort order). Formally, a token survives top-p iff the probability mass of the tokens
    strictly above it is below ``top_p``, and survives min-p iff its probability is at least
    ``min_p`` times the largest one.

    ``top_p_mode="bd3lm"`` replaces the top-p rule by BD3LM's nucleus (kuleshov-group/bd3lms
    ``_nucleus_sample``: sorted cumulative probability ``<= p``, at least the top token): a
    token survives iff the mass strictly above it **plus its own probability** is at most
    ``top_p``, or it ties with the largest logit. So the token that crosses ``p`` is dropped
    (``"inclusive"`` keeps it). Ties are kept here too: the mass strictly above a token counts
    none of the tokens tied with it, so a tie group at the boundary survives whole iff its
    first member would fit (BD3LM's sort keeps an arbitrary prefix of such a group).

    Args:
        logits: ``[..., V]`` float32 / float16 / bfloat16, any leading dims (rows are the
            flattened leading dims), any strides.
        top_k: int or int tensor ``[R]``; ``None``, 0 or ``>= V`` (any size: ``2**64`` too)
            keep everything.
        top_p: float in (0, 1] or float tensor ``[R]``; ``None`` or 1.0 keep everything.
        min_p: float in [0, 1] or float tensor ``[R]``; ``None`` or 0 keep everything.
        top_p_mode: ``"inclusive"`` (transformers' TopPLogitsWarper) or ``"bd3lm"``.
        backend: ``"auto"`` (triton for CUDA tensors), ``"torch"`` or ``"triton"``.

    Returns:
        A new tensor with the shape and dtype of ``logits``.

    Raises:
        TypeError / ValueError naming the argument for bad dtypes, ranges, shapes or devices,
        and ValueError for a row with NaN / +inf or one that is entirely ``-inf``.

    Example:
        >>> logits = torch.tensor([[3.0, 1.0, 1.0, 0.0]])
        >>> ddiff.filter_logits(logits, top_k=2)  # both tokens tied at the boundary stay
        tensor([[3., 1., 1., -inf]])
    """
    logits2d = check_logits(logits)
    rows, vocab = logits2d.shape
    k, p, m = _filter_params(top_k, top_p, min_p, rows, logits.device, vocab)
    top_p_mode = check_top_p_mode(top_p_mode)
    impl = resolve_backend(backend, logits)
    if impl == "torch":
        with _locate_invalid_rows(logits.shape[:-1]):
            out = torch.ops.ddiff.filter_logits_torch(logits2d, k[0], k[1], p[0], p[1], m[0], m[1], top_p_mode)
    else:
        out, bad = torch.ops.ddiff.filter_logits_triton(logits2d, k[0], k[1], p[0], p[1], m[0], m[1], top_p_mode)
        _raise_invalid_rows(bad.bool(), logits.shape[:-1])
        out = _nan_invalid_rows(out, bad.bool())
    return out.view(logits.shape)


def sample(logits: Tensor, temperature=1.0, top_k=None, top_p=None, min_p=None, *, top_p_mode: str = "inclusive",
           seed=None, offset: int = 0, generator: Optional[torch.Generator] = None, return_probs: bool = False,
           backend: str = "auto"):
    """Draw one token per row from ``softmax(filter_logits(logits / temperature))``.

    One fused pass over each row: the logits are read in their own dtype, tempered and
    filtered in fp32 (see :func:`filter_logits`, whose tie rule applies; the filters see the
    tempered logits, as in transformers' warper chain), and sampled with the Gumbel-max trick,
    without materialising noise, probabilities or a filtered tensor.

    Randomness is counter-based: a draw depends only on ``(seed, offset, row, column)``, so it
    does not change with block sizes, launch configuration, or the other rows of the batch.
    The torch and triton backends draw **the same noise** (Philox4x32-10, see
    ``ddiff.reference.rng``), so a seed gives the same tokens on both, up to float near-ties.
    The race is hierarchical and exact: a Gumbel race over noise tiles of 1024 columns
    (weighted by each tile's log-sum-exp) picks a tile, and a race inside it picks the token.
    Uniforms carry 48 random bits and reach down to 2^-52, so the Gumbel tail is not cut at
    ~16.6 as with 24-bit fp32 uniforms (the reason LLaDA uses float64 noise).

    Args:
        logits: ``[..., V]`` float32 / float16 / bfloat16; rows are the flattened leading dims.
        temperature: float >= 0 or float tensor ``[R]``. 0 means greedy: the first maximal
            index, as ``torch.argmax``; zeros may be mixed with positive values per row. The
            one rule of every op: it must be finite in fp32 (inf, NaN or above FLT_MAX:
            ValueError naming it), and below ``ddiff._checks.TEMPERATURE_EPS`` (1e-5) it is
            greedy (0) on both backends; per-row tensors are normalised on the device.
        top_k, top_p, min_p: filters as in :func:`filter_logits` (scalar or ``[R]``).
        top_p_mode: ``"inclusive"`` (transformers) or ``"bd3lm"`` (BD3LM's nucleus), as in
            :func:`filter_logits`; the nucleus is taken on the tempered distribution.
        seed: int (any integer type, NumPy included) in ``[-2**63, 2**64)``, reduced to its 64
            bits (-1 is ``2**64 - 1``; outside: ValueError), or int64 tensor ``[R]`` of per-row
            seeds (honoured per row).
        offset: int in [0, 2^56): advance it between calls that share a seed.
        generator: draw the seed from this generator instead. With neither ``seed`` nor
            ``generator`` the seed comes from torch's default generator, so
            ``torch.manual_seed`` makes runs repeat.
        return_probs: also return the fp32 probability of each chosen token under the
            sampling distribution. For greedy rows it is the token's probability under the
            filtered softmax at temperature 1 (the convention of Dream's ``sample_tokens``).
        backend: ``"auto"`` | ``"torch"`` | ``"triton"``.

    Returns:
        ``tokens`` (int64, shape ``logits.shape[:-1]``), or ``(tokens, probs)``.

    Example:
        >>> logits = torch.randn(4, 32000, device="cuda", dtype=torch.bfloat16)
        >>> tokens, probs = ddiff.sample(logits, temperature=0.7, top_p=0.9, seed=0, return_probs=True)
    """
    logits2d = check_logits(logits)
    rows, vocab = logits2d.shape
    device = logits.device
    temp = row_param("temperature", temperature, rows, device, integer=False, default=1.0)
    temp = normalize_temperature("temperature", *temp)
    k, p, m = _filter_params(top_k, top_p, min_p, rows, device, vocab)
    top_p_mode = check_top_p_mode(top_p_mode)
    check_bool("return_probs", return_probs)
    rng = rng_args(seed, offset, generator, rows, device)
    impl = resolve_backend(backend, logits)

    args = (logits2d, temp[0], temp[1], k[0], k[1], p[0], p[1], m[0], m[1], rng.seed, rng.seed_value, rng.offset,
            top_p_mode)
    if impl == "torch":
        with _locate_invalid_rows(logits.shape[:-1]):
            tokens, probs = torch.ops.ddiff.sample_torch(*args, return_probs)
    else:
        tokens, probs = torch.ops.ddiff.sample_triton(*args, _filters_active(k, p, m, vocab))
        _raise_invalid_rows(tokens < 0, logits.shape[:-1])
    tokens = tokens.view(logits.shape[:-1])
    if return_probs:
        return tokens, probs.view(logits.shape[:-1])
    return tokens
