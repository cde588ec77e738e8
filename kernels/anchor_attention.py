"""Triton kernels for ``ddiff.ops.anchor_attention``: DFlash block-diagonal anchor attention.

The rule (see ``ddiff/reference/attention.py``): query block ``b`` (``BLOCK_SIZE`` rows) attends
to the context keys ``j < anchors[b]`` and to its own noise block, the keys
``context_len + b * BLOCK_SIZE ... + BLOCK_SIZE - 1``. Dropped blocks (``keep == False``) attend to
nothing and output zero.

Design
------
* **Sorting.** The host sorts each batch row's blocks by anchor (stable), dropped blocks first
  with anchor -1. The kernels walk query rows in this *sorted* order but read and write q, o, dq
  and the noise keys k, v, dk, dv at their *original* positions through ``PERM`` (sorted slot ->
  original block), so nothing is permuted in memory and the caller never sees the sort. Sorting
  turns the jagged context edge into a staircase: the anchors inside one query tile are close to
  each other, so a tile's context work is ~ its own rows' work.
* **Noise blocks as a batched product.** Only the ``BLOCK_SIZE x BLOCK_SIZE`` diagonal blocks of
  the noise part are live. When ``BLOCK_SIZE`` is a power of two >= 16 that divides the tile
  (``NOISE_3D``), the kernels compute them as one batched ``[blocks, BLOCK_SIZE, BLOCK_SIZE]``
  product (``tl.dot`` on 3-D tensors): exactly the live entries, where a 2-D tile over the
  noise keys computes ``BLOCK_M / BLOCK_SIZE`` times more. Other block sizes take the masked 2-D
  walk over the noise keys.
* **Forward** (one program per (query tile, batch*head)): an online softmax (exp2, log-sum-exp
  kept in base 2) that starts from the tile's noise blocks (every kept row gets a finite max
  there) and then walks the context tiles below the tile's largest anchor. Context tiles below
  the tile's smallest anchor need no mask; only the last one or two tiles (the staircase step)
  are masked per row.
* **Backward**: ``delta = rowsum(dO * O)`` (preprocess), then

  - dk/dv: one program per (key tile, batch*kv_head), accumulating over the query heads of the GQA
    group. A context key tile ``[n0, n0 + BLOCK_N)`` is seen only by the blocks with
    ``anchor > n0``: with sorted anchors a suffix of the query rows, found in-kernel by counting
    anchors (no host work). Rows with ``anchor >= n0 + BLOCK_N`` see the whole tile unmasked.
    A noise key tile is seen only by its own blocks' rows (batched, ``NOISE_CHUNK`` blocks at a
    time, when ``NOISE_3D``).
  - dq: one program per (query tile, batch*head), visiting the same key tiles as the forward
    through the same walk (``_walk_keys``), with the dq step instead of the softmax step.

  Both recompute P from the saved log-sum-exp; nothing of size Q x KV is ever stored.
* Batch/head offsets are int64. Dropped rows load dO as zero and are masked out of P, so they give
  exactly zero dq and contribute nothing to dk/dv, and their output is exactly zero (never NaN).
* Non-finite keys and values reach only the rows that see them. Scores are masked with
  ``tl.where``; in the masked tiles (a key tile a row only partly sees) the non-finite K / V
  entries are zeroed before the products that would give ``0 * NaN``, and a row that does see one
  there gets a NaN weight (its whole output row is NaN, also for an inf) or a NaN / non-finite dS
  (its dq row). dS is zero off the live keys, so the keys no kept row sees get exactly zero dk/dv.
  The unmasked tiles are unchanged.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634

# Key ranges of ``_walk_keys`` (KEYS constexpr).
_NOISE_2D = tl.constexpr(0)  # the tile's own noise blocks, masked to the diagonal blocks
_CONTEXT_FULL = tl.constexpr(1)  # context keys every row of the tile sees
_CONTEXT_MASKED = tl.constexpr(2)  # context keys below each row's anchor
# What ``_walk_keys`` accumulates (KIND constexpr).
_FORWARD = tl.constexpr(0)
_GRAD_Q = tl.constexpr(1)


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, acc, DOT_PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation (2-D or batched 3-D). ``DOT_PRECISION == "upcast"`` is for the
    CPU interpreter only, whose tl.dot multiplies bf16 operands as raw integers: the operands
    (already rounded to their storage dtype) are widened to fp32 first, which gives the same exact
    products a tensor core forms, accumulated in fp32."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT_PRECISION == "ieee":
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _sorted_query_rows(ANC, PERM, pid_m, q_len, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr):
    """A query tile's rows in sorted-block order.

    Returns (sorted row index, its sorted block, in range, the block's anchor, the caller's row);
    the anchor is -1 for a dropped block or a padding row.
    """
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len
    q_blk = offs_m // BLOCK_SIZE
    row_anchor = tl.load(ANC + q_blk, mask=row_ok, other=-1)
    q_row = tl.load(PERM + q_blk, mask=row_ok, other=0) * BLOCK_SIZE + offs_m % BLOCK_SIZE
    return offs_m, q_blk, row_ok, row_anchor, q_row


@triton.jit
def _sorted_blocks(ANC, PERM, slot0, num_blocks, NB: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Sorted blocks ``slot0 .. slot0 + NB - 1`` as ``[NB, BLOCK_SIZE]`` row grids.

    Returns (sorted row index, the caller's row, kept [NB]); a dropped or padding block is not
    kept. A block's noise keys sit at ``context_len + `` its caller's rows.
    """
    slots = slot0 + tl.arange(0, NB)
    ok = slots < num_blocks
    kept = tl.load(ANC + slots, mask=ok, other=-1) >= 0
    i = tl.arange(0, BLOCK_SIZE)[None, :]
    sorted_row = slots[:, None] * BLOCK_SIZE + i
    row = tl.load(PERM + slots, mask=ok, other=0)[:, None] * BLOCK_SIZE + i
    return sorted_row, row, kept


@triton.jit
def _load_rows3(X, rows, ok, stride_m, stride_d, HEAD_DIM: tl.constexpr):
    """``X[rows, :]`` for a ``[NB, BLOCK_SIZE]`` grid of rows: ``[NB, BLOCK_SIZE, HEAD_DIM]``, zero
    where ``ok`` ([NB]) is False."""
    d = tl.arange(0, HEAD_DIM)[None, None, :]
    return tl.load(X + rows[:, :, None] * stride_m + d * stride_d, mask=ok[:, None, None], other=0.0)


@triton.jit
def _trans3(x):
    """Swap the last two axes of a batched ``[NB, R, C]`` tile."""
    return tl.trans(x, (0, 2, 1))


@triton.jit
def _key_ranges(pid_m, row_ok, row_anchor, q_len, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """The key ranges a query tile visits.

    Returns (noise_lo, noise_hi, ctx_full, ctx_hi): its own noise blocks are the sorted keys
    ``[noise_lo, noise_hi)`` (empty when every row is dropped); context keys ``[0, ctx_full)`` are
    seen by every row (whole tiles below the smallest anchor), ``[ctx_full, ctx_hi)`` by the rows
    whose anchor lies beyond.
    """
    max_anchor = tl.max(row_anchor, 0)
    tile_lo = pid_m * BLOCK_M
    noise_lo = (tile_lo // BLOCK_SIZE) * BLOCK_SIZE
    noise_hi = tl.minimum(q_len, ((tile_lo + BLOCK_M - 1) // BLOCK_SIZE + 1) * BLOCK_SIZE)
    noise_hi = tl.where(max_anchor >= 0, noise_hi, noise_lo)  # every row dropped: nothing to do
    min_anchor = tl.min(tl.where(row_ok, row_anchor, max_anchor), 0)
    ctx_full = (tl.maximum(min_anchor, 0) // BLOCK_N) * BLOCK_N
    return noise_lo, noise_hi, ctx_full, tl.maximum(max_anchor, 0)


@triton.jit
def _load_key_tile(X, pos, n_ok, stride_n, stride_d, HEAD_DIM: tl.constexpr, TRANSPOSED: tl.constexpr,
                   MASKED: tl.constexpr):
    """Rows ``pos`` of K or V: ``[BLOCK_N, HEAD_DIM]``, or ``[HEAD_DIM, BLOCK_N]`` when ``TRANSPOSED``."""
    d = tl.arange(0, HEAD_DIM)
    if TRANSPOSED:
        ptrs = X + pos[None, :] * stride_n + d[:, None] * stride_d
        ok = n_ok[None, :]
    else:
        ptrs = X + pos[:, None] * stride_n + d[None, :] * stride_d
        ok = n_ok[:, None]
    if MASKED:
        tile = tl.load(ptrs, mask=ok, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


# ---------------------------------------------------------------------------------------------
# Forward and dq: one walk over the key tiles, two steps
# ---------------------------------------------------------------------------------------------


@triton.jit
def _finite(x):
    """Elementwise: x is neither NaN nor +-inf."""
    return tl.abs(x) < float("inf")


@triton.jit
def _bad_keys(ok, AXIS: tl.constexpr):
    """[BLOCK_N] flag: the key's loaded row holds a non-finite entry (``ok`` False somewhere along
    its head-dim ``AXIS``)."""
    return tl.max(tl.where(ok, 0, 1), AXIS) != 0


@triton.jit
def _fwd_step(acc, l_i, m_i, q, kT, v, live, qk_scale, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile of the online softmax (scores in base-2 units).

    In a masked tile a zero weight would meet the values of keys the row must not see
    (``0 * NaN = NaN``): the non-finite values are zeroed for the product, and a row that does see
    one gets a NaN weight on that key, so all of its ``acc`` is NaN (its output is NaN; an inf value
    gives NaN, not inf). Its l and m stay finite, as without the zeroing.
    """
    s = _mm(q, kT, None, DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where(live, s, float("-inf"))
        v_ok = _finite(v)
        bad = _bad_keys(v_ok, 1)
        v = tl.where(v_ok, v, 0.0)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # A row with nothing live so far keeps m = -inf; subtract 0 instead (no inf - inf).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASKED:
        p = tl.where(live & bad[None, :], float("nan"), p)
    acc = _mm(p.to(v.dtype), v, acc, DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _dq_step(dq, q, do, lse, delta, kT, vT, live, qk_scale, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile of dq: P from the saved log-sum-exp, dS = P * (dO V^T - delta), dq += dS K.

    In a masked tile the keys and values the row must not see are kept out as in the forward:
    dS is zero off the live keys (a non-finite value only reaches dP, a non-finite key the scores)
    and the non-finite keys are zeroed for dS K. A row that sees a non-finite key (its score is not
    finite) gets a NaN dS there, so all of its dq is NaN; one that sees a non-finite value gets it
    through dP.
    """
    s = _mm(q, kT, None, DOT_PRECISION) * qk_scale
    p = tl.exp2(s - lse[:, None])
    dp = _mm(do, vT, None, DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if MASKED:
        ds = tl.where(live, tl.where(_finite(s), ds, float("nan")), 0.0)
        kT = tl.where(_finite(kT), kT, 0.0)
    return _mm(ds.to(kT.dtype), tl.trans(kT), dq, DOT_PRECISION)


@triton.jit
def _walk_keys(acc, l_i, m_i, q, do, lse, delta, K, V, PERM, q_blk, row_anchor, kept, lo, hi, context_len,
               qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
               KEYS: tl.constexpr, KIND: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Visit the key tiles ``[lo, hi)`` of one range (``KEYS``) and accumulate into the state.

    ``KIND == _FORWARD``: the online softmax state (acc, l_i, m_i); ``do``, ``lse`` and ``delta``
    are not read. ``KIND == _GRAD_Q``: ``acc`` is dq; ``l_i`` and ``m_i`` pass through.
    """
    masked: tl.constexpr = KEYS != _CONTEXT_FULL
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        if KEYS == _NOISE_2D:
            k_blk = offs_n // BLOCK_SIZE
            pos = context_len + tl.load(PERM + k_blk, mask=n_ok, other=0) * BLOCK_SIZE + offs_n % BLOCK_SIZE
            live = (q_blk[:, None] == k_blk[None, :]) & kept[:, None] & n_ok[None, :]
        elif KEYS == _CONTEXT_MASKED:
            pos = offs_n
            live = offs_n[None, :] < row_anchor[:, None]
        else:
            pos = offs_n
            live = kept[:, None]  # not read: every row sees these keys
        kT = _load_key_tile(K, pos, n_ok, stride_kn, stride_kd, HEAD_DIM, True, masked)
        if KIND == _FORWARD:
            v = _load_key_tile(V, pos, n_ok, stride_vn, stride_vd, HEAD_DIM, False, masked)
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, kT, v, live, qk_scale, masked, DOT_PRECISION)
        else:
            vT = _load_key_tile(V, pos, n_ok, stride_vn, stride_vd, HEAD_DIM, True, masked)
            acc = _dq_step(acc, q, do, lse, delta, kT, vT, live, qk_scale, masked, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _noise_blocks(Q, K, V, DO, LSE, DELTA, ANC, PERM, pid_m, num_blocks, context_len, qk_scale,
                  stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_dom, stride_dod,
                  KIND: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """A query tile's own noise blocks as one batched product (``NOISE_3D``).

    ``KIND == _FORWARD``: the initial softmax state (acc [BLOCK_M, D], l, m in base 2; m = -inf for
    dropped and padding rows). ``KIND == _GRAD_Q``: (dq [BLOCK_M, D], 0, 0).
    """
    NB: tl.constexpr = BLOCK_M // BLOCK_SIZE
    sorted_row, row, kept = _sorted_blocks(ANC, PERM, pid_m * NB, num_blocks, NB, BLOCK_SIZE)
    q = _load_rows3(Q, row, kept, stride_qm, stride_qd, HEAD_DIM)
    k = _load_rows3(K, context_len + row, kept, stride_kn, stride_kd, HEAD_DIM)
    v = _load_rows3(V, context_len + row, kept, stride_vn, stride_vd, HEAD_DIM)
    s = _mm(q, _trans3(k), None, DOT_PRECISION) * qk_scale  # [NB, BLOCK_SIZE (query), BLOCK_SIZE (key)]
    live = kept[:, None, None]
    if KIND == _FORWARD:
        m = tl.max(s, 2)
        p = tl.where(live, tl.exp2(s - m[:, :, None]), 0.0)
        acc = _mm(p.to(v.dtype), v, None, DOT_PRECISION)
        l = tl.sum(p, 2)
        m = tl.where(kept[:, None], m, float("-inf"))
    else:
        do = _load_rows3(DO, row, kept, stride_dom, stride_dod, HEAD_DIM)
        lse = tl.load(LSE + sorted_row, mask=kept[:, None], other=0.0)
        delta = tl.load(DELTA + sorted_row, mask=kept[:, None], other=0.0)
        p = tl.where(live, tl.exp2(s - lse[:, :, None]), 0.0)
        ds = p * (_mm(do, _trans3(v), None, DOT_PRECISION) - delta[:, :, None])
        acc = _mm(ds.to(k.dtype), k, None, DOT_PRECISION)
        l = tl.zeros([NB, BLOCK_SIZE], tl.float32)
        m = l
    return tl.reshape(acc, (BLOCK_M, HEAD_DIM)), tl.reshape(l, (BLOCK_M,)), tl.reshape(m, (BLOCK_M,))


@triton.jit
def _anchor_attn_fwd(
    Q, K, V, O, LSE, ANC, PERM,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    qk_scale, context_len, num_blocks, num_heads, group,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NOISE_3D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Heaviest tiles first: with sorted anchors the last query tiles see the most context.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group
    q_len = num_blocks * BLOCK_SIZE
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    O += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    K += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    ANC += b.to(tl.int64) * num_blocks
    PERM += b.to(tl.int64) * num_blocks
    LSE += pid_bh.to(tl.int64) * q_len

    offs_m, q_blk, row_ok, row_anchor, q_row = _sorted_query_rows(ANC, PERM, pid_m, q_len, BLOCK_SIZE, BLOCK_M)
    kept = row_anchor >= 0
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + q_row[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    noise_lo, noise_hi, ctx_full, ctx_hi = _key_ranges(pid_m, row_ok, row_anchor, q_len, BLOCK_SIZE, BLOCK_M,
                                                       BLOCK_N)
    if NOISE_3D:
        acc, l_i, m_i = _noise_blocks(Q, K, V, Q, LSE, LSE, ANC, PERM, pid_m, num_blocks, context_len, qk_scale,
                                      stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                                      stride_qm, stride_qd, _FORWARD, BLOCK_SIZE, HEAD_DIM, BLOCK_M, DOT_PRECISION)
    else:
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        acc, l_i, m_i = _walk_keys(acc, l_i, m_i, q, q, l_i, l_i, K, V, PERM, q_blk, row_anchor, kept,
                                   noise_lo, noise_hi, context_len, qk_scale, stride_kn, stride_kd, stride_vn,
                                   stride_vd, _NOISE_2D, _FORWARD, BLOCK_SIZE, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _walk_keys(acc, l_i, m_i, q, q, l_i, l_i, K, V, PERM, q_blk, row_anchor, kept, 0, ctx_full,
                               context_len, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, _CONTEXT_FULL,
                               _FORWARD, BLOCK_SIZE, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _walk_keys(acc, l_i, m_i, q, q, l_i, l_i, K, V, PERM, q_blk, row_anchor, kept, ctx_full,
                               ctx_hi, context_len, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
                               _CONTEXT_MASKED, _FORWARD, BLOCK_SIZE, HEAD_DIM, BLOCK_N, DOT_PRECISION)

    l_safe = tl.where(kept, l_i, 1.0)  # a kept row has l >= 1 (its max term is exp2(0))
    out = tl.where(kept[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(kept, m_i + tl.log2(l_safe), 0.0)
    tl.store(LSE + offs_m, lse, mask=row_ok)
    tl.store(O + q_row[:, None] * stride_om + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _anchor_attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, ANC, PERM,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    sm_scale, qk_scale, context_len, num_blocks, num_heads, group,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NOISE_3D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Heaviest tiles first: with sorted anchors the last query tiles see the most context.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group
    q_len = num_blocks * BLOCK_SIZE
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    DO += b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    DQ += b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
    K += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    ANC += b.to(tl.int64) * num_blocks
    PERM += b.to(tl.int64) * num_blocks
    LSE += pid_bh.to(tl.int64) * q_len
    DELTA += pid_bh.to(tl.int64) * q_len

    offs_m, q_blk, row_ok, row_anchor, q_row = _sorted_query_rows(ANC, PERM, pid_m, q_len, BLOCK_SIZE, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kept = row_ok & (row_anchor >= 0)
    q = tl.load(Q + q_row[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_row[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=kept[:, None], other=0.0)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    noise_lo, noise_hi, ctx_full, ctx_hi = _key_ranges(pid_m, row_ok, row_anchor, q_len, BLOCK_SIZE, BLOCK_M,
                                                       BLOCK_N)
    unused = tl.zeros([BLOCK_M], tl.float32)
    if NOISE_3D:
        dq, _, _ = _noise_blocks(Q, K, V, DO, LSE, DELTA, ANC, PERM, pid_m, num_blocks, context_len, qk_scale,
                                 stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                                 stride_dom, stride_dod, _GRAD_Q, BLOCK_SIZE, HEAD_DIM, BLOCK_M, DOT_PRECISION)
    else:
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        dq, _, _ = _walk_keys(dq, unused, unused, q, do, lse, delta, K, V, PERM, q_blk, row_anchor, kept,
                              noise_lo, noise_hi, context_len, qk_scale, stride_kn, stride_kd, stride_vn,
                              stride_vd, _NOISE_2D, _GRAD_Q, BLOCK_SIZE, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    dq, _, _ = _walk_keys(dq, unused, unused, q, do, lse, delta, K, V, PERM, q_blk, row_anchor, kept, 0, ctx_full,
                          context_len, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, _CONTEXT_FULL, _GRAD_Q,
                          BLOCK_SIZE, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    dq, _, _ = _walk_keys(dq, unused, unused, q, do, lse, delta, K, V, PERM, q_blk, row_anchor, kept, ctx_full,
                          ctx_hi, context_len, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, _CONTEXT_MASKED,
                          _GRAD_Q, BLOCK_SIZE, HEAD_DIM, BLOCK_N, DOT_PRECISION)

    dq = tl.where(kept[:, None], dq * sm_scale, 0.0)
    tl.store(DQ + q_row[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------
# Backward: delta and dk / dv
# ---------------------------------------------------------------------------------------------


@triton.jit
def _anchor_attn_bwd_preprocess(
    O, DO, DELTA, ANC, PERM,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    num_blocks, num_heads,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[row] = sum_d dO[row, d] * O[row, d], stored in sorted row order (0 for dropped rows)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_len = num_blocks * BLOCK_SIZE
    O += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    DO += b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    ANC += b.to(tl.int64) * num_blocks
    PERM += b.to(tl.int64) * num_blocks
    DELTA += pid_bh.to(tl.int64) * q_len

    offs_m, _, row_ok, row_anchor, q_row = _sorted_query_rows(ANC, PERM, pid_m, q_len, BLOCK_SIZE, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ld = (row_ok & (row_anchor >= 0))[:, None]
    o = tl.load(O + q_row[:, None] * stride_om + offs_d[None, :] * stride_od, mask=ld, other=0.0)
    do = tl.load(DO + q_row[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=ld, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + offs_m, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_rows(
    dk, dv, k, v, Q, DO, LSE, DELTA, ANC, PERM,
    stride_qm, stride_qd, stride_dom, stride_dod,
    offs_n, k_blk, row_lo, row_hi, qk_scale,
    MODE: tl.constexpr,  # 0: context, masked per row; 1: context, fully live; 2: own noise block
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dk, dv of one key tile over the (sorted) query rows [row_lo, row_hi) of one head."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(row_lo, row_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < row_hi
        q_blk = offs_m // BLOCK_SIZE
        row_anchor = tl.load(ANC + q_blk, mask=m_ok, other=-1)
        q_row = tl.load(PERM + q_blk, mask=m_ok, other=0) * BLOCK_SIZE + offs_m % BLOCK_SIZE
        kept = m_ok & (row_anchor >= 0)
        qT = tl.load(Q + q_row[None, :] * stride_qm + offs_d[:, None] * stride_qd, mask=m_ok[None, :], other=0.0)
        do = tl.load(DO + q_row[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=kept[:, None], other=0.0)
        lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
        pT = tl.exp2(_mm(k, qT, None, DOT_PRECISION) * qk_scale - lse[None, :])
        if MODE == 0:
            pT_live = (offs_n[:, None] < row_anchor[None, :]) & m_ok[None, :]
            pT = tl.where(pT_live, pT, 0.0)
        elif MODE == 2:
            pT_live = (k_blk[:, None] == q_blk[None, :]) & kept[None, :]
            pT = tl.where(pT_live, pT, 0.0)
        # MODE 1 needs no mask: its rows all see the whole tile, and a padding row (past row_hi)
        # has q = 0, lse = 0, dO = 0 and delta = 0, so it adds exactly zero below.
        dv = _mm(pT.to(do.dtype), do, dv, DOT_PRECISION)
        dpT = _mm(v, tl.trans(do), None, DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if MODE != 1:
            # A NaN value (dpT) or a NaN row (delta) must not reach the keys a row does not see.
            dsT = tl.where(pT_live, dsT, 0.0)
        dk = _mm(dsT.to(qT.dtype), tl.trans(qT), dk, DOT_PRECISION)
    return dk, dv


@triton.jit
def _query_head(Q, DO, LSE, DELTA, b, h, num_heads, q_len, stride_qb, stride_qh, stride_dob, stride_doh):
    """Pointers to query head ``h`` of batch ``b``: its q, dO, and its rows of lse and delta."""
    bh = (b * num_heads + h).to(tl.int64)
    Qh = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    DOh = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    return Qh, DOh, LSE + bh * q_len, DELTA + bh * q_len


@triton.jit
def _noise_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, ANC, PERM, b, hk, slot0, num_blocks, num_heads, group, q_len,
                context_len, sm_scale, qk_scale,
                stride_qb, stride_qh, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_dob, stride_doh, stride_dom, stride_dod, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, NOISE_CHUNK: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """dk, dv of the noise keys of sorted blocks ``slot0 .. + NOISE_CHUNK - 1`` as batched
    ``[NOISE_CHUNK, BLOCK_SIZE, BLOCK_SIZE]`` products over the query heads of the group, stored."""
    sorted_row, row, kept = _sorted_blocks(ANC, PERM, slot0, num_blocks, NOISE_CHUNK, BLOCK_SIZE)
    k = _load_rows3(K, context_len + row, kept, stride_kn, stride_kd, HEAD_DIM)
    v = _load_rows3(V, context_len + row, kept, stride_vn, stride_vd, HEAD_DIM)
    dk = tl.zeros([NOISE_CHUNK, BLOCK_SIZE, HEAD_DIM], tl.float32)
    dv = tl.zeros([NOISE_CHUNK, BLOCK_SIZE, HEAD_DIM], tl.float32)
    live = kept[:, None, None]
    for g in range(0, group):
        Qh, DOh, LSEh, DELTAh = _query_head(Q, DO, LSE, DELTA, b, hk * group + g, num_heads, q_len,
                                            stride_qb, stride_qh, stride_dob, stride_doh)
        q = _load_rows3(Qh, row, kept, stride_qm, stride_qd, HEAD_DIM)
        do = _load_rows3(DOh, row, kept, stride_dom, stride_dod, HEAD_DIM)
        lse = tl.load(LSEh + sorted_row, mask=kept[:, None], other=0.0)
        delta = tl.load(DELTAh + sorted_row, mask=kept[:, None], other=0.0)
        # [chunk, query, key]
        p = tl.where(live, tl.exp2(_mm(q, _trans3(k), None, DOT_PRECISION) * qk_scale - lse[:, :, None]), 0.0)
        dv = _mm(_trans3(p).to(do.dtype), do, dv, DOT_PRECISION)
        ds = p * (_mm(do, _trans3(v), None, DOT_PRECISION) - delta[:, :, None])
        dk = _mm(_trans3(ds).to(q.dtype), q, dk, DOT_PRECISION)
    d = tl.arange(0, HEAD_DIM)[None, None, :]
    key_row = (context_len + row)[:, :, None]
    ok = (sorted_row < q_len)[:, :, None]
    tl.store(DK + key_row * stride_dkn + d * stride_dkd, (dk * sm_scale).to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + key_row * stride_dvn + d * stride_dvd, dv.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def _store_key_rows(DK, DV, dk, dv, key_row, n_ok, sm_scale, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                    HEAD_DIM: tl.constexpr):
    d = tl.arange(0, HEAD_DIM)[None, :]
    tl.store(DK + key_row[:, None] * stride_dkn + d * stride_dkd, (dk * sm_scale).to(DK.dtype.element_ty),
             mask=n_ok[:, None])
    tl.store(DV + key_row[:, None] * stride_dvn + d * stride_dvd, dv.to(DV.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _context_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, ANC, PERM, b, hk, n0, num_blocks, num_heads, group, q_len,
                  context_len, sm_scale, qk_scale,
                  stride_qb, stride_qh, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                  stride_dob, stride_doh, stride_dom, stride_dod, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                  BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  SEARCH_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dk, dv of the context key tile ``[n0, n0 + BLOCK_N)``, stored."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < context_len
    k = _load_key_tile(K, offs_n, n_ok, stride_kn, stride_kd, HEAD_DIM, False, True)
    v = _load_key_tile(V, offs_n, n_ok, stride_vn, stride_vd, HEAD_DIM, False, True)
    # Anchors are sorted, so the blocks that see any key of the tile (anchor > n0) are a suffix,
    # and those that see all of it (anchor >= n0 + BLOCK_N) a shorter suffix: count the others.
    blind = tl.zeros([SEARCH_BLOCK], tl.int32)
    partial = tl.zeros([SEARCH_BLOCK], tl.int32)
    for c in range(0, num_blocks, SEARCH_BLOCK):
        offs_c = c + tl.arange(0, SEARCH_BLOCK)
        a = tl.load(ANC + offs_c, mask=offs_c < num_blocks, other=2147483647)
        blind += (a <= n0).to(tl.int32)
        partial += (a < n0 + BLOCK_N).to(tl.int32)
    row_lo = tl.sum(blind, 0) * BLOCK_SIZE
    row_full = tl.sum(partial, 0) * BLOCK_SIZE
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(0, group):
        Qh, DOh, LSEh, DELTAh = _query_head(Q, DO, LSE, DELTA, b, hk * group + g, num_heads, q_len,
                                            stride_qb, stride_qh, stride_dob, stride_doh)
        dk, dv = _bwd_dkdv_rows(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, ANC, PERM, stride_qm, stride_qd, stride_dom,
                                stride_dod, offs_n, offs_n, row_lo, row_full, qk_scale,
                                0, BLOCK_SIZE, HEAD_DIM, BLOCK_M, DOT_PRECISION)
        dk, dv = _bwd_dkdv_rows(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, ANC, PERM, stride_qm, stride_qd, stride_dom,
                                stride_dod, offs_n, offs_n, row_full, q_len, qk_scale,
                                1, BLOCK_SIZE, HEAD_DIM, BLOCK_M, DOT_PRECISION)
    _store_key_rows(DK, DV, dk, dv, offs_n, n_ok, sm_scale, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                    HEAD_DIM)


@triton.jit
def _noise_dkdv_masked(Q, K, V, DO, DK, DV, LSE, DELTA, ANC, PERM, b, hk, n0, num_blocks, num_heads, group, q_len,
                       context_len, sm_scale, qk_scale,
                       stride_qb, stride_qh, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                       stride_dob, stride_doh, stride_dom, stride_dod, stride_dkn, stride_dkd, stride_dvn,
                       stride_dvd, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dk, dv of the noise key tile ``[n0, n0 + BLOCK_N)`` (sorted key order) as 2-D tiles masked to
    the diagonal blocks: the block sizes ``NOISE_3D`` does not take. Stored."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < q_len
    k_blk = offs_n // BLOCK_SIZE
    k_anchor = tl.load(ANC + k_blk, mask=n_ok, other=-1)
    k_pos = context_len + tl.load(PERM + k_blk, mask=n_ok, other=0) * BLOCK_SIZE + offs_n % BLOCK_SIZE
    k = _load_key_tile(K, k_pos, n_ok, stride_kn, stride_kd, HEAD_DIM, False, True)
    v = _load_key_tile(V, k_pos, n_ok, stride_vn, stride_vd, HEAD_DIM, False, True)
    row_lo = (n0 // BLOCK_SIZE) * BLOCK_SIZE
    row_hi = tl.minimum(q_len, ((n0 + BLOCK_N - 1) // BLOCK_SIZE + 1) * BLOCK_SIZE)
    row_hi = tl.where(tl.max(k_anchor, 0) >= 0, row_hi, row_lo)  # all dropped: zero grads
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(0, group):
        Qh, DOh, LSEh, DELTAh = _query_head(Q, DO, LSE, DELTA, b, hk * group + g, num_heads, q_len,
                                            stride_qb, stride_qh, stride_dob, stride_doh)
        dk, dv = _bwd_dkdv_rows(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, ANC, PERM, stride_qm, stride_qd, stride_dom,
                                stride_dod, offs_n, k_blk, row_lo, row_hi, qk_scale,
                                2, BLOCK_SIZE, HEAD_DIM, BLOCK_M, DOT_PRECISION)
    _store_key_rows(DK, DV, dk, dv, k_pos, n_ok, sm_scale, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                    HEAD_DIM)


@triton.jit
def _anchor_attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, ANC, PERM,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    sm_scale, qk_scale, context_len, num_blocks, num_heads, group, num_ctx_tiles,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr, NOISE_3D: tl.constexpr, NOISE_CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Program pid_n < num_ctx_tiles owns context keys [pid_n * BLOCK_N, ...), the others noise keys
    # (sorted order) [(pid_n - num_ctx_tiles) * BLOCK_N, ...): heaviest first (context tile 0 is
    # seen by nearly every row).
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    num_kv_heads = num_heads // group
    b = pid_bhk // num_kv_heads
    hk = pid_bhk % num_kv_heads
    q_len = num_blocks * BLOCK_SIZE
    K += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    DK += b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
    DV += b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
    ANC += b.to(tl.int64) * num_blocks
    PERM += b.to(tl.int64) * num_blocks
    if pid_n < num_ctx_tiles:
        _context_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, ANC, PERM, b, hk, pid_n * BLOCK_N, num_blocks, num_heads,
                      group, q_len, context_len, sm_scale, qk_scale,
                      stride_qb, stride_qh, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                      stride_dob, stride_doh, stride_dom, stride_dod, stride_dkn, stride_dkd, stride_dvn, stride_dvd,
                      BLOCK_SIZE, HEAD_DIM, BLOCK_M, BLOCK_N, SEARCH_BLOCK, DOT_PRECISION)
    else:
        n0 = (pid_n - num_ctx_tiles) * BLOCK_N
        if NOISE_3D:
            for c in range(0, BLOCK_N // BLOCK_SIZE, NOISE_CHUNK):
                _noise_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, ANC, PERM, b, hk, n0 // BLOCK_SIZE + c, num_blocks,
                            num_heads, group, q_len, context_len, sm_scale, qk_scale,
                            stride_qb, stride_qh, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                            stride_dob, stride_doh, stride_dom, stride_dod, stride_dkn, stride_dkd, stride_dvn,
                            stride_dvd, BLOCK_SIZE, HEAD_DIM, NOISE_CHUNK, DOT_PRECISION)
        else:
            _noise_dkdv_masked(Q, K, V, DO, DK, DV, LSE, DELTA, ANC, PERM, b, hk, n0, num_blocks, num_heads, group,
                               q_len, context_len, sm_scale, qk_scale,
                               stride_qb, stride_qh, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn,
                               stride_vd, stride_dob, stride_doh, stride_dom, stride_dod, stride_dkn, stride_dkd,
                               stride_dvn, stride_dvd, BLOCK_SIZE, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_PRECISION)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------

# Launch configurations: per kernel (BLOCK_M, BLOCK_N, num_warps, num_stages), for the forward,
# dk/dv and dq kernels. BLOCK_M counts query rows and BLOCK_N keys in all three.
_INTERPRET_CONFIG = ((32, 32, 4, 1), (16, 32, 4, 1), (32, 16, 4, 1))

# Picked without a GPU at hand: each compiles for its class (sm_90 / sm_80 / ~100 KB parts) within
# the shared memory; the sm_90 ones (large, and fp32) with no register spills under triton 3.9's
# ptxas (``python -m benchmarks.kernel_cost --quick`` checks it). Not autotuned; ``tiles=``
# overrides the block sizes.
_GPU_CONFIGS = {
    # Hopper/Blackwell-class shared memory (>= 200 KB per block).
    ("large", 64): ((128, 64, 4, 3), (32, 128, 8, 3), (128, 32, 8, 3)),
    ("large", 128): ((128, 64, 8, 3), (32, 128, 8, 3), (128, 32, 8, 3)),
    # A100-class (>= 160 KB).
    ("medium", 64): ((128, 64, 4, 3), (32, 128, 8, 2), (128, 32, 8, 2)),
    ("medium", 128): ((128, 64, 8, 2), (32, 64, 8, 2), (64, 32, 4, 2)),
    # About 100 KB (consumer parts).
    ("small", 64): ((64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2)),
    ("small", 128): ((64, 64, 4, 2), (32, 64, 8, 2), (64, 32, 4, 2)),
}
# Noise blocks per batched dk/dv product: [chunk, BLOCK_SIZE, HEAD_DIM] fp32 accumulators stay
# small next to the context tiles' [BLOCK_N, HEAD_DIM] ones.
_NOISE_CHUNK = 2
# fp32 runs its products exactly on CUDA cores (no tf32): small tiles.
_FP32_CONFIGS = {
    64: ((32, 32, 4, 2), (16, 32, 4, 2), (32, 32, 4, 2)),
    128: ((32, 16, 4, 2), (32, 16, 4, 2), (32, 16, 4, 2)),
}


@functools.lru_cache(maxsize=None)
def _smem_class(device_index: int) -> str:
    props = torch.cuda.get_device_properties(device_index)
    smem = int(getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block))
    return "large" if smem >= 200 * 1024 else "medium" if smem >= 160 * 1024 else "small"


def _config(head_dim: int, dtype: torch.dtype, device: torch.device, tiles):
    """((fwd), (dkdv), (dq)) launch configurations, each (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if device.type != "cuda":
        config = _INTERPRET_CONFIG
    else:
        d = 64 if head_dim <= 64 else 128
        if dtype == torch.float32:
            config = _FP32_CONFIGS[d]
        else:
            index = device.index if device.index is not None else torch.cuda.current_device()
            config = _GPU_CONFIGS[(_smem_class(index), d)]
    if tiles:
        config = tuple((tiles[2 * i], tiles[2 * i + 1], w, s) for i, (_, _, w, s) in enumerate(config))
    return config


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 inputs get exact fp32 products ("ieee", not tf32); fp16/bf16 use tl.dot's default.
    Under the interpreter bf16 operands are widened first (see ``_mm``)."""
    if dtype == torch.float32:
        return "ieee"
    if device.type != "cuda" and dtype == torch.bfloat16:
        return "upcast"
    return "default"


def _noise_3d(block_size: int, tile: int) -> bool:
    """Whether the noise blocks run as one batched product: ``tl.dot`` needs power-of-two sides of
    at least 16, and the tile must hold whole blocks."""
    return block_size >= 16 and block_size & (block_size - 1) == 0 and tile % block_size == 0


def _identity(kernel):
    return kernel


def sort_blocks(anchors: torch.Tensor, keep: Optional[torch.Tensor]):
    """Per batch row, sort the blocks by anchor (stable), dropped blocks first with anchor -1.

    Returns ``(anc [B, N] int32 sorted, perm [B, N] int32)`` where sorted slot ``i`` holds the
    caller's block ``perm[:, i]``.
    """
    key = anchors.to(torch.int32)
    if keep is not None:
        key = torch.where(keep, key, torch.full_like(key, -1))
    anc, perm = torch.sort(key, dim=1, stable=True)
    return anc.contiguous(), perm.to(torch.int32).contiguous()


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def anchor_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, anc: torch.Tensor, perm: torch.Tensor,
    context_len: int, block_size: int, scale: float, tiles: Optional[list[int]] = None, *, wrap=_identity,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. ``anc``/``perm`` come from :func:`sort_blocks`. Returns (out, lse).

    ``tiles`` overrides the tile sizes (fwd BLOCK_M, fwd BLOCK_N, dkdv BLOCK_M, dkdv BLOCK_N,
    dq BLOCK_M, dq BLOCK_N[, anchors searched per step]); each a power of two >= 16. Tests use it to
    cover tile/block alignments; the defaults come from ``_config``.
    """
    B, H, Lq, D = q.shape
    Hkv = k.shape[1]
    N = anc.shape[1]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)  # base 2, sorted row order
    (fwd_m, fwd_n, warps, stages), _, _ = _config(D, q.dtype, q.device, tiles)
    grid = (triton.cdiv(Lq, fwd_m), B * H)
    wrap(_anchor_attn_fwd)[grid](
        q, k, v, out, lse, anc, perm,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        scale * _LOG2E, context_len, N, H, H // Hkv,
        BLOCK_SIZE=block_size, HEAD_DIM=D, BLOCK_M=fwd_m, BLOCK_N=fwd_n, NOISE_3D=_noise_3d(block_size, fwd_m),
        DOT_PRECISION=_dot_precision(q.dtype, q.device), num_warps=warps, num_stages=stages,
    )
    return out, lse


def anchor_attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, anc: torch.Tensor, perm: torch.Tensor,
    context_len: int, block_size: int, scale: float, tiles: Optional[list[int]] = None, *, wrap=_identity,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: (dq, dk, dv)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    N = anc.shape[1]
    (fwd_m, _, _, _), (kv_m, kv_n, kv_warps, kv_stages), (dq_m, dq_n, dq_warps, dq_stages) = _config(
        D, q.dtype, q.device, tiles)
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Lk, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Hkv, Lk, D), dtype=v.dtype, device=v.device)

    wrap(_anchor_attn_bwd_preprocess)[(triton.cdiv(Lq, fwd_m), B * H)](
        out, grad_out, delta, anc, perm, *_strides(out), *_strides(grad_out), N, H,
        BLOCK_SIZE=block_size, HEAD_DIM=D, BLOCK_M=fwd_m,
    )
    num_ctx_tiles = triton.cdiv(context_len, kv_n)
    # Anchors counted per step when a context key tile looks for its first query row.
    search = tiles[6] if tiles and len(tiles) > 6 else max(16, min(256, triton.next_power_of_2(N)))
    precision = _dot_precision(q.dtype, q.device)
    # fp32 products run on CUDA cores, which hold the batched operands in registers: on a GPU its
    # dk/dv keeps the masked 2-D walk over the noise keys (the interpreter runs both).
    noise_3d = _noise_3d(block_size, kv_n) and not (q.dtype == torch.float32 and q.is_cuda)
    wrap(_anchor_attn_bwd_dkdv)[(num_ctx_tiles + triton.cdiv(Lq, kv_n), B * Hkv)](
        q, k, v, grad_out, dk, dv, lse, delta, anc, perm,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
        scale, scale * _LOG2E, context_len, N, H, H // Hkv, num_ctx_tiles,
        BLOCK_SIZE=block_size, HEAD_DIM=D, BLOCK_M=kv_m, BLOCK_N=kv_n, SEARCH_BLOCK=search,
        NOISE_3D=noise_3d, NOISE_CHUNK=min(_NOISE_CHUNK, kv_n // block_size) if noise_3d else 1,
        DOT_PRECISION=precision, num_warps=kv_warps, num_stages=kv_stages,
    )
    wrap(_anchor_attn_bwd_dq)[(triton.cdiv(Lq, dq_m), B * H)](
        q, k, v, grad_out, dq, lse, delta, anc, perm,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq),
        scale, scale * _LOG2E, context_len, N, H, H // Hkv,
        BLOCK_SIZE=block_size, HEAD_DIM=D, BLOCK_M=dq_m, BLOCK_N=dq_n, NOISE_3D=_noise_3d(block_size, dq_m),
        DOT_PRECISION=precision, num_warps=dq_warps, num_stages=dq_stages,
    )
    return dq, dk, dv
