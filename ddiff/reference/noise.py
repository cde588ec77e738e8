"""Plain PyTorch reference for ``ddiff.renoise_uniform``: uniform replacement tokens.

Position ``(row, col)`` of a ``[R, L]`` canvas draws its token from one Philox4x32-10 block
with the counter layout of :mod:`ddiff.reference.rng` (index = ``col``, row = ``row``, stream
``STREAM_RENOISE``), so the draw depends on nothing but ``(seed, offset, row, col)``. The two
first 32-bit words form a 64-bit integer ``x``, and the token is ``floor(x * V / 2^64)``
(multiply-shift): exact integer arithmetic, identical in both backends, with every token's
probability within ``2^-64`` of ``1 / V`` (``floor(u * V)`` from a 24-bit float uniform ``u``
gives some tokens 111 of the 2^24 values and others 110 at V = 151936, a 0.9% bias).
"""

from __future__ import annotations

import torch

from ddiff.reference.rng import STREAM_RENOISE, philox4x32

_MASK32 = 0xFFFFFFFF


def uniform_token_words(seed_rows: torch.Tensor, offset: int, length: int):
    """The first two Philox words ``(r0, r1)`` of every position of a ``[R, length]`` canvas."""
    device = seed_rows.device
    rows = torch.arange(seed_rows.numel(), device=device, dtype=torch.int64)[:, None]
    cols = torch.arange(length, device=device, dtype=torch.int64)[None, :]
    seed = seed_rows.to(torch.int64)[:, None]
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c2 = torch.tensor(offset & _MASK32, dtype=torch.int64, device=device)
    c3 = torch.tensor(((offset >> 32) & 0xFFFFFF) | (STREAM_RENOISE << 24), dtype=torch.int64, device=device)
    r0, r1, _, _ = philox4x32(cols.expand(rows.shape[0], length), rows & _MASK32, c2, c3, k0, k1)
    return r0, r1


def uniform_tokens_reference(seed_rows: torch.Tensor, offset: int, length: int, vocab_size: int) -> torch.Tensor:
    """int64 ``[R, length]`` tokens, uniform over ``[0, vocab_size)``: ``floor((r0 * 2^32 + r1) * V / 2^64)``."""
    r0, r1 = uniform_token_words(seed_rows, offset, length)
    # (r0 * V + floor(r1 * V / 2^32)) / 2^32, floored: both products stay below 2^63.
    return (r0 * vocab_size + ((r1 * vocab_size) >> 32)) >> 32


def renoise_uniform_reference(tokens2d: torch.Tensor, keep2d, vocab_size: int, seed_rows: torch.Tensor,
                              offset: int) -> torch.Tensor:
    """``tokens`` where ``keep``, a fresh uniform token elsewhere (everywhere when ``keep`` is None)."""
    fresh = uniform_tokens_reference(seed_rows, offset, tokens2d.shape[1], vocab_size)
    if keep2d is None:
        return fresh
    return torch.where(keep2d, tokens2d.to(torch.int64), fresh)
