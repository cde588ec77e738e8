"""Triton side of ddiff's counter-based noise; mirrors ``ddiff.reference.rng`` bit for bit.

See that module for the construction. The integer pipeline (Philox4x32-10 and the 48-bit
uniform) is exact in both backends; only ``log`` may differ by an ulp.
"""

import triton
import triton.language as tl

from ddiff.reference import rng as _rng

# Globals read inside @triton.jit functions must be constexpr.
MIN_ONE_MINUS_U = tl.constexpr(_rng.MIN_ONE_MINUS_U)
SMALL_U = tl.constexpr(_rng.SMALL_U)


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 values (Random123 round function and key schedule)."""
    m0 = tl.full([], 0xD2511F53, tl.uint32)
    m1 = tl.full([], 0xCD9E8D57, tl.uint32)
    w0 = tl.full([], 0x9E3779B9, tl.uint32)
    w1 = tl.full([], 0xBB67AE85, tl.uint32)
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + w0
            k1 = k1 + w1
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def rng_key(seed):
    """Philox key words from an int64 seed (any value; its 64 bits are used)."""
    seed = seed + tl.zeros([], tl.int64)
    return (seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def rng_counter_hi(offset, STREAM: tl.constexpr):
    """The two high counter words: (offset mod 2^32, (offset >> 32) | stream << 24)."""
    offset = offset + tl.zeros([], tl.int64)
    c2 = (offset & 0xFFFFFFFF).to(tl.uint32)
    c3 = (((offset >> 32) & 0xFFFFFF) | (STREAM << 24)).to(tl.uint32)
    return c2, c3


@triton.jit
def uniform_from_bits(r0, r1):
    hi = (r0 >> 8).to(tl.float32)
    lo = (r1 >> 8).to(tl.float32)
    return hi * 5.9604644775390625e-08 + (lo * 3.552713678800501e-15 + 2.220446049250313e-16)


@triton.jit
def exponential_from_uniform(u):
    series = u * (1.0 + u * (0.5 + u * (0.3333333333333333 + u * (0.25 + u * 0.2))))
    direct = -tl.log(tl.maximum(1.0 - u, MIN_ONE_MINUS_U))
    return tl.where(u < SMALL_U, series, direct)


@triton.jit
def philox_uniform(k0, k1, c2, c3, row, index):
    """Uniforms for ``index`` (any int tensor) of ``row``; key and high counter precomputed."""
    c0 = (index + tl.zeros([], tl.int64)).to(tl.uint32)
    c1 = ((row + tl.zeros([], tl.int64)) & 0xFFFFFFFF).to(tl.uint32) + tl.zeros_like(c0)
    r0, r1, _, _ = philox4x32(c0, c1, c2 + tl.zeros_like(c0), c3 + tl.zeros_like(c0), k0, k1)
    return uniform_from_bits(r0, r1)


@triton.jit
def philox_gumbel(k0, k1, c2, c3, row, index):
    return -tl.log(exponential_from_uniform(philox_uniform(k0, k1, c2, c3, row, index)))
