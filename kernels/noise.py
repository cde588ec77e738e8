"""Triton kernel for ``ddiff.ops.renoise_uniform``: keep some tokens, replace the rest by uniform ones.

One program per (row, tile of up to 1024 columns). Each position draws one Philox4x32-10 block
(counter: column, row, offset, ``STREAM_RENOISE``), forms the 64-bit integer ``r0 * 2^32 + r1``
and maps it to ``floor(x * V / 2^64)`` in int64 arithmetic, exactly as
``ddiff.reference.noise`` does, so both backends give the same tokens. The host launcher is
:func:`renoise_uniform_fwd`; ``ddiff.ops.noise`` registers it as the ``torch.library.triton_op``
``ddiff::renoise_uniform_triton``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ddiff.kernels.rng import philox4x32, rng_counter_hi, rng_key
from ddiff.reference import rng as _rng

STREAM_RENOISE = tl.constexpr(_rng.STREAM_RENOISE)
MAX_BLOCK = 1024


@triton.jit
def _renoise_uniform_kernel(
    tokens_ptr,
    keep_ptr,
    out_ptr,
    seed_ptr,
    seed_stride,
    seed_value,
    offset,
    vocab_size,
    L,
    stride_tokens,
    stride_keep,
    stride_out,
    HAS_KEEP: tl.constexpr,
    HAS_SEED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < L
    if HAS_SEED:
        seed = tl.load(seed_ptr + row * seed_stride)
    else:
        seed = seed_value + tl.zeros([], tl.int64)
    k0, k1 = rng_key(seed)
    c2, c3 = rng_counter_hi(offset, STREAM_RENOISE)
    c0 = cols.to(tl.uint32)
    c1 = (row & 0xFFFFFFFF).to(tl.uint32) + tl.zeros_like(c0)
    r0, r1, _, _ = philox4x32(c0, c1, c2 + tl.zeros_like(c0), c3 + tl.zeros_like(c0), k0, k1)
    v = vocab_size + tl.zeros([], tl.int64)
    hi = r0.to(tl.uint64).to(tl.int64) * v  # < 2^63: r0 < 2^32, V < 2^31
    lo = (r1.to(tl.uint64).to(tl.int64) * v) >> 32
    fresh = (hi + lo) >> 32
    if HAS_KEEP:
        keep = tl.load(keep_ptr + row * stride_keep + cols, mask=in_row, other=0) != 0
        old = tl.load(tokens_ptr + row * stride_tokens + cols, mask=in_row, other=0).to(tl.int64)
        fresh = tl.where(keep, old, fresh)
    tl.store(out_ptr + row * stride_out + cols, fresh, mask=in_row)


def _identity(kernel):
    return kernel


def renoise_uniform_fwd(
    tokens2d: torch.Tensor,
    keep2d: Optional[torch.Tensor],
    vocab_size: int,
    seed: Optional[torch.Tensor],
    seed_value: int,
    offset: int,
    *,
    wrap=_identity,
) -> torch.Tensor:
    """Launch the renoising kernel on ``[R, L]`` tokens. Arguments are validated by ``ddiff.ops``.

    ``keep2d`` is a bool ``[R, L]`` tensor or None (replace everything); ``seed`` an int64
    tensor of R or 1 values, else ``seed_value`` is every row's seed.
    """
    rows, length = tokens2d.shape
    out = torch.empty((rows, length), dtype=torch.int64, device=tokens2d.device)
    if rows == 0 or length == 0:
        return out
    if tokens2d.stride(1) != 1:
        tokens2d = tokens2d.contiguous()
    if keep2d is not None and keep2d.stride(1) != 1:
        keep2d = keep2d.contiguous()
    keep_arg = keep2d if keep2d is not None else tokens2d
    seed_arg = seed if seed is not None else torch.zeros(1, dtype=torch.int64, device=tokens2d.device)
    seed_stride = 0 if seed is None or seed.numel() == 1 else 1
    block = max(16, min(MAX_BLOCK, triton.next_power_of_2(length)))
    grid = (rows, triton.cdiv(length, block))
    wrap(_renoise_uniform_kernel)[grid](
        tokens2d,
        keep_arg,
        out,
        seed_arg,
        seed_stride,
        seed_value,
        offset,
        vocab_size,
        length,
        tokens2d.stride(0),
        keep_arg.stride(0),
        out.stride(0),
        HAS_KEEP=keep2d is not None,
        HAS_SEED=seed is not None,
        BLOCK=block,
        num_warps=4,
    )
    return out
