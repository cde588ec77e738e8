"""Fused categorical sampling, top-k / top-p / min-p filtering and the decoding row kernels.

Semantics: ``ddiff.reference.sampling`` / ``ddiff.reference.decoding`` (the torch references).
Layout of the work:

* Unfiltered rows (``sample``, ``predict_tokens``, ``mdlm_step``, ``udlm_step``): a streaming
  pass of one-warp programs writes per-noise-tile statistics (max, log-sum-exp, and what the
  confidence needs), then a finalize per row merges them, races the tiles (one Philox draw per
  tile) and the columns of the winner. A warp owns a whole 1024-column tile, so the hot loop
  has no block barrier and no per-element mask; rows are split over as many programs as it
  takes to fill the GPU, whatever the number of active rows (masked rows are compacted on the
  device first, without a host sync). A row costs ``V / NOISE_TILE + NOISE_TILE`` Philox calls.
* Filtered rows with top-k (or min-p alone): pass 1 keeps per-lane maxima, whose k-th largest
  bounds the k-th largest logit from below; pass 2 appends the columns above that bound to a
  candidate list; the exact filters, both races and the confidence then run on the candidates
  in registers. Rows whose candidates overflow (heavy ties) or that have no bound (top-p
  alone) go to the general kernel: a multi-pivot search over the order-preserving integer
  keys of the logits (16 pivots a pass: at most 4 passes for bf16, 5 for fp16, 8 for fp32) and
  one fused pass. Both give the exact ``k``-th largest logit and top-p boundary, ties kept.
* Filtered ``sample`` never writes a filtered tensor; ``filter_logits`` adds one masked copy.

All offsets into the logits are int64 (``row * stride`` passes 2^31 at large B x V).
Exponentials are taken of differences to a maximum, subtracted before any scaling by
``log2(e) / T``: any finite fp32 logit is sampled (``x * log2(e)`` would overflow above
FLT_MAX / log2(e)), and a probability never exceeds 1 (the top token's term is exactly 1).
"""

import triton
import triton.language as tl

from ddiff.kernels.rng import philox_gumbel, philox_uniform, rng_counter_hi, rng_key
from ddiff.reference import rng as _rng

# Globals read inside @triton.jit functions must be constexpr.
NOISE_TILE = _rng.NOISE_TILE
STREAM_TOKEN = tl.constexpr(_rng.STREAM_TOKEN)
STREAM_TILE = tl.constexpr(_rng.STREAM_TILE)
STREAM_CONFIDENCE = tl.constexpr(_rng.STREAM_CONFIDENCE)
STREAM_POSTERIOR = tl.constexpr(_rng.STREAM_POSTERIOR)

NUM_PIVOTS = 16
SEARCH_BLOCK = 1024
_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _order_key(x, KEY_SHIFT: tl.constexpr):
    """Order-preserving int64 key of fp32 values (-0.0 folded onto +0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (key >> KEY_SHIFT).to(tl.int64)


@triton.jit
def _key_value(key, KEY_SHIFT: tl.constexpr):
    """The fp32 value whose order key is ``key`` (the inverse of _order_key on its image)."""
    bits = key << KEY_SHIFT
    bits = tl.where(key < 0, (bits | ((1 << KEY_SHIFT) - 1)) ^ 0x7FFFFFFF, bits)
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _load_tile(row_ptr, cols, V, supp_ptr, NUM_SUPPRESS: tl.constexpr):
    """fp32 logits of ``cols``; out-of-range and suppressed ids read as -inf."""
    inb = cols < V
    x = tl.load(row_ptr + cols, mask=inb, other=_NEG_INF).to(tl.float32)
    for i in tl.static_range(NUM_SUPPRESS):
        x = tl.where(cols == tl.load(supp_ptr + i), _NEG_INF, x)
    return x, inb


@triton.jit
def _row_stats(row_ptr, V, temp, supp_ptr, NUM_SUPPRESS: tl.constexpr, KEY_SHIFT: tl.constexpr,
               BLOCK: tl.constexpr):
    """One pass: max of z = x / temp, min / max key, first argmax, and an invalid-row flag."""
    cols0 = tl.arange(0, BLOCK)
    z_max = tl.full([], _NEG_INF, tl.float32)
    arg = tl.full([], 0, tl.int64)
    key_min = tl.full([], 2**40, tl.int64)
    key_max = tl.full([], -(2**40), tl.int64)
    bad = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + cols0
        x, inb = _load_tile(row_ptr, cols, V, supp_ptr, NUM_SUPPRESS)
        z = x / temp
        bad = bad | tl.max(((z != z) | (z == float("inf"))).to(tl.int32), 0)
        key = _order_key(x, KEY_SHIFT)
        key_min = tl.minimum(key_min, tl.min(tl.where(inb, key, 2**40), 0))
        key_max = tl.maximum(key_max, tl.max(tl.where(inb, key, -(2**40)), 0))
        tile_max = tl.max(z, 0)
        tile_arg = tl.argmax(z, 0).to(tl.int64) + start
        arg = tl.where(tile_max > z_max, tile_arg, arg)
        z_max = tl.maximum(z_max, tile_max)
    return z_max, arg, key_min, key_max, bad | (z_max == _NEG_INF).to(tl.int32)


@triton.jit
def _search_threshold(row_ptr, V, supp_ptr, lo, hi, target, key_floor, z_max, temp,
                      USE_MASS: tl.constexpr, NUM_SUPPRESS: tl.constexpr, KEY_SHIFT: tl.constexpr,
                      NUM_PIVOTS: tl.constexpr, BLOCK: tl.constexpr):
    """Largest key ``t`` in ``[lo, hi)`` with ``f(t) >= target``, and ``f(t + 1)``.

    ``f(t)`` counts (or, with ``USE_MASS``, sums ``exp(z - z_max)`` over) the tokens whose key
    is ``>= max(t, key_floor)``. ``f`` is non-increasing, ``f(lo) >= target`` and
    ``f(hi) < target`` on entry, so the result is the key of an actual token. ``f(hi) = 0``
    on entry.
    """
    piv_ids = tl.arange(0, NUM_PIVOTS).to(tl.int64) + 1
    cols0 = tl.arange(0, BLOCK)
    f_hi = tl.full([], 0.0, tl.float32)
    passes = 0
    while (hi - lo > 1) & (passes < 40):
        pivots = lo + ((hi - lo) * piv_ids) // (NUM_PIVOTS + 1)
        acc = tl.zeros([NUM_PIVOTS], tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + cols0
            x, inb = _load_tile(row_ptr, cols, V, supp_ptr, NUM_SUPPRESS)
            key = _order_key(x, KEY_SHIFT)
            live = inb & (key >= key_floor)
            if USE_MASS:
                w = tl.where(live, tl.exp(x / temp - z_max), 0.0)
            else:
                w = live.to(tl.float32)
            above = key[None, :] >= pivots[:, None]
            acc += tl.sum(tl.where(above, w[None, :], 0.0), 1)
        ok = acc >= target
        # f is non-increasing, so the smallest failing pivot (the new hi) has the largest sum.
        f_hi = tl.maximum(f_hi, tl.max(tl.where(ok, 0.0, acc), 0))
        lo = tl.max(tl.where(ok, pivots, lo), 0)
        hi = tl.min(tl.where(ok, hi, pivots), 0)
        passes += 1
    return lo, f_hi


@triton.jit
def _filter_threshold(row_ptr, V, supp_ptr, temp, z_max, key_min, key_max, top_k, top_p,
                      NUM_SUPPRESS: tl.constexpr, KEY_SHIFT: tl.constexpr, NUM_PIVOTS: tl.constexpr,
                      BLOCK: tl.constexpr, TOP_P_BD3LM: tl.constexpr):
    """Key threshold of top-k followed by top-p (ties kept); ``key_min`` when both are no-ops.

    Top-p is found as the inclusive boundary ``v_p`` (the largest key whose mass at or above
    reaches the target). BD3LM's rule keeps the tie group at ``v_p`` only if the mass strictly
    above it plus one token's own mass fits under the target (or it is the top group); every
    group above ``v_p`` fits and none below does, so its threshold is ``v_p`` or ``v_p + 1``.
    """
    key_k = key_min
    if (top_k > 0) & (top_k < V):
        key_k, _ = _search_threshold(row_ptr, V, supp_ptr, key_min, key_max + 1, top_k.to(tl.float32), key_min,
                                     z_max, temp, False, NUM_SUPPRESS, KEY_SHIFT, NUM_PIVOTS, BLOCK)
    key_p = key_k
    if top_p < 1.0:
        cols0 = tl.arange(0, BLOCK)
        mass_k = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + cols0
            x, inb = _load_tile(row_ptr, cols, V, supp_ptr, NUM_SUPPRESS)
            live = inb & (_order_key(x, KEY_SHIFT) >= key_k)
            mass_k += tl.where(live, tl.exp(x / temp - z_max), 0.0)
        target = top_p * tl.sum(mass_k, 0)
        key_p, mass_above = _search_threshold(row_ptr, V, supp_ptr, key_k, key_max + 1, target, key_k,
                                              z_max, temp, True, NUM_SUPPRESS, KEY_SHIFT, NUM_PIVOTS, BLOCK)
        if TOP_P_BD3LM:
            own = tl.exp(_key_value(key_p, KEY_SHIFT) / temp - z_max)
            fits = (mass_above + own <= target) | (key_p >= key_max)
            key_p = tl.where(fits, key_p, key_p + 1)
    return key_p


@triton.jit
def _race_in_tile(row_ptr, V, supp_ptr, tile, temp, key_floor, min_p, z_max, k0, k1, c2, c3, row,
                  NUM_SUPPRESS: tl.constexpr, KEY_SHIFT: tl.constexpr, NOISE_TILE: tl.constexpr,
                  TILE_BLOCK: tl.constexpr):
    """Per-column Gumbel race inside one noise tile over the kept tokens; returns the column.

    ``TILE_BLOCK`` is NOISE_TILE, or less when the whole row is shorter (then the columns past
    V are masked anyway): the draws do not depend on it.
    """
    cols = tile * NOISE_TILE + tl.arange(0, TILE_BLOCK)
    x, inb = _load_tile(row_ptr, cols, V, supp_ptr, NUM_SUPPRESS)
    z = x / temp
    kept = inb & (_order_key(x, KEY_SHIFT) >= key_floor) & (tl.exp(z - z_max) >= min_p)
    score = tl.where(kept, z + philox_gumbel(k0, k1, c2, c3, row, cols), _NEG_INF)
    return tl.minimum(tile * NOISE_TILE + tl.argmax(score, 0).to(tl.int64), V - 1)


@triton.jit
def _merge_stats(m, s, t1, m2, tile_m, tile_s, tile_t1, tile_m2):
    """Merge running softmax statistics with a tile's.

    ``m``: max, ``s``: sum of exp(z - m), ``t1``: sum of exp(z - m) * (z - m) (for the entropy),
    ``m2``: the second largest value (ties count twice).
    """
    new_m = tl.maximum(m, tile_m)
    safe_new = tl.where(new_m > _NEG_INF, new_m, 0.0)
    d_run = tl.where(m > _NEG_INF, m - safe_new, 0.0)
    d_tile = tl.where(tile_m > _NEG_INF, tile_m - safe_new, 0.0)
    c_run = tl.where(m > _NEG_INF, tl.exp(d_run), 0.0)
    c_tile = tl.where(tile_m > _NEG_INF, tl.exp(d_tile), 0.0)
    new_s = s * c_run + tile_s * c_tile
    # A side whose weight underflows to 0 adds nothing (d * s may overflow: 0 * -inf).
    new_t1 = (tl.where(c_run > 0.0, c_run * (t1 + d_run * s), 0.0)
              + tl.where(c_tile > 0.0, c_tile * (tile_t1 + d_tile * tile_s), 0.0))
    new_m2 = tl.maximum(tl.maximum(tl.minimum(m, tile_m), m2), tile_m2)
    return new_m, new_s, new_t1, new_m2


@triton.jit
def _tile_stats(z, live):
    """Softmax statistics of one tile over ``live`` entries (see _merge_stats)."""
    zl = tl.where(live, z, _NEG_INF)
    m = tl.max(zl, 0)
    safe = tl.where(m > _NEG_INF, m, 0.0)
    e = tl.where(live, tl.exp(zl - safe), 0.0)
    s = tl.sum(e, 0)
    t1 = tl.sum(tl.where(e > 0.0, e * (zl - safe), 0.0), 0)
    top = tl.argmax(zl, 0)
    m2 = tl.max(tl.where(tl.arange(0, zl.shape[0]) == top, _NEG_INF, zl), 0)
    return m, s, t1, m2, top


# --------------------------------------------------------------------------------------------
# Unfiltered rows: a streaming pass of per-tile statistics, then a per-row finalize.
#
# The pass runs programs of ONE warp, each over a run of whole noise tiles of one row: a tile
# is a [CHUNKS, LANES] block, so every reduction stays inside the warp (shuffles, no block
# barrier) and each thread keeps CHUNKS 16-byte loads in flight. Per tile it writes a handful
# of fp32 statistics (max, log-sum-exp, ...) to a [NUM_STATS, R, T] scratch buffer: 8 to 24
# bytes per 2 KB of bf16 logits. Only full tiles are streamed, with no mask; the finalize
# recomputes the few "special" tiles itself (the ragged last tile, tiles holding a suppressed
# id), so the hot loop has no per-element masking at all. The finalize merges a row's tile
# statistics, runs the tile race (one Philox draw per tile, vectorised over tiles) and the
# column race inside the winning tile, and derives the confidence.
# --------------------------------------------------------------------------------------------

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
TILE_CHUNKS = 4  # a noise tile is [TILE_CHUNKS, NOISE_TILE // TILE_CHUNKS] in the streaming pass

# Slots of the per-tile statistics (first axis of the scratch buffer).
# Sums are relative to the tile's max: its log-sum-exp is taken in the finalize (_tile_lse), so
# the streaming loop computes no logarithm.
STAT_MAX = tl.constexpr(0)  # max of x (the logits, not tempered)
STAT_SUM = tl.constexpr(1)  # sum of exp(z - max z), z = x / T
STAT_M2 = tl.constexpr(2)  # second largest x, ties counted twice (margin only)
STAT_T1 = tl.constexpr(3)  # sum of exp(z - max z) * (z - max z) (neg_entropy on the sampling distribution)
STAT_RAW_SUM = tl.constexpr(4)  # sum of exp(x - max x) (confidence_from="raw" at T != 1)
STAT_RAW_T1 = tl.constexpr(5)  # the T1 statistic of x (neg_entropy on the raw logits)
NUM_STATS = 6


@triton.jit
def _top2_combine(a1, a2, b1, b2):
    return tl.maximum(a1, b1), tl.maximum(tl.minimum(a1, b1), tl.maximum(a2, b2))


@triton.jit
def _second_max(x):
    """Second largest entry of a 2-D block, ties counted twice (in-thread axis first)."""
    lo = tl.full(x.shape, _NEG_INF, tl.float32)
    a1, a2 = tl.reduce((x, lo), 0, _top2_combine)
    _, b2 = tl.reduce((a1, a2), 0, _top2_combine)
    return b2


@triton.jit
def _block_sums(x, m_safe, scale, WANT_T1: tl.constexpr):
    """sum exp(z - max z) of ``z = x * scale`` over a 2-D block and (``WANT_T1``) sum
    exp(z - max z) (z - max z), given the block's max ``m_safe`` of x (0 for an empty block).

    The max is subtracted before scaling: ``x * log2(e)`` would overflow for finite logits above
    FLT_MAX / log2(e), and two large rounded products would put an error of ulp(x / T) into
    every term (probabilities above 1 at low temperature). The max's own term is exactly 1."""
    y = (x - m_safe) * (scale * LOG2E)  # log2 of exp(z - max z)
    if WANT_T1:
        y = tl.maximum(y, -3.0e38)  # keep 0 * y finite where x is -inf
    e = tl.exp2(y)
    s = tl.sum(tl.sum(e, 0), 0)
    t1 = 0.0
    if WANT_T1:
        t1 = tl.sum(tl.sum(e * y, 0), 0) * LN2
    return s, t1


@triton.jit
def _tile_lse(m, scale, s):
    """log-sum-exp of ``z = x * scale`` over a tile from its max ``m`` of x and its sum ``s``
    (see _block_sums); -inf for an empty tile (``s`` 0)."""
    return tl.where(m == _NEG_INF, 0.0, m) * scale + tl.log(s)


@triton.jit
def _tile_statistics(x, inv_t, WANT_M2: tl.constexpr, WANT_T1: tl.constexpr, WANT_RAW: tl.constexpr):
    """Per-tile statistics of a 2-D block of fp32 logits (-inf = excluded), as the STAT_ slots:
    max, sum, second max, T1, raw sum, raw T1. The T1 statistic is that of the confidence
    distribution only: the raw one with ``WANT_RAW``, else the sampling one."""
    T1_SAMPLING: tl.constexpr = WANT_T1 and not WANT_RAW
    m = tl.max(tl.max(x, 0), 0)
    m_safe = tl.where(m == _NEG_INF, 0.0, m)
    s, t1 = _block_sums(x, m_safe, inv_t, T1_SAMPLING)
    m2 = _NEG_INF
    if WANT_M2:
        m2 = _second_max(x)
    raw_s = 0.0
    raw_t1 = 0.0
    if WANT_RAW:
        raw_s, raw_t1 = _block_sums(x, m_safe, 1.0, WANT_T1)
    return m, s, m2, t1, raw_s, raw_t1


@triton.jit
def _temperature(temp_ptr, row, temp_value):
    """(raw temperature, temperature used for scaling: 1 for greedy rows)."""
    if temp_ptr is not None:
        raw = tl.load(temp_ptr + row).to(tl.float32)
    else:
        raw = temp_value + tl.zeros([], tl.float32)
    return raw, tl.where(raw == 0.0, 1.0, raw)


@triton.jit
def _active_count(count_ptr, count_value):
    if count_ptr is not None:
        return tl.load(count_ptr)
    return count_value + tl.zeros([], tl.int32)


@triton.jit
def _row_of_slot(rows_ptr, slot):
    if rows_ptr is not None:
        return tl.load(rows_ptr + slot).to(tl.int64)
    return slot + tl.zeros([], tl.int64)


@triton.jit
def _split_row(count, target_items, num_blocks):
    """(runs per row, blocks per run) so that ``count`` rows give about ``target_items`` runs."""
    parts = tl.minimum(tl.maximum((target_items + count - 1) // tl.maximum(count, 1), 1), num_blocks)
    per_part = (num_blocks + parts - 1) // parts
    return (num_blocks + per_part - 1) // per_part, per_part


@triton.jit
def _i64(x):
    """``x`` (a loop index: a Python int under the interpreter) as an int64 scalar."""
    return x + tl.zeros([], tl.int64)


@triton.jit
def _row_seed(seed_ptr, row, seed_stride, seed_value):
    """The row's int64 seed: from a per-row (or one-value, stride 0) tensor, or the scalar."""
    if seed_ptr is not None:
        return tl.load(seed_ptr + row * seed_stride)
    return seed_value + tl.zeros([], tl.int64)


@triton.jit
def _stats_confidence(CONFIDENCE: tl.constexpr, z_pick, c_max, c_sum, c_t1, c_m2):
    """prob / margin / neg_entropy from the softmax statistics of the confidence distribution:
    its max ``c_max`` (0 when it is empty), ``c_sum`` = sum exp(z - c_max), ``c_t1`` = sum
    exp(z - c_max) (z - c_max), its second largest ``c_m2``; ``z_pick`` is the picked token's z.
    An empty distribution (``c_sum`` 0) gives the least value of the kind: 0 for prob and
    margin, -inf for the negative entropy."""
    empty = c_sum == 0.0
    norm = tl.where(empty, 1.0, c_sum)
    if CONFIDENCE == 0:
        conf = tl.where(empty, 0.0, tl.exp(z_pick - c_max) / norm)
    elif CONFIDENCE == 1:
        conf = tl.where(empty, 0.0, (1.0 - tl.exp(c_m2 - c_max)) / norm)
    else:
        conf = tl.where(empty, _NEG_INF, c_t1 / norm - tl.log(norm))
    return conf


@triton.jit
def _select_rows_kernel(mask_ptr, gate_ptr, seed_ptr, seed_stride, seed_value, offset, rows,
                        rows_out_ptr, count_ptr, tokens_ptr, conf_ptr, argmax_ptr, fallback_ptr, BLOCK: tl.constexpr):
    """Rows to compute: ``mask`` and the posterior coin (a STREAM_POSTERIOR uniform below
    ``gate``). Inactive rows get their outputs (-1, -inf, -1, fallback flag 0) here; active ones
    are appended to ``rows_out`` (in no particular order: each row's result depends on nothing
    else)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = r < rows
    active = inb
    if mask_ptr is not None:
        active = active & (tl.load(mask_ptr + r, mask=inb, other=0) != 0)
    if gate_ptr is not None:
        if seed_ptr is not None:
            seed = tl.load(seed_ptr + r * seed_stride, mask=inb, other=0)
        else:
            seed = seed_value + tl.zeros([BLOCK], tl.int64)
        k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
        k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        c2, c3 = rng_counter_hi(offset, STREAM_POSTERIOR)
        u = philox_uniform(k0, k1, c2, c3, r, tl.zeros([BLOCK], tl.int64))
        active = active & (u < tl.load(gate_ptr + r, mask=inb, other=0.0))
    idle = inb & ~active
    tl.store(tokens_ptr + r, tl.full([BLOCK], -1, tl.int64), mask=idle)
    tl.store(conf_ptr + r, tl.full([BLOCK], _NEG_INF, tl.float32), mask=idle)
    if argmax_ptr is not None:
        tl.store(argmax_ptr + r, tl.full([BLOCK], -1, tl.int64), mask=idle)
    if fallback_ptr is not None:
        tl.store(fallback_ptr + r, tl.zeros([BLOCK], tl.int8), mask=idle)
    flags = active.to(tl.int32)
    base = tl.atomic_add(count_ptr, tl.sum(flags, 0))
    pos = base + tl.cumsum(flags, 0) - 1
    tl.store(rows_out_ptr + pos, r.to(tl.int32), mask=active)


@triton.jit
def _tile_pass_kernel(
    logits_ptr, stride_row, num_full_tiles, num_tiles, rows_ptr, count_ptr, count_value, target_items,
    temp_ptr, temp_value, stats_ptr, stats_stride,
    WANT_M2: tl.constexpr, WANT_T1: tl.constexpr, WANT_RAW: tl.constexpr,
    CHUNKS: tl.constexpr, NOISE_TILE: tl.constexpr,
):
    """Streaming pass (one warp per program): per-tile statistics of every full noise tile of
    the active rows. Work items are (row slot, run of tiles); the run length adapts to the
    number of active rows so that about ``target_items`` items exist."""
    LANES: tl.constexpr = NOISE_TILE // CHUNKS
    stats_stride = stats_stride + tl.zeros([], tl.int64)
    count = _active_count(count_ptr, count_value)
    parts, tiles_per_part = _split_row(count, target_items, num_full_tiles)
    offs = tl.arange(0, CHUNKS)[:, None] * LANES + tl.arange(0, LANES)[None, :]
    for item in range(tl.program_id(0), count * parts, tl.num_programs(0)):
        slot = item // parts
        part = item - slot * parts
        row = _row_of_slot(rows_ptr, slot)
        _, temp = _temperature(temp_ptr, row, temp_value)
        inv_t = 1.0 / temp
        row_ptr = logits_ptr + row * stride_row
        out_ptr = stats_ptr + row * num_tiles
        tile_end = tl.minimum(part * tiles_per_part + tiles_per_part, num_full_tiles)
        for tile in range(part * tiles_per_part, tile_end):
            x = tl.load(row_ptr + tile * NOISE_TILE + offs).to(tl.float32)
            m, s, m2, t1, raw_s, raw_t1 = _tile_statistics(x, inv_t, WANT_M2, WANT_T1, WANT_RAW)
            tl.store(out_ptr + STAT_MAX * stats_stride + tile, m)
            tl.store(out_ptr + STAT_SUM * stats_stride + tile, s)
            if WANT_M2:
                tl.store(out_ptr + STAT_M2 * stats_stride + tile, m2)
            if WANT_RAW:
                tl.store(out_ptr + STAT_RAW_SUM * stats_stride + tile, raw_s)
                if WANT_T1:
                    tl.store(out_ptr + STAT_RAW_T1 * stats_stride + tile, raw_t1)
            elif WANT_T1:
                tl.store(out_ptr + STAT_T1 * stats_stride + tile, t1)


@triton.jit
def _masked_tile(row_ptr, tile, V, supp_ptr, csupp_ptr, offs, NUM_SUPPRESS: tl.constexpr,
                 NUM_CONF_SUPPRESS: tl.constexpr, NOISE_TILE: tl.constexpr):
    """fp32 logits of one noise tile with out-of-range and suppressed ids at -inf (and the
    confidence-suppressed ids too when NUM_CONF_SUPPRESS > 0), and the columns."""
    cols = (tile + tl.zeros([], tl.int64)) * NOISE_TILE + offs
    x = tl.load(row_ptr + cols, mask=cols < V, other=_NEG_INF).to(tl.float32)
    for i in tl.static_range(NUM_SUPPRESS):
        x = tl.where(cols == tl.load(supp_ptr + i), _NEG_INF, x)
    for i in tl.static_range(NUM_CONF_SUPPRESS):
        x = tl.where(cols == tl.load(csupp_ptr + i), _NEG_INF, x)
    return x, cols


@triton.jit
def _first_argmax_2d(x, cols):
    """First column of the maximum of a 2-D block (torch.argmax's tie rule)."""
    m = tl.max(tl.max(x, 0), 0)
    return tl.min(tl.min(tl.where(x == m, cols, 2**62), 0), 0)


@triton.jit
def _chunk_merge(m, s, t1, m2, mz, lse, t1_t, m2z, live):
    """Merge running (max, sum, T1, second max) of z with a vector of tile statistics."""
    finite = live & (mz > _NEG_INF)
    mz = tl.where(live, mz, _NEG_INF)
    c_m = tl.max(mz, 0)
    c_safe = tl.where(c_m == _NEG_INF, 0.0, c_m)
    c_s = tl.sum(tl.where(finite, tl.exp(lse - c_safe), 0.0), 0)
    # T1 of a tile is relative to its own max: shift it to the chunk's (a tile whose weight
    # underflows to 0 adds nothing: its shift times its sum may overflow).
    w = tl.where(finite, tl.exp(mz - c_safe), 0.0)
    s_t = tl.where(finite, tl.exp(lse - tl.where(finite, mz, 0.0)), 0.0)
    c_t1 = tl.sum(tl.where(w > 0.0, w * (t1_t + (mz - c_safe) * s_t), 0.0), 0)
    lo = tl.full(mz.shape, _NEG_INF, tl.float32)
    _, top2 = tl.reduce((mz, lo), 0, _top2_combine)
    c_m2 = tl.maximum(top2, tl.max(tl.where(live, m2z, _NEG_INF), 0))
    return _merge_stats(m, s, t1, m2, c_m, c_s, c_t1, c_m2)


@triton.jit
def _finalize_kernel(
    logits_ptr, stride_row, V, num_full_tiles, num_tiles, rows_ptr, count_ptr, count_value,
    supp_ptr, csupp_ptr, query_ptr, temp_ptr, temp_value, seed_ptr, seed_stride, seed_value, offset,
    stats_ptr, stats_stride, tokens_ptr, conf_ptr, argmax_ptr,
    NUM_SUPPRESS: tl.constexpr, NUM_CONF_SUPPRESS: tl.constexpr, CONFIDENCE: tl.constexpr, CONF_RAW: tl.constexpr,
    WANT_M2: tl.constexpr, WANT_T1: tl.constexpr, WANT_RAW: tl.constexpr,
    TILES_BLOCK: tl.constexpr, CHUNKS: tl.constexpr, LANES: tl.constexpr, NOISE_TILE: tl.constexpr,
):
    """Per active row: merge the tile statistics (recomputing the special tiles), race the
    tiles, race the columns of the winner, and score the token. A tile is read as a
    [CHUNKS, LANES] block: CHUNKS * LANES is NOISE_TILE, or less when the whole row is shorter
    (the columns past V are masked anyway, so the draws do not depend on it)."""
    offs = tl.arange(0, CHUNKS)[:, None] * LANES + tl.arange(0, LANES)[None, :]
    tids0 = tl.arange(0, TILES_BLOCK)
    stats_stride = stats_stride + tl.zeros([], tl.int64)
    count = _active_count(count_ptr, count_value)
    for slot in range(tl.program_id(0), count, tl.num_programs(0)):
        row = _row_of_slot(rows_ptr, slot)
        raw_temp, temp = _temperature(temp_ptr, row, temp_value)
        greedy = raw_temp == 0.0
        inv_t = 1.0 / temp
        row_ptr = logits_ptr + row * stride_row
        stat_row = stats_ptr + row * num_tiles
        k0, k1 = rng_key(_row_seed(seed_ptr, row, seed_stride, seed_value))
        c2, c3 = rng_counter_hi(offset, STREAM_TILE)

        # Running statistics of z (the race) and of the confidence distribution.
        zero = tl.zeros([], tl.float32)
        s_m, s_s, s_t1, s_m2 = zero + _NEG_INF, zero, zero, zero + _NEG_INF
        c_m, c_s, c_t1, c_m2 = zero + _NEG_INF, zero, zero, zero + _NEG_INF
        x_max = _NEG_INF + tl.zeros([], tl.float32)
        max_tile = tl.zeros([], tl.int32)
        best_score = _NEG_INF + tl.zeros([], tl.float32)
        best_tile = tl.zeros([], tl.int32)
        bad = tl.zeros([], tl.int1)
        for t0 in range(0, num_tiles, TILES_BLOCK):
            tids = t0 + tids0
            live = tids < num_tiles
            full = tids < num_full_tiles
            t_m = tl.load(stat_row + STAT_MAX * stats_stride + tids, mask=full, other=_NEG_INF)
            t_lse = _tile_lse(t_m, inv_t, tl.load(stat_row + STAT_SUM * stats_stride + tids, mask=full, other=0.0))
            t_m2 = _NEG_INF + tl.zeros([TILES_BLOCK], tl.float32)
            t_t1 = tl.zeros([TILES_BLOCK], tl.float32)
            r_lse = t_lse
            r_t1 = t_t1
            if WANT_M2:
                t_m2 = tl.load(stat_row + STAT_M2 * stats_stride + tids, mask=full, other=_NEG_INF)
            if WANT_T1 and not WANT_RAW:
                t_t1 = tl.load(stat_row + STAT_T1 * stats_stride + tids, mask=full, other=0.0)
            if WANT_RAW:
                r_lse = _tile_lse(t_m, 1.0, tl.load(stat_row + STAT_RAW_SUM * stats_stride + tids, mask=full,
                                                    other=0.0))
                if WANT_T1:
                    r_t1 = tl.load(stat_row + STAT_RAW_T1 * stats_stride + tids, mask=full, other=0.0)
            # Special tiles: the ragged last one and those holding a suppressed id.
            for i in tl.static_range(1 + NUM_SUPPRESS):
                if i == 0:
                    sp = num_tiles - 1 + tl.zeros([], tl.int32)
                    hit = num_full_tiles < num_tiles
                else:
                    sp = (tl.load(supp_ptr + (i - 1)) // NOISE_TILE).to(tl.int32)
                    hit = True
                if hit & (sp >= t0) & (sp < t0 + TILES_BLOCK):
                    x, _ = _masked_tile(row_ptr, sp, V, supp_ptr, csupp_ptr, offs, NUM_SUPPRESS, 0, NOISE_TILE)
                    m, s, m2, t1, raw_s, raw_t1 = _tile_statistics(x, inv_t, WANT_M2, WANT_T1, WANT_RAW)
                    lse = _tile_lse(m, inv_t, s)
                    at = tids == sp
                    t_m = tl.where(at, m, t_m)
                    t_lse = tl.where(at, lse, t_lse)
                    t_m2 = tl.where(at, m2, t_m2)
                    t_t1 = tl.where(at, t1, t_t1)
                    if WANT_RAW:
                        r_lse = tl.where(at, _tile_lse(m, 1.0, raw_s), r_lse)
                        r_t1 = tl.where(at, raw_t1, r_t1)
                    else:
                        r_lse = tl.where(at, lse, r_lse)
                        r_t1 = tl.where(at, t1, r_t1)
            bad = bad | (tl.max(((t_lse != t_lse) | (t_m == float("inf"))).to(tl.int32), 0) != 0)
            # Tile race (first maximal score wins, as torch.argmax).
            score = tl.where(live, t_lse + philox_gumbel(k0, k1, c2, c3, row, tids), _NEG_INF)
            c_best = tl.max(score, 0)
            c_best_tile = tl.min(tl.where(score == c_best, tids, 2147483647), 0)
            take = c_best > best_score
            best_tile = tl.where(take, c_best_tile, best_tile)
            best_score = tl.where(take, c_best, best_score)
            c_xmax = tl.max(tl.where(live, t_m, _NEG_INF), 0)
            c_max_tile = tl.min(tl.where(live & (t_m == c_xmax), tids, 2147483647), 0)
            max_tile = tl.where(c_xmax > x_max, c_max_tile, max_tile)
            x_max = tl.maximum(x_max, c_xmax)
            s_m, s_s, s_t1, s_m2 = _chunk_merge(s_m, s_s, s_t1, s_m2, t_m * inv_t, t_lse, t_t1, t_m2 * inv_t, live)
            # The confidence distribution: raw logits (T = 1) or the sampling one, without the
            # confidence-suppressed ids (their tiles recomputed).
            if CONF_RAW:
                q_m, q_lse, q_t1, q_m2 = t_m, r_lse, r_t1, t_m2
                q_scale = 1.0
            else:
                q_m, q_lse, q_t1, q_m2 = t_m, t_lse, t_t1, t_m2
                q_scale = inv_t
            for i in tl.static_range(NUM_CONF_SUPPRESS):
                sp = (tl.load(csupp_ptr + i) // NOISE_TILE).to(tl.int32)
                if (sp >= t0) & (sp < t0 + TILES_BLOCK):
                    x, _ = _masked_tile(row_ptr, sp, V, supp_ptr, csupp_ptr, offs, NUM_SUPPRESS, NUM_CONF_SUPPRESS,
                                        NOISE_TILE)
                    m, s, m2, t1, _r_s, _r_t1 = _tile_statistics(x, q_scale, WANT_M2, WANT_T1, False)
                    lse = _tile_lse(m, q_scale, s)
                    at = tids == sp
                    q_m = tl.where(at, m, q_m)
                    q_lse = tl.where(at, lse, q_lse)
                    q_m2 = tl.where(at, m2, q_m2)
                    q_t1 = tl.where(at, t1, q_t1)
            c_m, c_s, c_t1, c_m2 = _chunk_merge(c_m, c_s, c_t1, c_m2, q_m * q_scale, q_lse, q_t1, q_m2 * q_scale,
                                                live)
        bad = bad | (x_max == _NEG_INF) | (x_max * inv_t == float("inf"))

        # The token: the first maximal column (greedy), or the column race in the winning tile.
        need_argmax = greedy
        if argmax_ptr is not None:
            need_argmax = True
        argmax_col = tl.zeros([], tl.int64)
        if need_argmax:
            x, cols = _masked_tile(row_ptr, max_tile, V, supp_ptr, csupp_ptr, offs, NUM_SUPPRESS, 0, NOISE_TILE)
            argmax_col = _first_argmax_2d(x, cols)
        token = argmax_col
        if raw_temp != 0.0:
            x, cols = _masked_tile(row_ptr, best_tile, V, supp_ptr, csupp_ptr, offs, NUM_SUPPRESS, 0, NOISE_TILE)
            c2t, c3t = rng_counter_hi(offset, STREAM_TOKEN)
            score = tl.where(x > _NEG_INF, x / temp + philox_gumbel(k0, k1, c2t, c3t, row, cols), _NEG_INF)
            token = _first_argmax_2d(score, cols)
        token = tl.minimum(tl.maximum(token, 0), V - 1)

        if CONFIDENCE == 3:
            c2r, c3r = rng_counter_hi(offset, STREAM_CONFIDENCE)
            conf = philox_uniform(k0, k1, c2r, c3r, row, 0)
        else:
            pick = token
            if query_ptr is not None:
                pick = tl.minimum(tl.maximum(tl.load(query_ptr + row), 0), V - 1)  # never read out of bounds
            z_pick = 0.0
            if CONFIDENCE == 0:
                if CONF_RAW:
                    z_pick = tl.load(row_ptr + pick).to(tl.float32)
                else:
                    # Scaled as the tile maxima (x * (1 / T)): the top token's z_pick - c_max is
                    # exactly 0 and c_s >= 1, so the probability never exceeds 1.
                    z_pick = tl.load(row_ptr + pick).to(tl.float32) * inv_t
            conf = _stats_confidence(CONFIDENCE, z_pick, tl.where(c_m > _NEG_INF, c_m, 0.0), c_s, c_t1, c_m2)
            if CONFIDENCE == 0:
                for i in tl.static_range(NUM_CONF_SUPPRESS):
                    conf = tl.where(pick == tl.load(csupp_ptr + i), 0.0, conf)
        _store_row(tokens_ptr, conf_ptr, argmax_ptr, row, token, conf, tl.minimum(argmax_col, V - 1), bad)


# Confidence kinds of the row kernels (CONFIDENCE constexpr).
CONF_PROB = 0
CONF_MARGIN = 1
CONF_NEG_ENTROPY = 2
CONF_RANDOM = 3


# --------------------------------------------------------------------------------------------
# The general filtered row kernel (one program per row): the rows the candidate path below
# cannot serve. Per-row parameters arrive bundled (see _filter_params); absent ones are None.
# --------------------------------------------------------------------------------------------


@triton.jit
def _filter_params(row, fparams_ptr, temp_value, top_p_value, min_p_value, top_k_ptr, top_k_value):
    """The row's (raw temperature, top_k, top_p, min_p). ``fparams`` is the bundled fp32 [R, 3]
    (temperature, top_p, min_p), or None with the three scalars; ``top_k`` an int64 [R] or None."""
    if fparams_ptr is not None:
        raw_temp = tl.load(fparams_ptr + row * 3)
        top_p = tl.load(fparams_ptr + row * 3 + 1)
        min_p = tl.load(fparams_ptr + row * 3 + 2)
    else:
        raw_temp = temp_value + tl.zeros([], tl.float32)
        top_p = top_p_value + tl.zeros([], tl.float32)
        min_p = min_p_value + tl.zeros([], tl.float32)
    if top_k_ptr is not None:
        top_k = tl.load(top_k_ptr + row).to(tl.int64)
    else:
        top_k = top_k_value + tl.zeros([], tl.int64)
    return raw_temp, top_k, top_p, min_p


@triton.jit
def _race_pass(row_ptr, V, num_tiles, supp_ptr, csupp_ptr, argmax_ptr, temp, key_floor, min_p, ref_max, k0, k1,
               offset, row, NUM_SUPPRESS: tl.constexpr, NUM_CONF_SUPPRESS: tl.constexpr, CONF_RAW: tl.constexpr,
               KEY_SHIFT: tl.constexpr, NOISE_TILE: tl.constexpr, TILE_BLOCK: tl.constexpr):
    """The fused pass over the kept tokens (key >= key_floor, exp(z - ref_max) >= min_p).

    Per noise tile: the tile race on the kept mass (one STREAM_TILE draw per tile), the running
    softmax statistics of the sampling distribution and, when the confidence is measured on
    another one (raw logits, or without the confidence-suppressed ids), of that one. Returns
    (winning tile, first argmax of z, first argmax of x (only with ``argmax_ptr``), a NaN / +inf
    flag, the sampling statistics (max, sum, T1, second max) and the confidence's).
    """
    OWN_CONF_STATS: tl.constexpr = CONF_RAW or NUM_CONF_SUPPRESS > 0
    c2, c3 = rng_counter_hi(offset, STREAM_TILE)
    cols0 = tl.arange(0, TILE_BLOCK)
    zero = tl.zeros([], tl.float32)
    s_max, s_sum, s_t1, s_m2 = zero + _NEG_INF, zero, zero, zero + _NEG_INF
    r_max, r_sum, r_t1, r_m2 = zero + _NEG_INF, zero, zero, zero + _NEG_INF
    arg = tl.zeros([], tl.int64)
    x_max = zero + _NEG_INF
    x_arg = tl.zeros([], tl.int64)
    best_score = zero + _NEG_INF
    best_tile = tl.zeros([], tl.int32)
    bad = tl.zeros([], tl.int32)
    for tile in range(0, num_tiles):
        cols = tile * NOISE_TILE + cols0
        x, inb = _load_tile(row_ptr, cols, V, supp_ptr, NUM_SUPPRESS)
        z = x / temp
        bad = bad | tl.max(((z != z) | (z == float("inf"))).to(tl.int32), 0)
        kept = inb & (_order_key(x, KEY_SHIFT) >= key_floor) & (tl.exp(z - ref_max) >= min_p)
        t_max, t_sum, t_t1, t_m2, t_arg = _tile_stats(z, kept)
        has_mass = t_max > _NEG_INF
        t_lse = tl.where(has_mass, t_max + tl.log(tl.where(has_mass, t_sum, 1.0)), _NEG_INF)
        score = t_lse + philox_gumbel(k0, k1, c2, c3, row, tile)
        better = score > best_score
        best_tile = tl.where(better, tile, best_tile)
        best_score = tl.where(better, score, best_score)
        arg = tl.where(t_max > s_max, t_arg.to(tl.int64) + tile * NOISE_TILE, arg)
        s_max, s_sum, s_t1, s_m2 = _merge_stats(s_max, s_sum, s_t1, s_m2, t_max, t_sum, t_t1, t_m2)
        if argmax_ptr is not None:
            # On x itself: x / temp may round two fp32 logits onto one value.
            tx_max = tl.max(x, 0)
            x_arg = tl.where(tx_max > x_max, tl.argmax(x, 0).to(tl.int64) + tile * NOISE_TILE, x_arg)
            x_max = tl.maximum(x_max, tx_max)
        if OWN_CONF_STATS:
            if CONF_RAW:
                c_vals = x
                c_live = inb
            else:
                c_vals = z
                c_live = kept
            for i in tl.static_range(NUM_CONF_SUPPRESS):
                c_live = c_live & (cols != tl.load(csupp_ptr + i))
            u_max, u_sum, u_t1, u_m2, _u_arg = _tile_stats(c_vals, c_live)
            r_max, r_sum, r_t1, r_m2 = _merge_stats(r_max, r_sum, r_t1, r_m2, u_max, u_sum, u_t1, u_m2)
    if not OWN_CONF_STATS:
        r_max, r_sum, r_t1, r_m2 = s_max, s_sum, s_t1, s_m2
    return best_tile, arg, x_arg, bad, s_max, r_max, r_sum, r_t1, r_m2


@triton.jit
def _store_row(tokens_ptr, conf_ptr, argmax_ptr, row, token, conf, argmax_col, bad):
    """A computed row's outputs; an invalid row gets token -1, confidence NaN, argmax -1."""
    tl.store(tokens_ptr + row, tl.where(bad, -1, token))
    tl.store(conf_ptr + row, tl.where(bad, float("nan"), conf))
    if argmax_ptr is not None:
        tl.store(argmax_ptr + row, tl.where(bad, -1, argmax_col))


@triton.jit
def _row_kernel(
    logits_ptr, stride_row, V, num_tiles, rows_mask_ptr, supp_ptr, csupp_ptr,
    fparams_ptr, temp_value, top_p_value, min_p_value, top_k_ptr, top_k_value,
    seed_ptr, seed_stride, seed_value, offset, tokens_ptr, conf_ptr, argmax_ptr,
    NUM_SUPPRESS: tl.constexpr, NUM_CONF_SUPPRESS: tl.constexpr, TOP_P_BD3LM: tl.constexpr,
    CONFIDENCE: tl.constexpr, CONF_RAW: tl.constexpr, KEY_SHIFT: tl.constexpr, NUM_PIVOTS: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr, NOISE_TILE: tl.constexpr, TILE_BLOCK: tl.constexpr,
):
    """The general filtered row kernel, one program per row flagged in ``rows_mask`` (int8 [R]; the
    other rows are left untouched): row statistics, the multi-pivot threshold search, one fused
    pass (_race_pass), the column race in the winning tile, the confidence.

    The confidence is measured on the sampling distribution, or (``CONF_RAW``) on the raw logits
    at temperature 1, in both cases without the ``NUM_CONF_SUPPRESS`` ids of ``csupp_ptr``.
    Invalid rows get token -1 and confidence NaN. With ``argmax_ptr`` it also stores the first
    argmax of the suppressed logits.
    """
    row = tl.program_id(0).to(tl.int64)
    if tl.load(rows_mask_ptr + row) == 0:
        return
    row_ptr = logits_ptr + row * stride_row
    raw_temp, top_k, top_p, min_p = _filter_params(row, fparams_ptr, temp_value, top_p_value, min_p_value,
                                                   top_k_ptr, top_k_value)
    greedy = raw_temp == 0.0
    temp = tl.where(greedy, 1.0, raw_temp)
    k0, k1 = rng_key(_row_seed(seed_ptr, row, seed_stride, seed_value))

    z_max, _first_max, key_min, key_max, bad = _row_stats(row_ptr, V, temp, supp_ptr, NUM_SUPPRESS, KEY_SHIFT,
                                                          SEARCH_BLOCK)
    ref_max = tl.where(z_max > _NEG_INF, z_max, 0.0)
    key_floor = tl.full([], -(2**40), tl.int64)
    if bad == 0:
        key_floor = _filter_threshold(row_ptr, V, supp_ptr, temp, ref_max, key_min, key_max, top_k, top_p,
                                      NUM_SUPPRESS, KEY_SHIFT, NUM_PIVOTS, SEARCH_BLOCK, TOP_P_BD3LM)
    best_tile, arg, x_arg, pass_bad, s_max, c_max, c_sum, c_t1, c_m2 = _race_pass(
        row_ptr, V, num_tiles, supp_ptr, csupp_ptr, argmax_ptr, temp, key_floor, min_p, ref_max, k0, k1, offset,
        row, NUM_SUPPRESS, NUM_CONF_SUPPRESS, CONF_RAW, KEY_SHIFT, NOISE_TILE, TILE_BLOCK)
    bad = (bad | pass_bad) != 0
    bad = bad | (s_max == _NEG_INF)

    c2, c3 = rng_counter_hi(offset, STREAM_TOKEN)
    raced = _race_in_tile(row_ptr, V, supp_ptr, best_tile, temp, key_floor, min_p, ref_max, k0, k1, c2, c3,
                          row, NUM_SUPPRESS, KEY_SHIFT, NOISE_TILE, TILE_BLOCK)
    token = tl.where(greedy, arg, raced)
    token = tl.minimum(tl.maximum(token, 0), V - 1)

    if CONFIDENCE == 3:
        c2r, c3r = rng_counter_hi(offset, STREAM_CONFIDENCE)
        conf = philox_uniform(k0, k1, c2r, c3r, row, 0)
    else:
        if CONF_RAW:
            z_tok = tl.load(row_ptr + token).to(tl.float32)
        else:
            z_tok = tl.load(row_ptr + token).to(tl.float32) / temp
        conf = _stats_confidence(CONFIDENCE, z_tok, tl.where(c_max > _NEG_INF, c_max, 0.0), c_sum, c_t1, c_m2)
        if CONFIDENCE == 0:
            for i in tl.static_range(NUM_CONF_SUPPRESS):
                conf = tl.where(token == tl.load(csupp_ptr + i), 0.0, conf)
    _store_row(tokens_ptr, conf_ptr, argmax_ptr, row, token, conf, tl.minimum(x_arg, V - 1), bad)


@triton.jit
def _filter_logits_kernel(
    logits_ptr, stride_row, out_ptr, out_stride_row, bad_ptr, rows_mask_ptr, V,
    fparams_ptr, top_p_value, min_p_value, top_k_ptr, top_k_value,
    TOP_P_BD3LM: tl.constexpr, KEY_SHIFT: tl.constexpr, NUM_PIVOTS: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
):
    """filter_logits, general path, one program per row: stats, multi-pivot threshold search,
    masked copy. Runs the rows ``rows_mask`` flags (all rows when None); ``fparams`` as in
    _filter_params (its temperature column unused)."""
    row = tl.program_id(0).to(tl.int64)
    if rows_mask_ptr is not None:
        if tl.load(rows_mask_ptr + row) == 0:
            return
    row_ptr = logits_ptr + row * stride_row
    out_row_ptr = out_ptr + row * out_stride_row
    _t, top_k, top_p, min_p = _filter_params(row, fparams_ptr, 1.0, top_p_value, min_p_value, top_k_ptr,
                                             top_k_value)
    one = tl.full([], 1.0, tl.float32)

    z_max, _, key_min, key_max, bad = _row_stats(row_ptr, V, one, None, 0, KEY_SHIFT, SEARCH_BLOCK)
    safe_max = tl.where(z_max > _NEG_INF, z_max, 0.0)
    key_floor = key_min
    if bad == 0:
        key_floor = _filter_threshold(row_ptr, V, None, one, safe_max, key_min, key_max, top_k, top_p,
                                      0, KEY_SHIFT, NUM_PIVOTS, SEARCH_BLOCK, TOP_P_BD3LM)
    cols0 = tl.arange(0, SEARCH_BLOCK)
    for start in range(0, V, SEARCH_BLOCK):
        cols = start + cols0
        inb = cols < V
        raw = tl.load(row_ptr + cols, mask=inb, other=_NEG_INF)
        x = raw.to(tl.float32)
        kept = (_order_key(x, KEY_SHIFT) >= key_floor) & (tl.exp(x - safe_max) >= min_p)
        tl.store(out_row_ptr + cols, tl.where(kept, raw, float("-inf")).to(raw.dtype), mask=inb)
    tl.store(bad_ptr + row, bad.to(tl.int8))


# --------------------------------------------------------------------------------------------
# Filtered rows with top-k (or min-p): two passes and a candidate list, every pass split across
# programs.
#
# Pass 1 (_lane_max_kernel) keeps a running maximum per lane of FILTER_BLOCK-wide blocks over a
# run of blocks of one row, folds the lanes into CANDIDATES groups and writes the group maxima.
# _bound_kernel merges a row's runs (an elementwise max: exactly the unsplit maxima) and takes
# their k-th largest, L, a lower bound of the k-th largest logit (the k groups above it hold k
# distinct tokens): every top-k survivor has a logit >= L. Pass 2 (_collect_kernel) appends the
# columns with a logit >= L to the row's candidate list (about k entries on real logits) and,
# when the confidence is measured on the raw logits, sums their softmax statistics relative to
# the exact maximum pass 1 found, so that confidence needs no third pass. _finish_kernel runs
# everything else on the candidates in registers, with the exact rules of the reference: the
# exact k-th largest, the top-p boundary, min-p, the tile race, the column race, the
# confidence. A row whose candidates overflow CANDIDATES (ties, flat rows, large k) or that has
# no bound (top-p alone) is flagged and handled by the general kernels above (_row_kernel,
# _filter_logits_kernel).
#
# Work items of the passes are (row slot, run of blocks): _split_row cuts each active row into
# as many runs as it takes to give about _FILTER_PROGRAMS_PER_SM one-warp programs per SM, so a
# batch of one row still spreads over the GPU; every kernel of the path evaluates the same split
# from the active-row count (on the device when masked rows were compacted). The per-row kernels
# loop over row slots the same way. A warp owns a whole block, so the passes have no block
# barrier: one 16-byte load per thread per 256 columns, eight in flight.
# --------------------------------------------------------------------------------------------

CANDIDATES = 512  # capacity of a row's candidate list, and the number of lane groups of pass 1
FILTER_BLOCK = 2048
COLLECT_BLOCK = 1024  # columns a one-warp program of pass 2 holds at a time

# Per-row state written by _bound_kernel (fp32 [R, NUM_STATE]).
STATE_BOUND = tl.constexpr(0)  # L, or -inf when there is none (the general kernel serves the row)
STATE_XMAX = tl.constexpr(1)  # max of the suppressed logits
STATE_CONF_MAX = tl.constexpr(2)  # max of the raw confidence distribution (without its ids)
STATE_BAD = tl.constexpr(3)  # 1.0 for an invalid row (NaN / +inf / all -inf)
NUM_STATE = tl.constexpr(4)
# Raw-logit confidence statistics per run of pass 2 (fp32 [items, NUM_RAW]): sum exp(x - max),
# sum exp(x - max)(x - max), and the top two of x (for the margin).
NUM_RAW = tl.constexpr(4)


@triton.jit
def _drop_ids(x, offs, start, ids_ptr, NUM_IDS: tl.constexpr, BLOCK: tl.constexpr):
    """``x`` (the block of ``BLOCK`` columns at ``start``; ``offs`` = arange(0, BLOCK)) with the
    ``NUM_IDS`` ids of ``ids_ptr`` at -inf; an id costs a compare only in the block holding it."""
    for i in tl.static_range(NUM_IDS):
        rel = tl.load(ids_ptr + i) - start
        if (rel >= 0) & (rel < BLOCK):
            x = tl.where(offs == rel, _NEG_INF, x)
    return x


@triton.jit
def _block_of_row(row_ptr, block, V, cols0, supp_ptr, NUM_SUPPRESS: tl.constexpr, BLOCK: tl.constexpr,
                  FULL: tl.constexpr):
    """fp32 logits of block ``block`` of a row and its first column; suppressed (and, unless
    FULL, out-of-range) ids read -inf."""
    start = block * BLOCK
    cols = start + cols0
    if FULL:
        x = tl.load(row_ptr + cols).to(tl.float32)
    else:
        x = tl.load(row_ptr + cols, mask=cols < V, other=_NEG_INF).to(tl.float32)
    return _drop_ids(x, cols0, start, supp_ptr, NUM_SUPPRESS, BLOCK), start


@triton.jit
def _lane_max_kernel(
    logits_ptr, stride_row, V, num_blocks, rows_ptr, count_ptr, count_value, target_items, supp_ptr, csupp_ptr,
    lm_ptr, NUM_SUPPRESS: tl.constexpr, NUM_CONF_SUPPRESS: tl.constexpr, BLOCK: tl.constexpr,
    LANES: tl.constexpr,
):
    """Pass 1: per run, the lane maxima of its blocks folded to LANES group maxima, +inf where a
    NaN or +inf was seen -> ``lm[item]`` (fp32 [items, LANES]). The ``NUM_CONF_SUPPRESS`` ids are
    left out too (the raw confidence then gets its exact maximum; _bound_kernel reads them)."""
    cols0 = tl.arange(0, BLOCK)
    count = _active_count(count_ptr, count_value)
    parts, per_part = _split_row(count, target_items, num_blocks)
    num_full = V // BLOCK
    for item in range(tl.program_id(0), count * parts, tl.num_programs(0)):
        slot = item // parts
        row_ptr = logits_ptr + _row_of_slot(rows_ptr, slot) * stride_row
        first = (item - slot * parts) * per_part
        last = tl.minimum(first + per_part, num_blocks)
        lm = tl.full([BLOCK], _NEG_INF, tl.float32)
        for block in range(first, tl.minimum(last, num_full)):
            x, start = _block_of_row(row_ptr, block, V, cols0, supp_ptr, NUM_SUPPRESS, BLOCK, True)
            x = _drop_ids(x, cols0, start, csupp_ptr, NUM_CONF_SUPPRESS, BLOCK)
            lm = tl.maximum(lm, x, propagate_nan=tl.PropagateNan.ALL)
        if last > num_full:  # the ragged last block
            x, start = _block_of_row(row_ptr, num_full, V, cols0, supp_ptr, NUM_SUPPRESS, BLOCK, False)
            x = _drop_ids(x, cols0, start, csupp_ptr, NUM_CONF_SUPPRESS, BLOCK)
            lm = tl.maximum(lm, x, propagate_nan=tl.PropagateNan.ALL)
        lm = tl.where(lm != lm, float("inf"), lm)
        groups = tl.max(tl.reshape(lm, [LANES, BLOCK // LANES]), 1)
        tl.store(lm_ptr + _i64(item) * LANES + tl.arange(0, LANES), groups)


@triton.jit
def _vector_threshold(key, w, lo, hi, target, NUM_PIVOTS: tl.constexpr):
    """Largest key ``t`` in ``[lo, hi)`` with ``sum(w[key >= t]) >= target``, and that sum at
    ``t + 1``: the multi-pivot search of _search_threshold on a register vector."""
    piv_ids = tl.arange(0, NUM_PIVOTS).to(tl.int64) + 1
    f_hi = tl.full([], 0.0, tl.float32)
    passes = 0
    while (hi - lo > 1) & (passes < 40):
        pivots = lo + ((hi - lo) * piv_ids) // (NUM_PIVOTS + 1)
        acc = tl.sum(tl.where(key[None, :] >= pivots[:, None], w[None, :], 0.0), 1)
        ok = acc >= target
        f_hi = tl.maximum(f_hi, tl.max(tl.where(ok, 0.0, acc), 0))
        lo = tl.max(tl.where(ok, pivots, lo), 0)
        hi = tl.min(tl.where(ok, hi, pivots), 0)
        passes += 1
    return lo, f_hi


@triton.jit
def _candidate_bound(groups, x_max, temp, top_k, top_p, min_p, V, KEY_SHIFT: tl.constexpr,
                     NUM_PIVOTS: tl.constexpr):
    """The lower bound L of pass 2 from the group maxima (-inf: no bound, the general kernel
    serves the row)."""
    bound = tl.full([], _NEG_INF, tl.float32)
    if (top_k > 0) & (top_k < V):
        if top_k <= groups.shape[0]:
            key = _order_key(groups, KEY_SHIFT)
            lo = tl.min(key, 0)
            hi = tl.max(key, 0) + 1
            key_l, _ = _vector_threshold(key, tl.full(groups.shape, 1.0, tl.float32), lo, hi,
                                         top_k.to(tl.float32), NUM_PIVOTS)
            bound = _key_value(key_l, KEY_SHIFT)
    elif (min_p > 0.0) & (top_p >= 1.0):
        # exp(z - max z) >= min_p  <=>  x >= max x + T log(min_p), loosened so that rounding
        # never drops a token the exact test keeps (the candidates are re-tested).
        bound = x_max + temp * tl.log(min_p)
        bound = bound - 1e-3 * tl.maximum(tl.abs(bound), 1.0)
    return bound


@triton.jit
def _bound_kernel(
    logits_ptr, stride_row, V, num_blocks, rows_ptr, count_ptr, count_value, target_items, supp_ptr, csupp_ptr,
    lm_ptr, fparams_ptr, temp_value, top_p_value, min_p_value, top_k_ptr, top_k_value, state_ptr, counts_ptr,
    NUM_SUPPRESS: tl.constexpr, NUM_CONF_SUPPRESS: tl.constexpr, KEY_SHIFT: tl.constexpr,
    NUM_PIVOTS: tl.constexpr, LANES: tl.constexpr,
):
    """Per active row: merge the group maxima of its runs; the row's maximum, invalid flag and
    pass-2 bound -> ``state[slot]``; its candidate count set to 0."""
    lanes = tl.arange(0, LANES)
    count = _active_count(count_ptr, count_value)
    parts, _per_part = _split_row(count, target_items, num_blocks)
    for slot in range(tl.program_id(0), count, tl.num_programs(0)):
        row = _row_of_slot(rows_ptr, slot)
        row_ptr = logits_ptr + row * stride_row
        raw_temp, top_k, top_p, min_p = _filter_params(row, fparams_ptr, temp_value, top_p_value, min_p_value,
                                                       top_k_ptr, top_k_value)
        temp = tl.where(raw_temp == 0.0, 1.0, raw_temp)
        groups = tl.full([LANES], _NEG_INF, tl.float32)
        for p in range(0, parts):
            groups = tl.maximum(groups, tl.load(lm_ptr + _i64(slot * parts + p) * LANES + lanes))
        conf_max = tl.max(groups, 0)
        x_max = conf_max
        for i in tl.static_range(NUM_CONF_SUPPRESS):  # left out of pass 1: read them here
            cid = tl.load(csupp_ptr + i)
            v = tl.load(row_ptr + cid).to(tl.float32)
            for j in tl.static_range(NUM_SUPPRESS):
                v = tl.where(cid == tl.load(supp_ptr + j), _NEG_INF, v)
            x_max = tl.maximum(x_max, v, propagate_nan=tl.PropagateNan.ALL)
        bad = (x_max != x_max) | (x_max == float("inf")) | (x_max == _NEG_INF) | (x_max / temp == float("inf"))
        bound = tl.full([], _NEG_INF, tl.float32)
        if not bad:
            bound = _candidate_bound(groups, x_max, temp, top_k, top_p, min_p, V, KEY_SHIFT, NUM_PIVOTS)
        st = state_ptr + _i64(slot) * NUM_STATE
        tl.store(st + STATE_BOUND, bound)
        tl.store(st + STATE_XMAX, x_max)
        tl.store(st + STATE_CONF_MAX, conf_max)
        tl.store(st + STATE_BAD, bad.to(tl.float32))
        tl.store(counts_ptr + slot, 0)


@triton.jit
def _append_candidates(x, offs, start, bound, count_ptr, cand_ptr, CAP: tl.constexpr):
    """Append the columns with ``x >= bound`` to a row's list. A block without any costs a max
    and a compare per entry; one with some, one atomic. At most CAP are stored (the count keeps
    growing past it, flagging the overflow)."""
    if tl.max(x, 0) >= bound:
        hit = x >= bound
        # Relaxed: the list is read by a later launch, nothing in this one orders on it.
        pos = tl.atomic_add(count_ptr + tl.zeros(x.shape, tl.int32), 1, mask=hit, sem="relaxed")
        tl.store(cand_ptr + pos, (start + offs).to(tl.int32), mask=hit & (pos < CAP))


@triton.jit
def _raw_block_stats(x, ref2, s, t1, m1, m2, WANT_T1: tl.constexpr, WANT_M2: tl.constexpr):
    """Add a block to the running raw-logit statistics relative to a fixed maximum ``ref2``:
    sum exp(x - max), sum exp(x - max)(x - max), the top two of x. The maximum is subtracted
    before scaling by log2(e) (``x * log2(e)`` overflows above FLT_MAX / log2(e))."""
    y = (x - ref2) * LOG2E
    if WANT_T1:
        y = tl.maximum(y, -3.0e38)  # keep 0 * y finite where x is -inf
    e = tl.exp2(y)
    s += tl.sum(e, 0)
    if WANT_T1:
        t1 += tl.sum(e * y, 0) * LN2
    if WANT_M2:
        b1, b2 = tl.reduce((x, tl.full(x.shape, _NEG_INF, tl.float32)), 0, _top2_combine)
        m1, m2 = _top2_combine(m1, m2, b1, b2)
    return s, t1, m1, m2


@triton.jit
def _collect_block(x, offs, start, bound, count_ptr, list_ptr, csupp_ptr, raw, ref2,
                   NUM_CONF_SUPPRESS: tl.constexpr, WANT_RAW: tl.constexpr, WANT_T1: tl.constexpr,
                   WANT_M2: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr):
    """Pass 2 on one block: its candidates, and its share of the raw statistics ``raw``."""
    _append_candidates(x, offs, start, bound, count_ptr, list_ptr, CAP)
    if WANT_RAW:
        s, t1, m1, m2 = raw
        xc = _drop_ids(x, offs, start, csupp_ptr, NUM_CONF_SUPPRESS, BLOCK)
        raw = _raw_block_stats(xc, ref2, s, t1, m1, m2, WANT_T1, WANT_M2)
    return raw


@triton.jit
def _collect_kernel(
    logits_ptr, stride_row, V, num_blocks, rows_ptr, count_ptr, count_value, target_items, supp_ptr, csupp_ptr,
    state_ptr, counts_ptr, cand_ptr, raw_ptr,
    NUM_SUPPRESS: tl.constexpr, NUM_CONF_SUPPRESS: tl.constexpr, WANT_T1: tl.constexpr, WANT_M2: tl.constexpr,
    BLOCK: tl.constexpr, SUB: tl.constexpr, CAP: tl.constexpr,
):
    """Pass 2: per run, append the columns >= the row's bound to its candidate list
    (``cand[slot]``, int32 [R, CAP]; ``counts[slot]``). With ``raw_ptr`` (fp32 [items, NUM_RAW])
    also the run's raw-logit confidence statistics: the distribution without the
    ``NUM_CONF_SUPPRESS`` ids, relative to its maximum. Rows without a bound are skipped. The
    runs are those of pass 1 (blocks of BLOCK columns), read SUB columns at a time."""
    WANT_RAW: tl.constexpr = raw_ptr is not None
    cols0 = tl.arange(0, SUB)
    count = _active_count(count_ptr, count_value)
    parts, per_part = _split_row(count, target_items, num_blocks)
    num_full = V // BLOCK
    for item in range(tl.program_id(0), count * parts, tl.num_programs(0)):
        slot = item // parts
        st = state_ptr + _i64(slot) * NUM_STATE
        bound = tl.load(st + STATE_BOUND)
        if (tl.load(st + STATE_BAD) == 0.0) & (bound > _NEG_INF):
            row_ptr = logits_ptr + _row_of_slot(rows_ptr, slot) * stride_row
            list_ptr = cand_ptr + _i64(slot) * CAP
            first = (item - slot * parts) * per_part
            last = tl.minimum(first + per_part, num_blocks)
            conf_max = tl.load(st + STATE_CONF_MAX)
            ref2 = tl.where(conf_max > _NEG_INF, conf_max, 0.0)
            zero = tl.zeros([], tl.float32)
            raw = (zero, zero, zero + _NEG_INF, zero + _NEG_INF)
            for block in range(first, tl.minimum(last, num_full)):
                for sub in tl.static_range(BLOCK // SUB):
                    x, start = _block_of_row(row_ptr, block * (BLOCK // SUB) + sub, V, cols0, supp_ptr,
                                             NUM_SUPPRESS, SUB, True)
                    raw = _collect_block(x, cols0, start, bound, counts_ptr + slot, list_ptr, csupp_ptr, raw, ref2,
                                         NUM_CONF_SUPPRESS, WANT_RAW, WANT_T1, WANT_M2, SUB, CAP)
            if last > num_full:  # the ragged last block
                for sub in tl.static_range(BLOCK // SUB):
                    x, start = _block_of_row(row_ptr, num_full * (BLOCK // SUB) + sub, V, cols0, supp_ptr,
                                             NUM_SUPPRESS, SUB, False)
                    raw = _collect_block(x, cols0, start, bound, counts_ptr + slot, list_ptr, csupp_ptr, raw, ref2,
                                         NUM_CONF_SUPPRESS, WANT_RAW, WANT_T1, WANT_M2, SUB, CAP)
            if WANT_RAW:
                out = raw_ptr + _i64(item) * NUM_RAW
                for i in tl.static_range(4):
                    tl.store(out + i, raw[i])


@triton.jit
def _candidate_filter(x, live, V, temp, top_k, top_p, min_p, KEY_SHIFT: tl.constexpr, NUM_PIVOTS: tl.constexpr,
                      TOP_P_BD3LM: tl.constexpr):
    """The reference's top-k -> top-p -> min-p on the candidates (which hold every top-k
    survivor): the kept mask, z, exp(z - max z) and the key threshold."""
    key = _order_key(x, KEY_SHIFT)
    no_key = tl.full([], 2**40, tl.int64)
    lo = tl.min(tl.where(live, key, no_key), 0)
    hi = tl.max(tl.where(live, key, -no_key), 0) + 1
    key_k = lo
    if (top_k > 0) & (top_k < V):
        key_k, _ = _vector_threshold(key, live.to(tl.float32), lo, hi, top_k.to(tl.float32), NUM_PIVOTS)
    kept = live & (key >= key_k)
    z = x / temp
    z_max = tl.max(tl.where(kept, z, _NEG_INF), 0)
    z_safe = tl.where(z_max > _NEG_INF, z_max, 0.0)
    e = tl.where(kept, tl.exp(z - z_safe), 0.0)
    key_thr = key_k
    if top_p < 1.0:
        target = top_p * tl.sum(e, 0)
        key_p, mass_above = _vector_threshold(key, e, key_k, hi, target, NUM_PIVOTS)
        if TOP_P_BD3LM:
            own = tl.exp(_key_value(key_p, KEY_SHIFT) / temp - z_safe)
            fits = (mass_above + own <= target) | (key_p >= hi - 1)
            key_p = tl.where(fits, key_p, key_p + 1)
        key_thr = key_p
        kept = kept & (key >= key_p)
    kept = kept & (e >= min_p)
    return kept, z, z_safe, tl.where(kept, e, 0.0), key_thr


@triton.jit
def _candidate_race(cols, kept, z, z_safe, e, k0, k1, offset, row, NOISE_TILE: tl.constexpr):
    """The reference's two-level race on the kept candidates: the tiles that hold any (one
    STREAM_TILE draw each on the log of their kept mass, first maximal tile winning), then the
    columns of the winner (STREAM_TOKEN)."""
    c2, c3 = rng_counter_hi(offset, STREAM_TILE)
    tile_of = cols // NOISE_TILE
    todo = kept
    best_score = tl.full([], _NEG_INF, tl.float32)
    best_tile = tl.zeros([], tl.int64)
    while tl.max(todo.to(tl.int32), 0) > 0:  # in increasing tile order
        t = tl.min(tl.where(todo, tile_of, 2**62), 0)
        inside = kept & (tile_of == t)
        score = z_safe + tl.log(tl.sum(tl.where(inside, e, 0.0), 0)) + philox_gumbel(k0, k1, c2, c3, row, t)
        take = score > best_score
        best_tile = tl.where(take, t, best_tile)
        best_score = tl.where(take, score, best_score)
        todo = todo & (tile_of != t)
    c2t, c3t = rng_counter_hi(offset, STREAM_TOKEN)
    inside = kept & (tile_of == best_tile)
    score = tl.where(inside, z + philox_gumbel(k0, k1, c2t, c3t, row, cols), _NEG_INF)
    return tl.min(tl.where(inside & (score == tl.max(score, 0)), cols, 2**62), 0)


@triton.jit
def _candidate_confidence(row_ptr, cols, kept, z, token, temp, csupp_ptr, NUM_CONF_SUPPRESS: tl.constexpr,
                          CONFIDENCE: tl.constexpr):
    """The confidence under the sampling distribution (the kept candidates), without the
    confidence-suppressed ids."""
    q = kept
    for i in tl.static_range(NUM_CONF_SUPPRESS):
        q = q & (cols != tl.load(csupp_ptr + i))
    zq = tl.where(q, z, _NEG_INF)
    q_max = tl.max(zq, 0)
    q_safe = tl.where(q_max > _NEG_INF, q_max, 0.0)
    q_e = tl.where(q, tl.exp(z - q_safe), 0.0)
    q_sum = tl.sum(q_e, 0)
    z_tok = 0.0
    t1 = 0.0
    m2 = _NEG_INF
    if CONFIDENCE == 0:
        z_tok = tl.load(row_ptr + token).to(tl.float32) / temp
    elif CONFIDENCE == 1:
        _, m2 = tl.reduce((zq, tl.full(z.shape, _NEG_INF, tl.float32)), 0, _top2_combine)
    else:
        t1 = tl.sum(tl.where(q_e > 0.0, q_e * (z - q_safe), 0.0), 0)
    return _stats_confidence(CONFIDENCE, z_tok, q_safe, q_sum, t1, m2)


@triton.jit
def _finish_kernel(
    logits_ptr, stride_row, V, num_blocks, rows_ptr, count_ptr, count_value, target_items, csupp_ptr,
    fparams_ptr, temp_value, top_p_value, min_p_value, top_k_ptr, top_k_value, seed_ptr, seed_stride, seed_value,
    offset, state_ptr, counts_ptr, cand_ptr, raw_ptr, tokens_ptr, conf_ptr, argmax_ptr, fallback_ptr,
    NUM_CONF_SUPPRESS: tl.constexpr, TOP_P_BD3LM: tl.constexpr, CONFIDENCE: tl.constexpr, CONF_RAW: tl.constexpr,
    KEY_SHIFT: tl.constexpr, NUM_PIVOTS: tl.constexpr, CAP: tl.constexpr, NOISE_TILE: tl.constexpr,
):
    """Per active row, on its candidates: the filters, the races and the confidence (``CONF_RAW``:
    from the raw statistics of pass 2, merged over the row's runs). Invalid rows get (-1, NaN);
    rows the candidates cannot serve set ``fallback[row]`` and write nothing else."""
    slots0 = tl.arange(0, CAP)
    count = _active_count(count_ptr, count_value)
    parts, _per_part = _split_row(count, target_items, num_blocks)
    for slot in range(tl.program_id(0), count, tl.num_programs(0)):
        row = _row_of_slot(rows_ptr, slot)
        row_ptr = logits_ptr + row * stride_row
        st = state_ptr + _i64(slot) * NUM_STATE
        bound = tl.load(st + STATE_BOUND)
        bad = tl.load(st + STATE_BAD) != 0.0
        found = tl.load(counts_ptr + slot)
        served = (~bad) & (bound > _NEG_INF) & (found <= CAP)
        if served:
            raw_temp, top_k, top_p, min_p = _filter_params(row, fparams_ptr, temp_value, top_p_value, min_p_value,
                                                           top_k_ptr, top_k_value)
            temp = tl.where(raw_temp == 0.0, 1.0, raw_temp)
            k0, k1 = rng_key(_row_seed(seed_ptr, row, seed_stride, seed_value))
            live = slots0 < found
            cols = tl.load(cand_ptr + _i64(slot) * CAP + slots0, mask=live, other=0).to(tl.int64)
            x = tl.load(row_ptr + cols, mask=live, other=_NEG_INF).to(tl.float32)
            x = tl.where(live, x, _NEG_INF)
            kept, z, z_safe, e, _ = _candidate_filter(x, live, V, temp, top_k, top_p, min_p, KEY_SHIFT, NUM_PIVOTS,
                                                      TOP_P_BD3LM)
            x_max = tl.load(st + STATE_XMAX)
            argmax_col = tl.min(tl.where(live & (x == x_max), cols, 2**62), 0)
            token = argmax_col
            if raw_temp != 0.0:
                token = _candidate_race(cols, kept, z, z_safe, e, k0, k1, offset, row, NOISE_TILE)
            token = tl.minimum(tl.maximum(token, 0), V - 1)
            if CONFIDENCE == 3:
                c2r, c3r = rng_counter_hi(offset, STREAM_CONFIDENCE)
                conf = philox_uniform(k0, k1, c2r, c3r, row, 0)
            elif CONF_RAW:
                zero = tl.zeros([], tl.float32)
                c_sum, c_t1, m1, c_m2 = zero, zero, zero + _NEG_INF, zero + _NEG_INF
                for p in range(0, parts):
                    part = raw_ptr + _i64(slot * parts + p) * NUM_RAW
                    c_sum += tl.load(part)
                    c_t1 += tl.load(part + 1)
                    m1, c_m2 = _top2_combine(m1, c_m2, tl.load(part + 2), tl.load(part + 3))
                conf_max = tl.load(st + STATE_CONF_MAX)
                conf = _stats_confidence(CONFIDENCE, tl.load(row_ptr + token).to(tl.float32),
                                         tl.where(conf_max > _NEG_INF, conf_max, 0.0), c_sum, c_t1, c_m2)
            else:
                conf = _candidate_confidence(row_ptr, cols, kept, z, token, temp, csupp_ptr, NUM_CONF_SUPPRESS,
                                             CONFIDENCE)
            if CONFIDENCE == 0:
                for i in tl.static_range(NUM_CONF_SUPPRESS):
                    conf = tl.where(token == tl.load(csupp_ptr + i), 0.0, conf)
            _store_row(tokens_ptr, conf_ptr, argmax_ptr, row, token, conf, tl.minimum(argmax_col, V - 1), False)
        if bad:
            _store_row(tokens_ptr, conf_ptr, argmax_ptr, row, -1, 0.0, -1, True)
        tl.store(fallback_ptr + row, ((~bad) & (~served)).to(tl.int8))


@triton.jit
def _filter_bounds_kernel(
    logits_ptr, stride_row, V, rows, fparams_ptr, top_p_value, min_p_value, top_k_ptr, top_k_value, state_ptr,
    counts_ptr, cand_ptr, bad_ptr, fallback_ptr,
    TOP_P_BD3LM: tl.constexpr, KEY_SHIFT: tl.constexpr, NUM_PIVOTS: tl.constexpr, CAP: tl.constexpr,
):
    """filter_logits, per row, on its candidates: the kept range ``x >= v_thr`` (written over
    STATE_BOUND; -inf marks a row the copy skips) and the min-p reference (over STATE_CONF_MAX);
    the row's invalid flag and whether the general kernel must serve it."""
    slots0 = tl.arange(0, CAP)
    one = tl.full([], 1.0, tl.float32)
    for slot in range(tl.program_id(0), rows, tl.num_programs(0)):
        row = _i64(slot)
        row_ptr = logits_ptr + row * stride_row
        st = state_ptr + row * NUM_STATE
        bound = tl.load(st + STATE_BOUND)
        bad = tl.load(st + STATE_BAD) != 0.0
        found = tl.load(counts_ptr + row)
        served = (~bad) & (bound > _NEG_INF) & (found <= CAP)
        v_thr = tl.full([], _NEG_INF, tl.float32)
        if served:
            _t, top_k, top_p, min_p = _filter_params(row, fparams_ptr, 1.0, top_p_value, min_p_value, top_k_ptr,
                                                     top_k_value)
            live = slots0 < found
            cols = tl.load(cand_ptr + row * CAP + slots0, mask=live, other=0).to(tl.int64)
            x = tl.load(row_ptr + cols, mask=live, other=_NEG_INF).to(tl.float32)
            x = tl.where(live, x, _NEG_INF)
            _, _, x_safe, _, key_thr = _candidate_filter(x, live, V, one, top_k, top_p, min_p, KEY_SHIFT,
                                                         NUM_PIVOTS, TOP_P_BD3LM)
            v_thr = _key_value(key_thr, KEY_SHIFT)  # key(x) >= key_thr  <=>  x >= v_thr
            tl.store(st + STATE_CONF_MAX, x_safe)
        tl.store(st + STATE_BOUND, v_thr)
        tl.store(bad_ptr + row, bad.to(tl.int8))
        tl.store(fallback_ptr + row, ((~bad) & (~served)).to(tl.int8))


@triton.jit
def _copy_kept(row_ptr, out_row_ptr, cols, V, v_thr, x_safe, min_p, FULL: tl.constexpr):
    """One block of the masked copy: kept entries copied in their dtype, the others -inf."""
    if FULL:
        raw = tl.load(row_ptr + cols)
    else:
        raw = tl.load(row_ptr + cols, mask=cols < V, other=_NEG_INF)
    x = raw.to(tl.float32)
    keep = x >= v_thr
    if min_p > 0.0:
        keep = keep & (tl.exp(x - x_safe) >= min_p)
    out = tl.where(keep, raw, float("-inf")).to(raw.dtype)
    if FULL:
        tl.store(out_row_ptr + cols, out)
    else:
        tl.store(out_row_ptr + cols, out, mask=cols < V)


@triton.jit
def _masked_copy_kernel(
    logits_ptr, stride_row, out_ptr, out_stride_row, V, num_blocks, rows, target_items, fparams_ptr, min_p_value,
    state_ptr, BLOCK: tl.constexpr,
):
    """filter_logits' pass 3, split like the others: every kept entry copied, the rest -inf,
    for the rows _filter_bounds_kernel served (the others are left to the general kernel)."""
    cols0 = tl.arange(0, BLOCK)
    parts, per_part = _split_row(rows, target_items, num_blocks)
    num_full = V // BLOCK
    for item in range(tl.program_id(0), rows * parts, tl.num_programs(0)):
        row = _i64(item // parts)
        st = state_ptr + row * NUM_STATE
        v_thr = tl.load(st + STATE_BOUND)
        if v_thr > _NEG_INF:
            if fparams_ptr is not None:
                min_p = tl.load(fparams_ptr + row * 3 + 2)
            else:
                min_p = min_p_value + tl.zeros([], tl.float32)
            x_safe = tl.load(st + STATE_CONF_MAX)
            row_ptr = logits_ptr + row * stride_row
            out_row_ptr = out_ptr + row * out_stride_row
            first = (item - (item // parts) * parts) * per_part
            last = tl.minimum(first + per_part, num_blocks)
            for block in range(first, tl.minimum(last, num_full)):
                _copy_kept(row_ptr, out_row_ptr, block * BLOCK + cols0, V, v_thr, x_safe, min_p, True)
            if last > num_full:  # the ragged last block
                _copy_kept(row_ptr, out_row_ptr, num_full * BLOCK + cols0, V, v_thr, x_safe, min_p, False)


# --------------------------------------------------------------------------------------------
# Host launchers. ``wrap`` is torch.library.wrap_triton when the caller is a triton_op, so
# torch.compile can trace the launches; the identity otherwise.
# --------------------------------------------------------------------------------------------

import torch  # noqa: E402

KEY_SHIFT = {torch.float32: 0, torch.float16: 13, torch.bfloat16: 16}
CONFIDENCE_KINDS = {"prob": CONF_PROB, "margin": CONF_MARGIN, "neg_entropy": CONF_NEG_ENTROPY, "random": CONF_RANDOM}


def _identity(kernel):
    return kernel


def _tile_block(vocab: int) -> int:
    return NOISE_TILE if vocab > NOISE_TILE else max(16, triton.next_power_of_2(vocab))


def _search_block(vocab: int) -> int:
    return min(SEARCH_BLOCK, max(16, triton.next_power_of_2(vocab)))


def _filter_block(vocab: int) -> int:
    return min(FILTER_BLOCK, max(CANDIDATES, triton.next_power_of_2(vocab)))


def _seed_args(seed, seed_value):
    """(per-row seed tensor or None, its row stride, the scalar seed)."""
    if seed is None:
        return None, 0, seed_value
    return seed, (0 if seed.numel() == 1 else 1), seed_value


def _bundle_floats(rows, device, *params):
    """The per-row float parameters as one [R, len(params)] fp32 tensor, or None when all of
    them are scalars (the kernels then take the scalars)."""
    if all(tensor is None for tensor, _ in params):
        return None
    cols = [tensor if tensor is not None else torch.full((rows,), value, dtype=torch.float32, device=device)
            for tensor, value in params]
    return torch.stack(cols, 1).contiguous()


_PASS_PROGRAMS_PER_SM = 32  # one-warp programs resident per SM: sm_90's limit of CTAs per SM
_FILTER_PROGRAMS_PER_SM = 8  # one-warp programs per SM of the filtered passes (eight loads in flight each)
_ROW_PROGRAMS_PER_SM = 2  # per-row programs (finalize, bound, finish) per SM when rows are compacted


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter runs one program at a time; any value gives the same results


def _split_parts(count: int, num_blocks: int, target_items: int) -> int:
    """Runs per row of a split pass (the formula _split_row evaluates on the device)."""
    parts = min(max(-(-target_items // max(count, 1)), 1), num_blocks)
    per_part = -(-num_blocks // parts)
    return -(-num_blocks // per_part)


def _select_rows(logits2d, mask, gate, seed_t, seed_stride, seed_value, offset, tokens, conf, argmax, fallback, wrap):
    """Compact the rows to compute (``mask`` and the posterior coin) on the device: returns the
    int32 row list and its device count, or (None, None) when every row is computed. The other
    rows get their outputs (-1, -inf, -1; fallback flag 0) here."""
    if mask is None and gate is None:
        return None, None
    rows = logits2d.shape[0]
    rows_sel = torch.empty(rows, dtype=torch.int32, device=logits2d.device)
    count_t = torch.zeros(1, dtype=torch.int32, device=logits2d.device)
    wrap(_select_rows_kernel)[(triton.cdiv(rows, 1024),)](
        mask, gate, seed_t, seed_stride, seed_value, offset, rows, rows_sel, count_t, tokens, conf, argmax, fallback,
        BLOCK=1024, num_warps=4)
    return rows_sel, count_t


def _rows_fwd(logits2d, mask, gate, suppress, conf_suppress, query, temperature, temperature_value, seed, seed_value,
              offset, *, confidence, conf_raw, return_argmax, target_items=None, wrap=_identity):
    """Unfiltered rows: [row selection], the streaming tile pass, the finalize.

    Returns ``(tokens, conf[, argmax])`` as predict_tokens_fwd does.
    """
    rows, vocab = logits2d.shape
    device = logits2d.device
    tokens = torch.empty(rows, dtype=torch.int64, device=device)
    conf = torch.empty(rows, dtype=torch.float32, device=device)
    argmax = torch.empty(rows, dtype=torch.int64, device=device) if return_argmax else None
    outputs = (tokens, conf, argmax) if return_argmax else (tokens, conf)
    if rows == 0:
        return outputs
    sms = _num_sms(device)
    num_tiles = triton.cdiv(vocab, NOISE_TILE)
    num_full = vocab // NOISE_TILE
    seed_t, seed_stride, seed_value = _seed_args(seed, seed_value)
    # The raw distribution is the sampling one when every row runs at temperature 0 or 1.
    conf_raw = conf_raw and (temperature is not None or temperature_value not in (0.0, 1.0))
    flags = dict(WANT_M2=confidence == "margin", WANT_T1=confidence == "neg_entropy", WANT_RAW=conf_raw)

    rows_sel, count_t = _select_rows(logits2d, mask, gate, seed_t, seed_stride, seed_value, offset, tokens, conf,
                                     argmax, None, wrap)
    stats = torch.empty((NUM_STATS, rows, max(num_tiles, 1)), dtype=torch.float32, device=device)
    target = target_items or _PASS_PROGRAMS_PER_SM * sms
    if num_full:
        if count_t is None:
            grid = rows * _split_parts(rows, num_full, target)
        else:
            grid = min(target, rows * num_full)
        wrap(_tile_pass_kernel)[(grid,)](
            logits2d, logits2d.stride(0), num_full, num_tiles, rows_sel, count_t, rows, target,
            temperature, temperature_value, stats, stats.stride(0), **flags,
            CHUNKS=TILE_CHUNKS, NOISE_TILE=NOISE_TILE, num_warps=1)
    tile_block = _tile_block(vocab)
    chunks = TILE_CHUNKS if tile_block == NOISE_TILE else 1
    grid = rows if count_t is None else min(rows, _ROW_PROGRAMS_PER_SM * sms)
    wrap(_finalize_kernel)[(grid,)](
        logits2d, logits2d.stride(0), vocab, num_full, num_tiles, rows_sel, count_t, rows,
        suppress, conf_suppress, query, temperature, temperature_value, seed_t, seed_stride, seed_value, offset,
        stats, stats.stride(0), tokens, conf, argmax,
        NUM_SUPPRESS=0 if suppress is None else suppress.numel(),
        NUM_CONF_SUPPRESS=0 if conf_suppress is None else conf_suppress.numel(),
        CONFIDENCE=CONFIDENCE_KINDS[confidence], CONF_RAW=conf_raw, **flags,
        TILES_BLOCK=max(16, min(1024, triton.next_power_of_2(num_tiles))), CHUNKS=chunks, LANES=tile_block // chunks,
        NOISE_TILE=NOISE_TILE, num_warps=4)
    return outputs


def _candidate_passes(logits2d, rows_sel, count_t, suppress, conf_suppress, fparams, scalars, top_k, top_k_value, *,
                      raw_stats, target_items, wrap):
    """Pass 1, the bounds and pass 2 of the candidate path over the active rows.

    ``scalars``: (temperature, top_p, min_p) used where ``fparams`` is None. ``raw_stats``:
    None, or (WANT_T1, WANT_M2) to gather the raw-logit confidence statistics (the
    ``conf_suppress`` ids left out). Returns a dict of the buffers and launch geometry the
    later kernels take.
    """
    rows, vocab = logits2d.shape
    device = logits2d.device
    sms = _num_sms(device)
    block = _filter_block(vocab)
    num_blocks = triton.cdiv(vocab, block)
    target = target_items or _FILTER_PROGRAMS_PER_SM * sms
    if count_t is None:
        items = rows * _split_parts(rows, num_blocks, target)
        pass_grid, row_grid = items, rows
    else:
        # count * runs(count) <= target + count - 1 for every count <= rows.
        items = min(target + rows, rows * num_blocks)
        pass_grid, row_grid = min(target, rows * num_blocks), min(rows, _ROW_PROGRAMS_PER_SM * sms)
    n_supp = 0 if suppress is None else suppress.numel()
    n_csupp = 0 if conf_suppress is None or raw_stats is None else conf_suppress.numel()
    csupp = conf_suppress if n_csupp else None
    lm = torch.empty((items, CANDIDATES), dtype=torch.float32, device=device)
    state = torch.empty((rows, NUM_STATE.value), dtype=torch.float32, device=device)
    counts = torch.empty(rows, dtype=torch.int32, device=device)
    cands = torch.empty((rows, CANDIDATES), dtype=torch.int32, device=device)
    raw = torch.empty((items, NUM_RAW.value), dtype=torch.float32, device=device) if raw_stats else None
    split = (logits2d, logits2d.stride(0), vocab, num_blocks, rows_sel, count_t, rows, target)
    wrap(_lane_max_kernel)[(pass_grid,)](
        *split, suppress, csupp, lm, NUM_SUPPRESS=n_supp, NUM_CONF_SUPPRESS=n_csupp, BLOCK=block,
        LANES=CANDIDATES, num_warps=4)
    wrap(_bound_kernel)[(row_grid,)](
        *split, suppress, csupp, lm, fparams, *scalars, top_k, top_k_value, state, counts,
        NUM_SUPPRESS=n_supp, NUM_CONF_SUPPRESS=n_csupp, KEY_SHIFT=KEY_SHIFT[logits2d.dtype], NUM_PIVOTS=NUM_PIVOTS,
        LANES=CANDIDATES, num_warps=4)
    want_t1, want_m2 = raw_stats or (False, False)
    wrap(_collect_kernel)[(pass_grid,)](
        *split, suppress, csupp, state, counts, cands, raw, NUM_SUPPRESS=n_supp, NUM_CONF_SUPPRESS=n_csupp,
        WANT_T1=want_t1, WANT_M2=want_m2, BLOCK=block, SUB=min(block, COLLECT_BLOCK), CAP=CANDIDATES, num_warps=1)
    return dict(split=split, pass_grid=pass_grid, row_grid=row_grid, block=block, num_blocks=num_blocks,
                target=target, state=state, counts=counts, cands=cands, raw=raw)


def predict_tokens_fwd(logits2d, mask, suppress, temperature, temperature_value, top_k, top_k_value, top_p, top_p_value,
                       min_p, min_p_value, seed, seed_value, offset, *, confidence: str, conf_raw: bool, filtered: bool,
                       top_p_mode: str = "inclusive", conf_suppress=None, return_argmax: bool = False,
                       gate=None, query=None, target_items=None, wrap=_identity):
    """Launch the row kernels: tokens (int64 [R]), confidences (fp32 [R]) and, with
    ``return_argmax``, the first argmax of the suppressed logits (int64 [R]).

    ``mask``: bool [R] or None; ``suppress`` / ``conf_suppress``: int64 ids or None;
    ``gate``: fp32 [R] posterior probabilities or None; ``query``: int64 [R] tokens whose
    probability to report, or None (unfiltered rows only). Per-row parameters are [R] tensors
    or None with the scalar in ``*_value``; ``seed`` an int64 tensor of R or 1 values.
    ``target_items`` overrides how many work items the split passes aim for (tests use it to
    split rows differently; the results do not depend on it).
    """
    if not filtered:
        return _rows_fwd(logits2d, mask, gate, suppress, conf_suppress, query, temperature, temperature_value, seed,
                         seed_value, offset, confidence=confidence, conf_raw=conf_raw, return_argmax=return_argmax,
                         target_items=target_items, wrap=wrap)
    if query is not None:
        raise ValueError("predict_tokens_fwd: `query` is supported on unfiltered rows only")
    rows, vocab = logits2d.shape
    device = logits2d.device
    tokens = torch.empty(rows, dtype=torch.int64, device=device)
    conf = torch.empty(rows, dtype=torch.float32, device=device)
    argmax = torch.empty(rows, dtype=torch.int64, device=device) if return_argmax else None
    outputs = (tokens, conf, argmax) if return_argmax else (tokens, conf)
    if rows == 0:
        return outputs
    seed_t, seed_stride, seed_value = _seed_args(seed, seed_value)
    fallback = torch.empty(rows, dtype=torch.int8, device=device)
    rows_sel, count_t = _select_rows(logits2d, mask, gate, seed_t, seed_stride, seed_value, offset, tokens, conf,
                                     argmax, fallback, wrap)
    fparams = _bundle_floats(rows, device, (temperature, temperature_value), (top_p, top_p_value),
                             (min_p, min_p_value))
    scalars = (temperature_value, top_p_value, min_p_value)
    raw_stats = None
    if conf_raw and confidence != "random":
        raw_stats = (confidence == "neg_entropy", confidence == "margin")
    p = _candidate_passes(logits2d, rows_sel, count_t, suppress, conf_suppress, fparams, scalars, top_k, top_k_value,
                          raw_stats=raw_stats, target_items=target_items, wrap=wrap)
    n_csupp = 0 if conf_suppress is None else conf_suppress.numel()
    common = dict(TOP_P_BD3LM=top_p_mode == "bd3lm", CONFIDENCE=CONFIDENCE_KINDS[confidence], CONF_RAW=conf_raw,
                  KEY_SHIFT=KEY_SHIFT[logits2d.dtype], NUM_PIVOTS=NUM_PIVOTS)
    wrap(_finish_kernel)[(p["row_grid"],)](
        *p["split"], conf_suppress, fparams, *scalars, top_k, top_k_value, seed_t, seed_stride, seed_value, offset,
        p["state"], p["counts"], p["cands"], p["raw"], tokens, conf, argmax, fallback,
        NUM_CONF_SUPPRESS=n_csupp, **common, CAP=CANDIDATES, NOISE_TILE=NOISE_TILE, num_warps=4)
    # The rows the candidate list could not serve; every other program exits at once.
    wrap(_row_kernel)[(rows,)](
        logits2d, logits2d.stride(0), vocab, triton.cdiv(vocab, NOISE_TILE), fallback, suppress, conf_suppress,
        fparams, *scalars, top_k, top_k_value, seed_t, seed_stride, seed_value, offset, tokens, conf, argmax,
        NUM_SUPPRESS=0 if suppress is None else suppress.numel(), NUM_CONF_SUPPRESS=n_csupp, **common,
        SEARCH_BLOCK=_search_block(vocab), NOISE_TILE=NOISE_TILE, TILE_BLOCK=_tile_block(vocab), num_warps=8)
    return outputs


def sample_fwd(logits2d, temperature, temperature_value, top_k, top_k_value, top_p, top_p_value,
               min_p, min_p_value, seed, seed_value, offset, *, filtered: bool, top_p_mode: str = "inclusive",
               target_items=None, wrap=_identity):
    """Launch the sampling kernels on a [R, V] view with unit column stride.

    Returns ``(tokens int64 [R], probs fp32 [R])``; invalid rows (NaN / +inf / all -inf) get
    token -1. ``target_items`` overrides how many work items the split passes aim for (tests
    use it to split rows differently; the results do not depend on it).
    """
    if filtered:
        return predict_tokens_fwd(logits2d, None, None, temperature, temperature_value, top_k, top_k_value, top_p,
                                  top_p_value, min_p, min_p_value, seed, seed_value, offset, confidence="prob",
                                  conf_raw=False, filtered=True, top_p_mode=top_p_mode, target_items=target_items,
                                  wrap=wrap)
    return _rows_fwd(logits2d, None, None, None, None, None, temperature, temperature_value, seed, seed_value, offset,
                     confidence="prob", conf_raw=False, return_argmax=False, target_items=target_items, wrap=wrap)


def filter_logits_fwd(logits2d, top_k, top_k_value, top_p, top_p_value, min_p, min_p_value, *,
                      top_p_mode: str = "inclusive", target_items=None, wrap=_identity):
    """Launch filter_logits on a [R, V] view; returns (filtered [R, V], invalid-row flags int8 [R])."""
    rows, vocab = logits2d.shape
    device = logits2d.device
    out = torch.empty((rows, vocab), dtype=logits2d.dtype, device=device)
    bad = torch.empty(rows, dtype=torch.int8, device=device)
    if rows == 0:
        return out, bad
    fparams = _bundle_floats(rows, device, (None, 1.0), (top_p, top_p_value), (min_p, min_p_value))
    p = _candidate_passes(logits2d, None, None, None, None, fparams, (1.0, top_p_value, min_p_value), top_k,
                          top_k_value, raw_stats=None, target_items=target_items, wrap=wrap)
    common = dict(TOP_P_BD3LM=top_p_mode == "bd3lm", KEY_SHIFT=KEY_SHIFT[logits2d.dtype], NUM_PIVOTS=NUM_PIVOTS)
    fallback = torch.empty(rows, dtype=torch.int8, device=device)
    wrap(_filter_bounds_kernel)[(rows,)](
        logits2d, logits2d.stride(0), vocab, rows, fparams, top_p_value, min_p_value, top_k, top_k_value,
        p["state"], p["counts"], p["cands"], bad, fallback, **common, CAP=CANDIDATES, num_warps=4)
    wrap(_masked_copy_kernel)[(p["pass_grid"],)](
        logits2d, logits2d.stride(0), out, out.stride(0), vocab, p["num_blocks"], rows, p["target"], fparams,
        min_p_value, p["state"], BLOCK=p["block"], num_warps=4)
    wrap(_filter_logits_kernel)[(rows,)](
        logits2d, logits2d.stride(0), out, out.stride(0), bad, fallback, vocab, fparams, top_p_value, min_p_value,
        top_k, top_k_value, **common, SEARCH_BLOCK=_search_block(vocab), num_warps=8)
    return out, bad
