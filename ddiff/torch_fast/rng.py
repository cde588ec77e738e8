"""ddiff's counter-based noise, computed fast: the same integers and floats as ``ddiff.reference.rng``.

The reference evaluates Philox4x32-10 with about 26 small torch ops per round (16-bit split
multiplies). Here the four 32-bit lanes are packed two by two and each round is one 64-bit
multiply of both lanes, a shift, a mask and two XORs:

* on CPU the integers are computed with NumPy ``uint64`` arrays (a NumPy ufunc on a small
  array costs a fraction of a torch op's dispatch, and unsigned products wrap by definition);
* on other devices (MPS, CUDA with ``backend="torch"``) with int64 torch tensors, whose
  products wrap modulo 2^64 as well.

Only the last Philox round is trimmed (its two unused output words are skipped). The float
transforms use the reference's formulas operation by operation: the exact ones (integer to
float conversion, products by powers of two, the series of ``-log(1 - u)``) may run in NumPy,
while every ``log`` runs in torch, so the floats are bit-identical to the reference's.
"""

from __future__ import annotations

import functools
import threading
from typing import Union

import numpy as np
import torch

from ddiff.reference.rng import (
    MIN_ONE_MINUS_U,
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_ROUNDS,
    PHILOX_W0,
    PHILOX_W1,
    SMALL_U,
)

Seed = Union[int, torch.Tensor]  # one int64 seed for every row, or a tensor broadcastable to the rows

_MASK32 = 0xFFFFFFFF
_MULTIPLIERS = np.array([PHILOX_M0, PHILOX_M1], dtype=np.uint64).reshape(2, 1, 1)
_F32 = np.float32
_U32_8 = np.uint32(8)
_ROUND_STEPS = np.arange(PHILOX_ROUNDS, dtype=np.uint64).reshape(-1, 1)


def _counter_hi(offset: int, stream: int) -> tuple[int, int]:
    return offset & _MASK32, ((offset >> 32) & 0xFFFFFF) | (stream << 24)


@functools.lru_cache(maxsize=256)
def _int_seed_keys(seed: int) -> np.ndarray:
    return _keys_numpy(np.array([seed & (2**64 - 1)], dtype=np.uint64))


def _keys_numpy(seed_u64: np.ndarray) -> np.ndarray:
    """uint32 round keys ``[rounds, 2, m, 1]`` for ``m`` uint64 seeds."""
    k0 = (seed_u64 & np.uint64(_MASK32))[None, :]
    k1 = (seed_u64 >> np.uint64(32))[None, :]
    keys = np.stack([k0 + _ROUND_STEPS * np.uint64(PHILOX_W0), k1 + _ROUND_STEPS * np.uint64(PHILOX_W1)], axis=1)
    return keys.astype(np.uint32)[..., None]  # the cast keeps the low 32 bits: the sum modulo 2^32


def _keys_torch(seed: Seed, device) -> torch.Tensor:
    """int64 round keys ``[rounds, 2, m, 1]`` (uint32 values) on ``device``."""
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=device, dtype=torch.int64).reshape(1, -1, 1)
    else:
        seed = torch.tensor(seed, dtype=torch.int64, device=device).reshape(1, 1, 1)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    steps = torch.arange(PHILOX_ROUNDS, dtype=torch.int64, device=seed.device).reshape(-1, 1, 1)
    return torch.stack([(k0 + steps * PHILOX_W0) & _MASK32, (k1 + steps * PHILOX_W1) & _MASK32], dim=1)


class _NumpyPlan:
    """Buffers and views of one Philox evaluation shape, reused across calls (no allocation)."""

    def __init__(self, n: int, width: int):
        self.a = np.empty((2, n, width), dtype=np.uint32)  # (c0, c2)
        self.b0 = np.empty((2, n, width), dtype=np.uint32)  # (c3, c1) of round 0
        products = (np.empty((2, n, width), dtype=np.uint64), np.empty((2, n, width), dtype=np.uint64))
        words = [p.view(np.uint32) for p in products]
        self.rounds = []
        b = self.b0
        for r in range(PHILOX_ROUNDS - 1):
            prod, w = products[r % 2], words[r % 2]
            self.rounds.append((prod, w[..., 1::2][::-1], b[::-1]))
            b = w[..., 0::2]  # the low words become (c3', c1'); the other buffer takes the next product
        self.b_last = b[1]
        self.last = np.empty((n, width), dtype=np.uint64)
        last_words = self.last.view(np.uint32)
        self.last_hi, self.last_lo = last_words[..., 1::2], last_words[..., 0::2]
        self.r0 = np.empty((n, width), dtype=np.uint32)


_PLANS = threading.local()  # per thread: two threads sampling at once never share buffers


def _plan(n: int, width: int) -> _NumpyPlan:
    plans = getattr(_PLANS, "plans", None)
    if plans is None:
        plans = _PLANS.plans = {}
    plan = plans.get((n, width))
    if plan is None:
        if len(plans) >= 32:
            plans.clear()
        plan = plans[(n, width)] = _NumpyPlan(n, width)
    return plan


def _philox_numpy(index: np.ndarray, row: np.ndarray, c2: int, c3: int, keys: np.ndarray):
    """(r0, r1) of Philox4x32-10 as uint32 arrays, for uint32 ``index`` [n, W] and ``row`` [n, 1].

    State: ``a = (c0, c2)`` and ``b = (c3, c1)``. A round is one uint64 multiply of both lanes
    of ``a``; the high and low words of the products are read through uint32 views
    (little-endian: low word first), so ``b`` needs no copy and the new ``a`` is two XORs.
    The returned arrays are the plan's buffers: valid until the next call of the same shape.
    """
    n, width = index.shape
    plan = _plan(n, width)
    a = plan.a
    a[0] = index
    a[1] = c2
    plan.b0[0] = c3
    plan.b0[1] = row
    for r, (prod, hi_swapped, b_swapped) in enumerate(plan.rounds):
        np.multiply(a, _MULTIPLIERS, out=prod)
        np.bitwise_xor(hi_swapped, b_swapped, out=a)  # (hi1 ^ c1, hi0 ^ c3)
        np.bitwise_xor(a, keys[r], out=a)  # (c0', c2')
    # Last round: only c0' = hi(c2 * M1) ^ c1 ^ k0 and c1' = lo(c2 * M1) are used.
    np.multiply(a[1], _MULTIPLIERS[1, 0, 0], out=plan.last)
    r0 = np.bitwise_xor(plan.last_hi, plan.b_last, out=plan.r0)
    np.bitwise_xor(r0, keys[PHILOX_ROUNDS - 1][0], out=r0)
    return r0, plan.last_lo


# Up to this many counters, Philox runs on Python integers holding one 64-bit slot per counter
# (a handful of big-integer operations per round beat NumPy's per-call cost at this size).
BIGINT_MAX_COUNTERS = 96


@functools.lru_cache(maxsize=64)
def _slot_ones(slots: int) -> int:
    return int.from_bytes(np.ones(slots, dtype=np.uint64).tobytes(), "little")


def _pack(values: np.ndarray) -> int:
    return int.from_bytes(np.ascontiguousarray(values, dtype=np.uint64).tobytes(), "little")


def _unpack(value: int, shape) -> np.ndarray:
    slots = int(np.prod(shape))
    return np.frombuffer(value.to_bytes(8 * slots, "little"), dtype=np.uint64).astype(np.uint32).reshape(shape)


def _philox_bigint(index: np.ndarray, row: np.ndarray, c2: int, c3: int, keys: np.ndarray):
    """(r0, r1) of Philox4x32-10 for few counters: each lane is one Python integer.

    A 32-bit word times a 32-bit multiplier fits its 64-bit slot, so one big-integer product
    multiplies every counter at once; shifting by 32 and masking reads the high and low words.
    """
    shape = index.shape
    ones = _slot_ones(index.size)
    low = ones * _MASK32
    c0 = _pack(index)
    c1 = _pack(np.broadcast_to(row, shape)) if row.size > 1 else int(row.reshape(-1)[0]) * ones
    c2, c3 = c2 * ones, c3 * ones
    per_row_keys = keys.shape[2] > 1
    for r in range(PHILOX_ROUNDS):
        if per_row_keys:
            k0, k1 = (_pack(np.broadcast_to(keys[r, i], shape)) for i in (0, 1))
        else:
            k0, k1 = int(keys[r, 0, 0, 0]) * ones, int(keys[r, 1, 0, 0]) * ones
        p0, p1 = c0 * PHILOX_M0, c2 * PHILOX_M1
        if r == PHILOX_ROUNDS - 1:
            return _unpack(((p1 >> 32) & low) ^ c1 ^ k0, shape), _unpack(p1 & low, shape)
        c0, c1, c2, c3 = ((p1 >> 32) & low) ^ c1 ^ k0, p1 & low, ((p0 >> 32) & low) ^ c3 ^ k1, p0 & low


def _philox_torch(index: torch.Tensor, row: torch.Tensor, c2: int, c3: int, keys: torch.Tensor):
    """(r0, r1) of Philox4x32-10 for int64 ``index`` [n, W] / ``row`` [n, 1] on any torch device."""
    shape = torch.broadcast_shapes(index.shape, row.shape)
    device = index.device
    a = torch.stack([index.expand(shape), torch.full(shape, c2, dtype=torch.int64, device=device)])
    b = torch.stack([torch.full(shape, c3, dtype=torch.int64, device=device), row.expand(shape)])
    mult = torch.tensor([PHILOX_M0, PHILOX_M1], dtype=torch.int64, device=device).reshape(2, 1, 1)
    for r in range(PHILOX_ROUNDS - 1):
        prod = a * mult  # wraps modulo 2^64: the low and high words are what Philox needs
        a = (((prod >> 32) & _MASK32) ^ b).flip(0) ^ keys[r]
        b = prod & _MASK32
    p1 = a[1] * PHILOX_M1
    return ((p1 >> 32) & _MASK32) ^ b[1] ^ keys[PHILOX_ROUNDS - 1][0], p1 & _MASK32


def philox_words(seed: Seed, offset: int, row: torch.Tensor, index: torch.Tensor, stream: int):
    """The first two Philox words for counters ``(index, row, offset, stream)``.

    ``row`` is an int64 ``[n]`` tensor, ``index`` int64 ``[W]`` (shared by every row) or
    ``[n, W]`` (on CPU it may be a NumPy integer array); ``seed`` a Python int or an int64 tensor
    ``[n]`` / ``[1]``. Returns two ``[n, W]`` arrays of uint32 values: NumPy ``uint32`` arrays on
    CPU, int64 tensors elsewhere.
    """
    n = row.shape[0]
    index2d = index.reshape(1, -1) if index.ndim == 1 else index
    c2, c3 = _counter_hi(offset, stream)
    if row.device.type == "cpu":
        if isinstance(seed, torch.Tensor):
            keys = _keys_numpy(seed.reshape(-1).numpy().view(np.uint64))
        else:
            keys = _int_seed_keys(seed)
        as_array = index2d if isinstance(index2d, np.ndarray) else index2d.numpy()
        idx = as_array.astype(np.uint32)  # the low 32 bits, as the counter takes them
        if idx.shape[0] != n:
            idx = np.broadcast_to(idx, (n, idx.shape[1]))
        rows = row.reshape(-1, 1).numpy().astype(np.uint32)
        if idx.size <= BIGINT_MAX_COUNTERS:
            return _philox_bigint(idx, rows, c2, c3, keys)
        return _philox_numpy(idx, rows, c2, c3, keys)
    keys = _keys_torch(seed, row.device)
    return _philox_torch(index2d & _MASK32, row.reshape(-1, 1) & _MASK32, c2, c3, keys)


def _uniform_numpy(r0: np.ndarray, r1: np.ndarray) -> np.ndarray:
    hi = (r0 >> _U32_8).astype(np.float32)
    lo = (r1 >> _U32_8).astype(np.float32)
    hi *= _F32(2.0**-24)
    lo *= _F32(2.0**-48)
    lo += _F32(2.0**-52)
    hi += lo
    return hi


def uniform(seed: Seed, offset: int, row: torch.Tensor, index: torch.Tensor, stream: int) -> torch.Tensor:
    """fp32 uniforms ``hi24 * 2^-24 + (lo24 * 2^-48 + 2^-52)``, as ``reference.rng.philox_uniform``."""
    r0, r1 = philox_words(seed, offset, row, index, stream)
    if isinstance(r0, np.ndarray):
        return torch.from_numpy(_uniform_numpy(r0, r1))
    hi = (r0 >> 8).to(torch.float32)
    lo = (r1 >> 8).to(torch.float32)
    return hi * 2.0**-24 + (lo * 2.0**-48 + 2.0**-52)


def gumbel(seed: Seed, offset: int, row: torch.Tensor, index: torch.Tensor, stream: int) -> torch.Tensor:
    """fp32 Gumbel noise ``-log(E)``, ``E = -log(1 - u)`` (series below ``SMALL_U``), as the reference."""
    r0, r1 = philox_words(seed, offset, row, index, stream)
    if not isinstance(r0, np.ndarray):
        from ddiff.reference.rng import exponential_from_uniform

        u = (r0 >> 8).to(torch.float32) * 2.0**-24 + ((r1 >> 8).to(torch.float32) * 2.0**-48 + 2.0**-52)
        return -torch.log(exponential_from_uniform(u))
    u = _uniform_numpy(r0, r1)
    # E = -log(max(1 - u, MIN_ONE_MINUS_U)), computed in place in one buffer; the logs run in torch.
    e = np.subtract(_F32(1.0), u)
    np.maximum(e, _F32(MIN_ONE_MINUS_U), out=e)
    torch.from_numpy(e).log_()
    np.negative(e, out=e)
    small = u < _F32(SMALL_U)
    if small.any():
        # The series of -log(1 - u), in the reference's order of operations.
        series = u * _F32(0.2)
        series += _F32(0.25)
        series *= u
        series += _F32(1.0 / 3.0)
        series *= u
        series += _F32(0.5)
        series *= u
        series += _F32(1.0)
        series *= u
        np.copyto(e, series, where=small)
    return torch.from_numpy(e).log_().neg_()
