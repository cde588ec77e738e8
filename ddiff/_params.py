"""Normalised RNG arguments and per-row tensors for the ops' torch paths.

The argument checks themselves live in :mod:`ddiff._checks`; the names re-exported here
(``sync_checks``, ``eager``, ``check_logits``, ``check_range``, ``row_param``) are the same
objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddiff._checks import (FLOAT_DTYPES, check_device, check_dtype, check_logits, check_range, check_seed, eager, is_int,
                           row_param, seed_int64, sync_checks)
from ddiff.reference.rng import MAX_OFFSET

__all__ = ["FLOAT_DTYPES", "RngArgs", "check_logits", "check_range", "eager", "rng_args", "row_param", "rows_of",
           "seed_rows", "sync_checks"]


@dataclass
class RngArgs:
    """Normalised RNG arguments: ``seed`` tensor (R or 1 int64 values) or ``seed_value``."""

    seed: torch.Tensor | None
    seed_value: int
    offset: int


def rng_args(seed, offset, generator, rows: int, device) -> RngArgs:
    """Validate ``seed`` / ``offset`` / ``generator``; draw a seed when neither is given.

    An integer seed follows :func:`ddiff._checks.check_seed`: any integer type (NumPy included)
    in ``[-2**63, 2**64)``, reduced to its 64 bits; outside, ValueError naming ``seed``.
    """
    if not is_int(offset):
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
    if isinstance(seed, torch.Tensor) and seed.dim() == 0 and seed.device.type == "cpu" and torch.device(device).type != "cpu":
        seed = check_seed("seed", seed)  # a host scalar for device logits: read without a device sync
    if isinstance(seed, torch.Tensor):
        check_dtype("seed", seed, "int")
        check_device("seed", seed, device)
        if seed.numel() != 1 and (seed.dim() != 1 or seed.shape[0] != rows):
            raise ValueError(f"`seed` must be an int or have one value per row ({rows} rows), got shape {tuple(seed.shape)}.")
        return RngArgs(seed.reshape(-1).to(torch.int64).contiguous(), 0, offset)
    if not is_int(seed):
        raise TypeError(f"`seed` must be an int or an integer tensor, got {type(seed).__name__}.")
    # [-2**63, 2**64), reduced to its 64 bits: -1 and 2**64 - 1 are one seed.
    return RngArgs(None, seed_int64("seed", seed), offset)


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
