"""Triton kernel for ``ddiff.ops.select_transfer``: per-row top-k / threshold selection.

Design: one program per row; the whole row (L <= MAX_L) sits in registers.

1. Load the confidences as fp32 (NaN -> -inf, -0 -> +0) and map each to an
   order-preserving int32 key (``bits`` if the sign bit is clear, else
   ``bits ^ 0x7FFFFFFF``), so float order == signed int order.
2. Work out k, the number of tokens to commit, from the rule:
   top-k: ``min(k, N)``; threshold: ``max(#{c > τ}, min(min_transfer, N))``;
   both: ``max(#{c > τ}, min(k, N))``; factor: a bisection over the rank n of
   "at least n candidates reach Fast-dLLM's bar ``1 - f / (n + 1)``" (monotone in n for
   f > 0), then Fast-dLLM's last-rank quirk; entropy bound: a bisection over the key t of
   "the candidates more confident than t cost at most the bound" (fp64 sums of the
   entropies ``-c``), plus the members of the tie group at the boundary that still fit.
3. Find T, the k-th largest key, by bisection on the int32 key range: 32 fixed
   iterations, each one masked count (``tl.sum``).
4. Ties at T: of the candidates with key == T, take the ``k - #{key > T}`` lowest
   positions, found by a second bisection on the position (log2(BLOCK) counts).

No sorting primitives, no data-dependent host work, no ``.item()``. Row offsets are
int64. The host launcher is :func:`select_transfer_fwd`; ``ddiff.ops.selection`` registers it as the
``torch.library.triton_op`` ``ddiff::select_transfer_triton``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ddiff.reference import selection as _ref

# Longest row handled by the kernel (one row lives in registers); longer rows use the
# PyTorch reference.
MAX_L = 16384


@triton.jit
def _select_transfer_kernel(
    conf_ptr,
    mask_ptr,
    out_ptr,
    k_ptr,
    thr_ptr,
    fac_ptr,
    k_scalar,
    thr_scalar,
    min_transfer,
    L,
    stride_conf,
    stride_mask,
    stride_out,
    RULE: tl.constexpr,  # 0 top-k, 1 threshold, 2 both, 3 factor, 4 entropy bound
    K_PER_ROW: tl.constexpr,
    THR_PER_ROW: tl.constexpr,
    FAC_PER_ROW: tl.constexpr,
    BLOCK: tl.constexpr,
    LOG2_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    in_row = offs < L

    c = tl.load(conf_ptr + row * stride_conf + offs, mask=in_row, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + row * stride_mask + offs, mask=in_row, other=0)
    cand = (m != 0) & in_row
    c = tl.where(c != c, float("-inf"), c)  # NaN -> -inf
    c = tl.where(c == 0.0, 0.0, c)  # -0.0 -> +0.0, so equal floats get equal keys
    bits = c.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    n_cand = tl.sum(cand.to(tl.int32), axis=0)

    # ---- how many to commit --------------------------------------------------------
    if RULE == 3:
        if FAC_PER_ROW:
            f = tl.load(fac_ptr + row).to(tl.float64)
        else:
            f = tl.load(fac_ptr).to(tl.float64)
        # Largest n in [1, N] with #{c >= bar(n)} >= n (rank 1 always passes).
        r_lo = n_cand * 0 + 1
        r_hi = n_cand + 1
        for _ in range(LOG2_BLOCK + 1):
            r_mid = (r_lo + r_hi) >> 1
            bar = (1.0 - f / (r_mid + 1).to(tl.float64)).to(tl.float32)
            cnt = tl.sum((cand & (c >= bar)).to(tl.int32), axis=0)
            ok = (cnt >= r_mid) | (r_mid <= 1)
            r_lo = tl.where(ok, r_mid, r_lo)
            r_hi = tl.where(ok, r_hi, r_mid)
        # Fast-dLLM commits everything when the first failing rank is the last one.
        k = tl.where(r_lo >= n_cand - 1, n_cand, r_lo)
    elif RULE == 4:
        # Entropy bound (the bound rides in the threshold slot): a candidate costs its entropy
        # e = max(-c, 0). G(t) = sum of e over candidates with key > t only grows as t falls
        # (an fp64 tree sum of non-negative terms is monotone), so bisection finds the lowest
        # key t0 with G(t0) <= bound; the candidates above t0 all pass, and of the tie group at
        # t0 (cost e0 each) the first r pass while G(t0) + r * e0 <= bound.
        if THR_PER_ROW:
            bound = tl.load(thr_ptr + row).to(tl.float64)
        else:
            bound = (thr_scalar + tl.zeros([], tl.float32)).to(tl.float64)
        cost = tl.where(cand, tl.maximum(-c, 0.0), 0.0).to(tl.float64)
        key64 = key.to(tl.int64)
        t_lo = tl.full((), -2147483649, tl.int64)  # below every key: treated as failing
        t_hi = tl.full((), 2147483647, tl.int64)  # nothing lies above: G = 0 passes
        for _ in range(33):
            t_mid = (t_lo + t_hi) >> 1
            g = tl.sum(tl.where(key64 > t_mid, cost, 0.0), axis=0)
            ok = g <= bound
            t_hi = tl.where(ok, t_mid, t_hi)
            t_lo = tl.where(ok, t_lo, t_mid)
        g0 = tl.sum(tl.where(key64 > t_hi, cost, 0.0), axis=0)
        n_above = tl.sum((cand & (key64 > t_hi)).to(tl.int32), axis=0)
        at_t0 = cand & (key64 == t_hi)
        n_tied = tl.sum(at_t0.to(tl.int32), axis=0)
        e0 = tl.max(tl.where(at_t0, cost, 0.0), axis=0)
        # r * e0 with r = 0 must stay 0 (not NaN) when e0 is +inf
        spent = g0 + offs.to(tl.float64) * tl.where(offs == 0, 0.0, e0)
        k = n_above + tl.sum(((offs < n_tied) & (spent <= bound)).to(tl.int32), axis=0)
    else:
        if RULE != 1:
            if K_PER_ROW:
                k_in = tl.load(k_ptr + row).to(tl.int64)
                k_in = tl.minimum(tl.maximum(k_in, 0), n_cand.to(tl.int64)).to(tl.int32)
            else:
                k_in = tl.minimum(n_cand * 0 + k_scalar, n_cand)
        if RULE != 0:
            if THR_PER_ROW:
                thr = tl.load(thr_ptr + row).to(tl.float32)
            else:
                thr = thr_scalar
            n_pass = tl.sum((cand & (c > thr)).to(tl.int32), axis=0)
        if RULE == 0:
            k = k_in
        elif RULE == 1:
            k = tl.maximum(n_pass, tl.minimum(n_cand * 0 + min_transfer, n_cand))
        else:
            k = tl.maximum(n_pass, k_in)

    # ---- k-th largest key by bisection over the int32 range --------------------------
    lo = tl.full((), -2147483648, tl.int64)  # count(key >= lo) >= k holds
    hi = tl.full((), 2147483648, tl.int64)  # exclusive
    for _ in range(32):
        mid = (lo + hi) >> 1
        cnt = tl.sum((cand & (key >= mid.to(tl.int32))).to(tl.int32), axis=0)
        ok = cnt >= k
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    kth = lo.to(tl.int32)

    # ---- ties at the k-th key: the lowest positions win ------------------------------
    above = cand & (key > kth)
    tied = cand & (key == kth)
    need = k - tl.sum(above.to(tl.int32), axis=0)
    p_lo = n_cand * 0 - 1  # count(tied & offs <= p_lo) < need (need >= 1)
    p_hi = n_cand * 0 + (BLOCK - 1)  # count(tied & offs <= p_hi) >= need
    for _ in range(LOG2_BLOCK):
        p_mid = (p_lo + p_hi) >> 1
        cnt = tl.sum((tied & (offs <= p_mid)).to(tl.int32), axis=0)
        ok = cnt >= need
        p_lo = tl.where(ok, p_lo, p_mid)
        p_hi = tl.where(ok, p_mid, p_hi)
    sel = (above | (tied & (offs <= p_hi))) & (k > 0)
    tl.store(out_ptr + row * stride_out + offs, sel, mask=in_row)


def _num_warps(block: int) -> int:
    if block <= 2048:
        return 4
    if block <= 8192:
        return 8
    return 16


def _identity(kernel):
    return kernel


def select_transfer_fwd(
    confidence: torch.Tensor,
    mask: torch.Tensor,
    k: Optional[torch.Tensor],
    k_scalar: int,
    threshold: Optional[torch.Tensor],
    threshold_scalar: float,
    factor: Optional[torch.Tensor],
    factor_scalar: float,
    rule: int,
    min_transfer: int,
    *,
    wrap=_identity,
) -> torch.Tensor:
    """Launch the selection kernel. Arguments are already validated by ``ddiff.ops``.

    ``rule``: 0 top-k, 1 threshold, 2 both, 3 factor, 4 entropy bound (the bound is passed as
    ``threshold`` / ``threshold_scalar``). A per-row value is given by its
    tensor (shape [B] or []); otherwise the ``*_scalar`` value is used.
    """
    batch, length = confidence.shape
    out = torch.empty((batch, length), dtype=torch.bool, device=confidence.device)
    if batch == 0 or length == 0:
        out.zero_()
        return out
    if length > MAX_L:
        return _ref.select_transfer_reference(
            confidence,
            mask,
            num_transfer=None if rule in (1, 3, 4) else (k if k is not None else k_scalar),
            threshold=None if rule in (0, 3, 4) else (threshold if threshold is not None else threshold_scalar),
            factor=None if rule != 3 else (factor if factor is not None else factor_scalar),
            entropy_bound=None if rule != 4 else (threshold if threshold is not None else threshold_scalar),
            min_transfer=min_transfer,
        )

    if confidence.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        confidence = confidence.to(torch.float32)
    if confidence.stride(1) != 1:
        confidence = confidence.contiguous()
    if mask.stride(1) != 1:
        mask = mask.contiguous()

    def per_row(t, dtype):  # [B] or [] -> contiguous [B]
        return t.to(dtype).reshape(-1).expand(batch).contiguous()

    # Absent per-row tensors are None (a constexpr the kernel never reads, guarded by *_PER_ROW).
    k_t = per_row(k, torch.int64) if k is not None else None
    thr_t = per_row(threshold, torch.float32) if threshold is not None else None
    if factor is not None:
        fac_t = per_row(factor, torch.float64)
    elif rule == 3:  # the scalar factor travels as float64, as Fast-dLLM computes its bar
        fac_t = torch.full((1,), factor_scalar, dtype=torch.float64, device=confidence.device)
    else:
        fac_t = None

    block = max(16, triton.next_power_of_2(length))
    wrap(_select_transfer_kernel)[(batch,)](
        confidence,
        mask,
        out,
        k_t,
        thr_t,
        fac_t,
        min(int(k_scalar), length),
        float(threshold_scalar),
        min(int(min_transfer), length),
        length,
        confidence.stride(0),
        mask.stride(0),
        out.stride(0),
        RULE=rule,
        K_PER_ROW=k is not None,
        THR_PER_ROW=threshold is not None,
        FAC_PER_ROW=factor is not None,
        BLOCK=block,
        LOG2_BLOCK=block.bit_length() - 1,
        num_warps=_num_warps(block),
    )
    return out
