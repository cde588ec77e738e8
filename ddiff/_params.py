"""Argument checks and normalisation shared by the ops.

A per-row parameter is a Python scalar or a tensor with one value per row. It is normalised to
``(tensor_or_None, scalar)``: kernels take the tensor when there is one and the scalar
otherwise. Checks that need a tensor's values (a host sync) run in eager mode only: under
``torch.compile`` they are skipped, since a sync would break the graph.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass

import torch

from ddiff.reference.rng import MAX_OFFSET, MAX_ROWS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_SYNC_CHECKS = [True]


@contextlib.contextmanager
def sync_checks(enabled: bool):
    """Turn the checks that read tensor values on or off inside a ``with`` block.

    Checking a per-row parameter tensor's range, or whether the logits held NaN, means waiting
    for the device. Inside ``with ddiff.sync_checks(False):`` those checks are skipped, so a
    decoding loop runs without a host sync: invalid rows then come back as token -1 (and
    confidence NaN), and the caller validates once, as the pipelines do at the end of a call.
    Shape, dtype, device and Python-scalar checks always run. Under ``torch.compile`` the
    value checks are skipped as well.
    """
    previous = _SYNC_CHECKS[0]
    _SYNC_CHECKS[0] = bool(enabled)
    try:
        yield
    finally:
        _SYNC_CHECKS[0] = previous


def eager() -> bool:
    """True when checks that read tensor values (a host sync) may run."""
    return _SYNC_CHECKS[0] and not torch.compiler.is_compiling()


def check_logits(logits, name: str = "logits") -> torch.Tensor:
    """Validate a [..., V] logits tensor and return its [R, V] view with unit column stride."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(logits).__name__}.")
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


def row_param(name, value, rows: int, device, *, integer: bool, default):
    """Normalise a per-row parameter to ``(tensor [R] or None, python scalar)``."""
    if value is None:
        return None, default
    if isinstance(value, torch.Tensor):
        if integer and (value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex()):
            raise TypeError(f"`{name}` must hold integers, got a {value.dtype} tensor.")
        if not integer and not value.dtype.is_floating_point:
            raise TypeError(f"`{name}` must hold floats, got a {value.dtype} tensor.")
        if value.device != device:
            raise ValueError(f"`{name}` is on {value.device} but the logits are on {device}.")
        if value.dim() == 0:
            value = value.reshape(1).expand(rows)
        if value.dim() != 1 or value.shape[0] != rows:
            raise ValueError(
                f"`{name}` must be a scalar or have one value per row ({rows} rows), got shape {tuple(value.shape)}."
            )
        return value.to(torch.int64 if integer else torch.float32).contiguous(), default
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be a number or a tensor, got a bool.")
    if integer:
        if not isinstance(value, numbers.Integral):
            raise TypeError(f"`{name}` must be an int or an integer tensor, got {type(value).__name__}.")
        return None, value
    if not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a float or a float tensor, got {type(value).__name__}.")
    return None, value


def check_range(name: str, tensor, scalar, low, high, *, low_open=False, high_open=False, nan_ok=False) -> None:
    """Raise ValueError if the parameter (tensor values, or the scalar) leaves [low, high]."""
    desc = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def bad_mask(x):
        m = torch.zeros_like(x, dtype=torch.bool)
        if low is not None:
            m |= (x <= low) if low_open else (x < low)
        if high is not None:
            m |= (x >= high) if high_open else (x > high)
        if not nan_ok and x.dtype.is_floating_point:
            m |= torch.isnan(x)
        return m

    if tensor is not None:
        if eager() and tensor.numel() and bool(bad_mask(tensor).any()):
            raise ValueError(f"every value of `{name}` must lie in {desc}.")
        return
    value = float(scalar)
    if math.isnan(value) or bool(bad_mask(torch.tensor([value], dtype=torch.float64)).any()):
        raise ValueError(f"`{name}` must lie in {desc}, got {scalar}.")


@dataclass
class RngArgs:
    """Normalised RNG arguments: ``seed`` tensor (R or 1 int64 values) or ``seed_value``."""

    seed: torch.Tensor | None
    seed_value: int
    offset: int


def rng_args(seed, offset, generator, rows: int, device) -> RngArgs:
    """Validate ``seed`` / ``offset`` / ``generator``; draw a seed when neither is given."""
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
        raise TypeError(f"`offset` must be an int, got {type(offset).__name__}.")
    if not 0 <= offset < MAX_OFFSET:
        raise ValueError(f"`offset` must lie in [0, 2^56), got {offset}.")
    if seed is not None and generator is not None:
        raise ValueError("pass either `seed` or `generator`, not both.")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}.")
        drawn = torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device, dtype=torch.int64)
        return RngArgs(drawn.to(device), 0, offset)
    if seed is None:
        # torch's default generator for this device: torch.manual_seed makes runs repeat.
        drawn = torch.randint(0, 2**63 - 1, (1,), device=device, dtype=torch.int64)
        return RngArgs(drawn, 0, offset)
    if isinstance(seed, torch.Tensor):
        if seed.dtype.is_floating_point or seed.dtype == torch.bool or seed.is_complex():
            raise TypeError(f"`seed` must hold integers, got a {seed.dtype} tensor.")
        if seed.device != device:
            raise ValueError(f"`seed` is on {seed.device} but the logits are on {device}.")
        if seed.numel() != 1 and (seed.dim() != 1 or seed.shape[0] != rows):
            raise ValueError(f"`seed` must be an int or have one value per row ({rows} rows), got shape {tuple(seed.shape)}.")
        return RngArgs(seed.reshape(-1).to(torch.int64).contiguous(), 0, offset)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"`seed` must be an int or an integer tensor, got {type(seed).__name__}.")
    bits = seed & (2**64 - 1)
    return RngArgs(None, bits - 2**64 if bits >= 2**63 else bits, offset)


def seed_rows(rng: RngArgs, rows: int, device) -> torch.Tensor:
    """The per-row int64 seeds as a [R] tensor (for the torch reference)."""
    if rng.seed is None:
        return torch.full((rows,), rng.seed_value, dtype=torch.int64, device=device)
    return rng.seed.expand(rows) if rng.seed.numel() == 1 else rng.seed


def rows_of(tensor, scalar, rows: int, dtype, device) -> torch.Tensor:
    """A per-row parameter as a [R] tensor (for the torch reference)."""
    if tensor is not None:
        return tensor
    return torch.full((rows,), scalar, dtype=dtype, device=device)
