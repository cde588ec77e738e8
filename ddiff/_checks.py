"""Argument checks shared by every op and pipeline: the one place for int / real / tensor checks.

Every public entry point validates its arguments with these helpers before its single
dispatch point, so a bad argument raises the same ``TypeError`` / ``ValueError`` naming it on
every backend. Checks that read a tensor's values wait for the device; they run only while
:func:`eager` is true (not under ``torch.compile``, not inside ``ddiff.sync_checks(False)``).

A *per-row parameter* is a Python scalar or a tensor with one value per row (or a 0-dim
tensor). :func:`row_param` normalises it to ``(tensor [R] or None, python scalar)``: kernels
take the tensor when there is one and the scalar otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from typing import Optional

import torch

from ddiff.reference.rng import MAX_ROWS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Per thread and per asyncio task: a pipeline that turns the checks off in one thread never turns
# them off for another (each new thread starts from the default).
_SYNC_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("ddiff_sync_checks", default=True)


@contextlib.contextmanager
def sync_checks(enabled: bool):
    """Turn the checks that read tensor values on or off inside a ``with`` block.

    Checking a per-row parameter tensor's range, or whether the logits held NaN, means waiting
    for the device. Inside ``with ddiff.sync_checks(False):`` those checks are skipped, so a
    decoding loop runs without a host sync: invalid rows then come back as token -1 (and
    confidence NaN), and the caller validates once, as the pipelines do at the end of a call.
    Shape, dtype, device and Python-scalar checks always run. Under ``torch.compile`` the
    value checks are skipped as well. The setting belongs to the current thread (and asyncio
    task): other threads keep their own.

    Example:
        >>> with ddiff.sync_checks(False):
        ...     tokens = ddiff.sample(logits, seed=0)   # no host sync; bad rows give -1
    """
    token = _SYNC_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _SYNC_CHECKS.reset(token)


def eager() -> bool:
    """True when checks that read tensor values (a host sync) may run."""
    # is_compiling first: Dynamo folds it to True and never traces the ContextVar read.
    return not torch.compiler.is_compiling() and _SYNC_CHECKS.get()


# ---------------------------------------------------------------------------------------------
# Python scalars
# ---------------------------------------------------------------------------------------------


def is_int(value) -> bool:
    """True for Python / NumPy integers; bools are not integers here."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """True for Python / NumPy real numbers (ints included); bools are not numbers here."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """``value`` as an ``int``; TypeError unless it is an integer, ValueError outside the bounds."""
    if not is_int(value):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}, got {value}.")
    return int(value)


def check_real(name: str, value, *, finite: bool = False) -> float:
    """``value`` as a ``float``; TypeError unless it is a real number (finite, if asked)."""
    if not is_real(value) or (finite and not math.isfinite(value)):
        kind = "a finite float" if finite else "a float"
        raise TypeError(f"`{name}` must be {kind}, got {value!r}.")
    return float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}.")
    return value


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}.")
    return value


# Seeds: one rule for every op and pipeline (torch.Generator.manual_seed's range). An integer seed
# (Python, NumPy signed or unsigned, a 0-d integer tensor where a scalar is taken) must lie in
# [-2**63, 2**64); a seed names its 64 bits, ``seed & (2**64 - 1)``, so -1 and 2**64 - 1 are the
# same seed. Anything outside raises ValueError naming the argument.
SEED_MIN = -(2**63)
SEED_END = 2**64


def check_seed(name: str, value) -> int:
    """An integer seed as an ``int`` in ``[-2**63, 2**64)`` (the range ``torch.Generator.manual_seed`` takes).

    Accepts Python ints, NumPy signed / unsigned integers and 0-d integer tensors (read on the
    host: pass a CPU tensor where no device sync is wanted). TypeError for other types (bools
    included), ValueError naming ``name`` outside the range. -1 and ``2**64 - 1`` name the same
    64 bits, as every op reduces a seed to ``seed & (2**64 - 1)``.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not is_integer_dtype(value.dtype):
            raise TypeError(f"`{name}` must be an int or a 0-d integer tensor, got a {value.dtype} tensor of shape "
                            f"{tuple(value.shape)}.")
        value = value.item()
    if not is_int(value):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
    value = int(value)
    if not SEED_MIN <= value < SEED_END:
        raise ValueError(f"`{name}` must lie in [-2**63, 2**64), got {value}.")
    return value


def seed_int64(name: str, value) -> int:
    """:func:`check_seed`, then its 64 bits as a signed int64 (what the ops' schemas and kernels take)."""
    bits = check_seed(name, value) & (SEED_END - 1)
    return bits - SEED_END if bits >= 2**63 else bits


# Temperatures: one rule for every op (both backends). A temperature must be a number >= 0 that
# is finite in fp32 (inf, NaN and values above FLT_MAX raise ValueError naming it); one below
# TEMPERATURE_EPS (as vLLM's _SAMPLING_EPS) is greedy, i.e. exactly 0. Per-row tensors are
# normalised on the device (torch.where, no host sync); their range is checked only while
# :func:`eager` is true, and outside the checks a NaN / inf / negative entry becomes NaN, so the
# row comes back invalid (token -1) on both backends.
TEMPERATURE_EPS = 1e-5
FLT_MAX = float(torch.finfo(torch.float32).max)


def normalize_temperature(name: str, tensor, scalar):
    """``(tensor, scalar)`` of a temperature with the rule above applied (see ``TEMPERATURE_EPS``)."""
    if tensor is None:
        value = float(scalar)
        if not (math.isfinite(value) and 0.0 <= value <= FLT_MAX):
            raise ValueError(f"`{name}` must be a finite number in [0, {FLT_MAX:.7g}] (representable in fp32), "
                             f"got {scalar}.")
        return None, 0.0 if value < TEMPERATURE_EPS else value
    t = tensor if tensor.dtype == torch.float32 else tensor.to(torch.float32)
    ok = torch.isfinite(t) & (t >= 0)
    if eager() and t.numel() and not bool(ok.all()):
        raise ValueError(f"every value of `{name}` must be a finite number >= 0 (representable in fp32).")
    return torch.where(ok, torch.where(t < TEMPERATURE_EPS, 0.0, t), float("nan")), scalar


def check_token_id(name: str, value, vocab: int) -> int:
    """A token id: an int in ``[0, vocab)``."""
    if not is_int(value):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
    if not 0 <= value < vocab:
        raise ValueError(f"`{name}` must lie in [0, {vocab}), got {value}.")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------


def check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}.")
    return value


def is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_dtype(name: str, tensor: torch.Tensor, kind: str) -> None:
    """``kind``: ``"bool"``, ``"int"`` (any integer dtype, not bool) or ``"float"``."""
    if kind == "bool" and tensor.dtype != torch.bool:
        raise TypeError(f"`{name}` must be a bool tensor, got {tensor.dtype}.")
    if kind == "int" and not is_integer_dtype(tensor.dtype):
        raise TypeError(f"`{name}` must hold integers, got a {tensor.dtype} tensor.")
    if kind == "float" and not tensor.dtype.is_floating_point:
        raise TypeError(f"`{name}` must hold floats, got a {tensor.dtype} tensor.")


def check_device(name: str, tensor: torch.Tensor, device, other: str = "the logits") -> None:
    if tensor.device != torch.device(device):
        raise ValueError(f"`{name}` is on {tensor.device} but {other} is on {device}.")


def check_shape(name: str, tensor: torch.Tensor, shape, what: str = "") -> None:
    if tuple(tensor.shape) != tuple(shape):
        detail = f" ({what})" if what else ""
        raise ValueError(f"`{name}` must have shape {tuple(shape)}{detail}, got {tuple(tensor.shape)}.")


def check_dim(name: str, tensor: torch.Tensor, dim: int, layout: str) -> None:
    if tensor.dim() != dim:
        raise ValueError(f"`{name}` must be {dim}-D {layout}, got shape {tuple(tensor.shape)}.")


def check_logits(logits, name: str = "logits") -> torch.Tensor:
    """Validate a [..., V] logits tensor and return its [R, V] view with unit column stride."""
    check_tensor(name, logits)
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`{name}` must be float32, float16 or bfloat16, got {logits.dtype}.")
    if logits.dim() < 1:
        raise ValueError(f"`{name}` must have at least one dimension (the vocabulary).")
    vocab = logits.shape[-1]
    if vocab < 1:
        raise ValueError(f"`{name}` must have a vocabulary dimension of at least 1, got {vocab}.")
    if vocab >= 2**31:
        raise ValueError(f"`{name}`: a vocabulary of {vocab} is too large (must be < 2^31).")
    rows2d = logits.reshape(-1, vocab)
    if rows2d.stride(-1) != 1 and vocab > 1:
        rows2d = rows2d.contiguous()
    if rows2d.shape[0] >= MAX_ROWS:
        raise ValueError(f"`{name}` has {rows2d.shape[0]} rows; at most 2^32 - 1 are supported.")
    return rows2d


def logits_location(row: int, leading_shape=None) -> str:
    """Where row ``row`` of logits flattened to ``[R, V]`` lies, for error messages.

    The one formatter of every "logits ... contain NaN" message (ops and pipelines):
    ``"at batch b, position l"`` for ``[B, L, V]`` logits (``leading_shape == (B, L)``),
    ``"at index (i, j, k)"`` for more leading dims, ``"row r"`` for ``[R, V]`` / ``[V]`` logits
    or when the leading shape is unknown.
    """
    shape = () if leading_shape is None else tuple(int(d) for d in leading_shape)
    if len(shape) <= 1:
        return f"row {row}"
    index = []
    for size in reversed(shape):
        index.append(row % size)
        row //= size
    index.reverse()
    if len(index) == 2:
        return f"at batch {index[0]}, position {index[1]}"
    return f"at index {tuple(index)}"


def check_per_row_tensor(name: str, value: torch.Tensor, rows: int, device, *, integer: bool,
                         other: str = "the logits") -> None:
    """A per-row parameter tensor: 0-dim or ``[rows]``, on ``device``, of an integer / float dtype."""
    check_dtype(name, value, "int" if integer else "float")
    check_device(name, value, device, other)
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != rows):
        raise ValueError(
            f"`{name}` must be a scalar or have one value per row ({rows} rows), got shape {tuple(value.shape)}."
        )


def row_param(name, value, rows: int, device, *, integer: bool, default):
    """Normalise a per-row parameter to ``(tensor [R] or None, python scalar)``.

    A tensor is checked (:func:`check_per_row_tensor`), broadcast to ``[R]`` and cast to int64
    / fp32; a scalar must be an int (``integer``) or a real number.
    """
    if value is None:
        return None, default
    if isinstance(value, torch.Tensor):
        check_per_row_tensor(name, value, rows, device, integer=integer)
        if value.dim() == 0:
            value = value.reshape(1).expand(rows)
        return value.to(torch.int64 if integer else torch.float32).contiguous(), default
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be a number or a tensor, got a bool.")
    if integer:
        if not is_int(value):
            raise TypeError(f"`{name}` must be an int or an integer tensor, got {type(value).__name__}.")
        return None, value
    if not is_real(value):
        raise TypeError(f"`{name}` must be a float or a float tensor, got {type(value).__name__}.")
    return None, value


def check_range(name: str, tensor, scalar, low, high, *, low_open=False, high_open=False) -> None:
    """Raise ValueError if the parameter (tensor values, or the scalar) leaves [low, high] or is NaN.

    A tensor's values are read only while :func:`eager` is true (the read waits on the device).
    """
    desc = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def bad_mask(x):
        m = torch.zeros_like(x, dtype=torch.bool)
        if low is not None:
            m |= (x <= low) if low_open else (x < low)
        if high is not None:
            m |= (x >= high) if high_open else (x > high)
        if x.dtype.is_floating_point:
            m |= torch.isnan(x)
        return m

    if tensor is not None:
        if eager() and tensor.numel() and bool(bad_mask(tensor).any()):
            raise ValueError(f"every value of `{name}` must lie in {desc}.")
        return
    value = float(scalar)
    if math.isnan(value):
        raise ValueError(f"`{name}` must lie in {desc}, got {scalar}.")
    if (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high)
    ):
        raise ValueError(f"`{name}` must lie in {desc}, got {scalar}.")
