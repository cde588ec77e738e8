"""Counter-based noise shared bit for bit by the torch and triton backends.

Every random number ddiff draws is a pure function of ``(seed, offset, row, index, stream)``:

* a Philox4x32-10 block (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3") with
  key ``(seed mod 2^32, seed >> 32)`` and counter
  ``(index, row, offset mod 2^32, (offset >> 32) | stream << 24)``;
* ``index`` is the vocabulary column for per-token noise, or the noise-tile number for
  per-tile noise; ``stream`` separates independent uses (token noise, tile noise, the
  ``"random"`` confidence, posterior coin flips) so they never share a counter.

A draw therefore depends on nothing else: not on block sizes, launch configuration or the
other rows of the batch. The triton kernels compute the same integers with the same
formulas (``ddiff.kernels.rng``); only the final transcendental functions (``log``) may differ
by an ulp between devices.

Uniforms keep the Gumbel tail. 24-bit uniforms (what ``torch.rand`` gives in fp32) cut the
Gumbel tail at ``-log(-log(1 - 2^-24)) ~= 16.6``, which is why LLaDA pays for float64 noise
(arXiv 2409.02908). Here two Philox words make one uniform with 48 random bits,
``u = hi24 * 2^-24 + (lo24 * 2^-48 + 2^-52)``: its smallest value is ``2^-52`` (below the
``2^-50`` bound), and fp32 keeps that resolution near 0 because small numbers are stored with
their own exponent. The Gumbel variable is then ``G = -log(E)`` with the exponential
``E = -log(1 - u)`` evaluated as a series for small ``u``, so the upper tail of G (the draws
that win a race) reaches ``-log(2^-52) ~= 36``, like float64 noise.
"""

from __future__ import annotations

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

# Independent noise streams: part of the semantics, shared with ddiff.kernels.rng.
STREAM_TOKEN = 0  # per-column Gumbel noise for the token race
STREAM_TILE = 1  # per-noise-tile Gumbel noise for the tile race
STREAM_CONFIDENCE = 2  # uniforms for confidence="random"
STREAM_POSTERIOR = 3  # coin flips / uniforms of posterior steps
STREAM_RENOISE = 4  # uniform replacement tokens (ddiff.renoise_uniform)
STREAM_SELECT = 5  # Gumbel keys of select_transfer(temperature=...): positions sampled without replacement

# Hierarchical Gumbel-max: one noise value per tile of NOISE_TILE columns picks a tile,
# then one per column of that tile picks the token. Part of the semantics of `sample`.
NOISE_TILE = 1024

MAX_OFFSET = 1 << 56
MAX_ROWS = 1 << 32

_MASK32 = 0xFFFFFFFF
SMALL_U = 2.0**-6  # below this, -log(1 - u) uses its series: 1 - u would lose u's low bits
MIN_ONE_MINUS_U = 2.0**-26  # u may round to 1.0 in fp32; keep E finite so no score is NaN


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``a * m`` for ``a`` holding uint32 values in int64."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    p_hi = a * m_hi  # < 2^48
    p_lo = a * m_lo  # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcasting)."""
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uniform_from_bits(r0: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """fp32 uniform in (0, 1] from two uint32 words: ``hi24 * 2^-24 + (lo24 * 2^-48 + 2^-52)``."""
    hi = (r0 >> 8).to(torch.float32)
    lo = (r1 >> 8).to(torch.float32)
    return hi * 2.0**-24 + (lo * 2.0**-48 + 2.0**-52)


def exponential_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """``E = -log(1 - u)``, accurate for tiny ``u`` (series) and finite for ``u`` = 1."""
    series = u * (1.0 + u * (0.5 + u * (1.0 / 3.0 + u * (0.25 + u * 0.2))))
    direct = -torch.log(torch.clamp(1.0 - u, min=MIN_ONE_MINUS_U))
    return torch.where(u < SMALL_U, series, direct)


def _split_seed(seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seed = seed.to(torch.int64)
    return seed & _MASK32, (seed >> 32) & _MASK32


def philox_uniform(seed, offset: int, row, index, stream: int) -> torch.Tensor:
    """fp32 uniforms for broadcastable int64 ``seed``, ``row`` and ``index`` tensors."""
    k0, k1 = _split_seed(seed)
    row = row.to(torch.int64) & _MASK32
    index = index.to(torch.int64) & _MASK32
    c2 = torch.tensor(offset & _MASK32, dtype=torch.int64, device=index.device)
    c3 = torch.tensor(((offset >> 32) & 0xFFFFFF) | (stream << 24), dtype=torch.int64, device=index.device)
    r0, r1, _, _ = philox4x32(index, row, c2, c3, k0, k1)
    return uniform_from_bits(r0, r1)


def philox_gumbel(seed, offset: int, row, index, stream: int) -> torch.Tensor:
    """fp32 Gumbel(0, 1) noise ``-log(E)`` with ``E = -log(1 - u)``."""
    return -torch.log(exponential_from_uniform(philox_uniform(seed, offset, row, index, stream)))
