"""Fused categorical sampling and top-k / top-p / min-p filtering.

Semantics: ``ddiff.reference.sampling`` (the torch reference). Layout of the work:

* Unfiltered ``sample``: one pass over the row. Each noise tile contributes its log-sum-exp
  plus one Gumbel draw to a tile race, and to the row's online max / normaliser / argmax. A
  row may be split over several programs (small batches); a finalize kernel merges the
  partial states, re-reads the winning tile and runs the per-column race inside it. So a row
  costs ``V / NOISE_TILE + NOISE_TILE`` Philox calls instead of ``V``.
* Filtering: no sort. The kept set is always ``{key(l) >= threshold}`` (plus the min-p
  test), where ``key`` is the order-preserving integer image of the logit. The threshold is
  found by a multi-pivot search: every pass over the row counts (top-k) or weighs (top-p)
  the tokens above ``NUM_PIVOTS`` pivots at once and narrows the key interval ~17-fold, so
  bf16 / fp16 rows need at most 4 / 5 passes and fp32 rows 8. The search runs on the key of
  the input dtype (``KEY_SHIFT`` drops the mantissa bits that dtype cannot have), and its
  result is exact: the ``k``-th largest logit, ties kept.
* Filtered ``sample`` fuses filter and race: it never writes a filtered tensor.

All offsets into the logits are int64 (``row * stride`` passes 2^31 at large B x V).
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
def _load_param(ptr, row, value, HAS_TENSOR: tl.constexpr):
    """Row ``row`` of a per-row parameter tensor, or the scalar shared by every row."""
    if HAS_TENSOR:
        return tl.load(ptr + row)
    else:
        # Adding a typed zero turns a Python scalar (interpreter) and a scalar argument
        # (compiled) alike into a typed scalar.
        return value + tl.zeros([], ptr.dtype.element_ty)


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
    new_t1 = c_run * (t1 + d_run * s) + c_tile * (tile_t1 + d_tile * tile_s)
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


@triton.jit
def _sample_partial_kernel(
    logits_ptr, stride_row, V, num_tiles, tiles_per_part,
    temp_ptr, temp_value, seed_ptr, seed_stride, seed_value, offset,
    part_max_ptr, part_sum_ptr, part_score_ptr, part_tile_ptr, part_arg_ptr, part_flags_ptr,
    HAS_TEMP: tl.constexpr, HAS_SEED: tl.constexpr, NOISE_TILE: tl.constexpr, TILE_BLOCK: tl.constexpr,
):
    """Unfiltered sampling, phase 1: one (row, part) program over a run of noise tiles."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    num_parts = tl.num_programs(1)
    row_ptr = logits_ptr + row * stride_row
    temp = _load_param(temp_ptr, row, temp_value, HAS_TEMP).to(tl.float32)
    temp = tl.where(temp == 0.0, 1.0, temp)
    k0, k1 = rng_key(_load_param(seed_ptr, row * seed_stride, seed_value, HAS_SEED))
    c2, c3 = rng_counter_hi(offset, STREAM_TILE)

    tile_begin = part * tiles_per_part
    tile_end = tl.minimum(tile_begin + tiles_per_part, num_tiles)
    cols0 = tl.arange(0, TILE_BLOCK)
    run_max = tl.full([], _NEG_INF, tl.float32)
    run_sum = tl.full([], 0.0, tl.float32)
    best_score = tl.full([], _NEG_INF, tl.float32)
    best_tile = tile_begin + tl.zeros([], tl.int32)
    arg = tl.full([], 0, tl.int64)
    bad = tl.full([], 0, tl.int32)
    for tile in range(tile_begin, tile_end):
        cols = tile * NOISE_TILE + cols0
        x = tl.load(row_ptr + cols, mask=cols < V, other=_NEG_INF).to(tl.float32)
        z = x / temp
        bad = bad | tl.max(((z != z) | (z == float("inf"))).to(tl.int32), 0)
        tile_max = tl.max(z, 0)
        has_mass = tile_max > _NEG_INF
        safe_max = tl.where(has_mass, tile_max, 0.0)
        tile_sum = tl.sum(tl.exp(z - safe_max), 0)
        tile_lse = tl.where(has_mass, safe_max + tl.log(tl.where(has_mass, tile_sum, 1.0)), _NEG_INF)
        score = tile_lse + philox_gumbel(k0, k1, c2, c3, row, tile)
        better = score > best_score
        best_tile = tl.where(better, tile, best_tile)
        best_score = tl.where(better, score, best_score)
        tile_arg = tl.argmax(z, 0).to(tl.int64) + tile * NOISE_TILE
        arg = tl.where(tile_max > run_max, tile_arg, arg)
        run_max, run_sum, _, _ = _merge_stats(run_max, run_sum, 0.0, _NEG_INF, tile_max, tile_sum, 0.0, _NEG_INF)
    slot = row * num_parts + part
    tl.store(part_max_ptr + slot, run_max)
    tl.store(part_sum_ptr + slot, run_sum)
    tl.store(part_score_ptr + slot, best_score)
    tl.store(part_tile_ptr + slot, best_tile)
    tl.store(part_arg_ptr + slot, arg)
    tl.store(part_flags_ptr + slot, bad)


@triton.jit
def _sample_finalize_kernel(
    logits_ptr, stride_row, V, num_parts,
    temp_ptr, temp_value, seed_ptr, seed_stride, seed_value, offset,
    part_max_ptr, part_sum_ptr, part_score_ptr, part_tile_ptr, part_arg_ptr, part_flags_ptr,
    tokens_ptr, probs_ptr,
    HAS_TEMP: tl.constexpr, HAS_SEED: tl.constexpr, NOISE_TILE: tl.constexpr, TILE_BLOCK: tl.constexpr,
    PARTS_BLOCK: tl.constexpr,
):
    """Unfiltered sampling, phase 2: merge the parts, race inside the winning tile."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    raw_temp = _load_param(temp_ptr, row, temp_value, HAS_TEMP).to(tl.float32)
    greedy = raw_temp == 0.0
    temp = tl.where(greedy, 1.0, raw_temp)

    parts = tl.arange(0, PARTS_BLOCK)
    live = parts < num_parts
    slot = row * num_parts + parts
    p_max = tl.load(part_max_ptr + slot, mask=live, other=_NEG_INF)
    p_sum = tl.load(part_sum_ptr + slot, mask=live, other=0.0)
    p_score = tl.load(part_score_ptr + slot, mask=live, other=_NEG_INF)
    p_tile = tl.load(part_tile_ptr + slot, mask=live, other=0)
    p_arg = tl.load(part_arg_ptr + slot, mask=live, other=0)
    p_bad = tl.load(part_flags_ptr + slot, mask=live, other=0)

    z_max = tl.max(p_max, 0)
    safe_max = tl.where(z_max > _NEG_INF, z_max, 0.0)
    norm = tl.sum(tl.where(p_max > _NEG_INF, p_sum * tl.exp(p_max - safe_max), 0.0), 0)
    first_max_part = tl.min(tl.where(p_max == z_max, parts, PARTS_BLOCK), 0)
    arg = tl.sum(tl.where(parts == first_max_part, p_arg, 0), 0)
    win_part = tl.argmax(p_score, 0)
    tile = tl.sum(tl.where(parts == win_part, p_tile, 0), 0)
    bad = (tl.max(p_bad, 0) != 0) | (z_max == _NEG_INF)

    k0, k1 = rng_key(_load_param(seed_ptr, row * seed_stride, seed_value, HAS_SEED))
    c2, c3 = rng_counter_hi(offset, STREAM_TOKEN)
    no_floor = tl.full([], -(2**40), tl.int64)
    raced = _race_in_tile(row_ptr, V, logits_ptr, tile, temp, no_floor, 0.0, safe_max, k0, k1, c2, c3, row,
                          0, 0, NOISE_TILE, TILE_BLOCK)
    token = tl.where(greedy, arg, raced)
    token = tl.minimum(tl.maximum(token, 0), V - 1)
    z_tok = tl.load(row_ptr + token).to(tl.float32) / temp
    prob = tl.exp(z_tok - safe_max) / norm
    tl.store(tokens_ptr + row, tl.where(bad, -1, token))
    tl.store(probs_ptr + row, tl.where(bad, float("nan"), prob))


# Confidence kinds of the row kernel (CONFIDENCE constexpr).
CONF_PROB = 0
CONF_MARGIN = 1
CONF_NEG_ENTROPY = 2
CONF_RANDOM = 3


@triton.jit
def _row_kernel(
    logits_ptr, stride_row, V, num_tiles, mask_ptr, supp_ptr, csupp_ptr, gate_ptr, query_ptr,
    temp_ptr, temp_value, top_k_ptr, top_k_value, top_p_ptr, top_p_value, min_p_ptr, min_p_value,
    seed_ptr, seed_stride, seed_value, offset,
    tokens_ptr, conf_ptr, argmax_ptr,
    HAS_MASK: tl.constexpr, NUM_SUPPRESS: tl.constexpr, NUM_CONF_SUPPRESS: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_QUERY: tl.constexpr, HAS_TEMP: tl.constexpr, HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr,
    HAS_MIN_P: tl.constexpr, HAS_SEED: tl.constexpr, FILTERED: tl.constexpr, TOP_P_BD3LM: tl.constexpr,
    CONFIDENCE: tl.constexpr, CONF_RAW: tl.constexpr, RETURN_ARGMAX: tl.constexpr,
    KEY_SHIFT: tl.constexpr, NUM_PIVOTS: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
    NOISE_TILE: tl.constexpr, TILE_BLOCK: tl.constexpr,
):
    """One program per row: [stats + threshold search], one fused pass, the token race.

    The fused pass runs the tile race on the sampling distribution and gathers the softmax
    statistics the confidence needs, of the sampling distribution (``CONF_RAW`` False) or of
    the raw logits at temperature 1 (``CONF_RAW`` True), in both cases without the
    ``NUM_CONF_SUPPRESS`` ids of ``csupp_ptr``. Rows with ``mask`` False exit at once with
    token -1 and confidence -inf; so do rows whose posterior coin (``HAS_GATE``: a uniform of
    STREAM_POSTERIOR against the row's gate probability) says they stay. Invalid rows get
    token -1 and confidence NaN. With ``HAS_QUERY`` the ``"prob"`` confidence is that of the
    query token instead of the drawn one. ``RETURN_ARGMAX`` also stores the first argmax of
    the suppressed logits (-1 for inactive rows).
    """
    row = tl.program_id(0).to(tl.int64)
    active = True
    if HAS_MASK:
        active = tl.load(mask_ptr + row) != 0
    if HAS_GATE:
        k0g, k1g = rng_key(_load_param(seed_ptr, row * seed_stride, seed_value, HAS_SEED))
        c2g, c3g = rng_counter_hi(offset, STREAM_POSTERIOR)
        active = active & (philox_uniform(k0g, k1g, c2g, c3g, row, 0) < tl.load(gate_ptr + row))
    if active:
        row_ptr = logits_ptr + row * stride_row
        raw_temp = _load_param(temp_ptr, row, temp_value, HAS_TEMP).to(tl.float32)
        greedy = raw_temp == 0.0
        temp = tl.where(greedy, 1.0, raw_temp)
        top_k = _load_param(top_k_ptr, row, top_k_value, HAS_TOP_K).to(tl.int64)
        top_p = _load_param(top_p_ptr, row, top_p_value, HAS_TOP_P).to(tl.float32)
        min_p = _load_param(min_p_ptr, row, min_p_value, HAS_MIN_P).to(tl.float32)
        seed = _load_param(seed_ptr, row * seed_stride, seed_value, HAS_SEED)

        key_floor = tl.full([], -(2**40), tl.int64)
        ref_max = tl.full([], 0.0, tl.float32)
        bad = tl.full([], 0, tl.int32)
        if FILTERED:
            z_max, _first_max, key_min, key_max, bad = _row_stats(row_ptr, V, temp, supp_ptr, NUM_SUPPRESS, KEY_SHIFT,
                                                         SEARCH_BLOCK)
            ref_max = tl.where(z_max > _NEG_INF, z_max, 0.0)
            if bad == 0:
                key_floor = _filter_threshold(row_ptr, V, supp_ptr, temp, ref_max, key_min, key_max, top_k, top_p,
                                              NUM_SUPPRESS, KEY_SHIFT, NUM_PIVOTS, SEARCH_BLOCK, TOP_P_BD3LM)
        else:
            min_p = 0.0

        # The confidence needs statistics of its own when it is measured on another
        # distribution than the race (raw logits) or without some ids.
        OWN_CONF_STATS: tl.constexpr = CONF_RAW or NUM_CONF_SUPPRESS > 0
        k0, k1 = rng_key(seed)
        c2, c3 = rng_counter_hi(offset, STREAM_TILE)
        cols0 = tl.arange(0, TILE_BLOCK)
        s_max = tl.full([], _NEG_INF, tl.float32)
        s_sum = tl.full([], 0.0, tl.float32)
        s_t1 = tl.full([], 0.0, tl.float32)
        s_m2 = tl.full([], _NEG_INF, tl.float32)
        r_max = tl.full([], _NEG_INF, tl.float32)
        r_sum = tl.full([], 0.0, tl.float32)
        r_t1 = tl.full([], 0.0, tl.float32)
        r_m2 = tl.full([], _NEG_INF, tl.float32)
        arg = tl.full([], 0, tl.int64)
        x_max = tl.full([], _NEG_INF, tl.float32)
        x_arg = tl.full([], 0, tl.int64)
        best_score = tl.full([], _NEG_INF, tl.float32)
        best_tile = tl.full([], 0, tl.int32)
        for tile in range(0, num_tiles):
            cols = tile * NOISE_TILE + cols0
            x, inb = _load_tile(row_ptr, cols, V, supp_ptr, NUM_SUPPRESS)
            z = x / temp
            bad = bad | tl.max(((z != z) | (z == float("inf"))).to(tl.int32), 0)
            if FILTERED:
                kept = inb & (_order_key(x, KEY_SHIFT) >= key_floor) & (tl.exp(z - ref_max) >= min_p)
            else:  # no key or exp per element on the unfiltered hot path
                kept = inb
            t_max, t_sum, t_t1, t_m2, t_arg = _tile_stats(z, kept)
            has_mass = t_max > _NEG_INF
            t_lse = tl.where(has_mass, t_max + tl.log(tl.where(has_mass, t_sum, 1.0)), _NEG_INF)
            score = t_lse + philox_gumbel(k0, k1, c2, c3, row, tile)
            better = score > best_score
            best_tile = tl.where(better, tile, best_tile)
            best_score = tl.where(better, score, best_score)
            arg = tl.where(t_max > s_max, t_arg.to(tl.int64) + tile * NOISE_TILE, arg)
            s_max, s_sum, s_t1, s_m2 = _merge_stats(s_max, s_sum, s_t1, s_m2, t_max, t_sum, t_t1, t_m2)
            if RETURN_ARGMAX:
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
        bad = bad | (s_max == _NEG_INF).to(tl.int32)

        c2, c3 = rng_counter_hi(offset, STREAM_TOKEN)
        safe_s = tl.where(s_max > _NEG_INF, s_max, 0.0)
        raced = _race_in_tile(row_ptr, V, supp_ptr, best_tile, temp, key_floor, min_p, ref_max, k0, k1, c2, c3,
                              row, NUM_SUPPRESS, KEY_SHIFT, NOISE_TILE, TILE_BLOCK)
        token = tl.where(greedy, arg, raced)
        token = tl.minimum(tl.maximum(token, 0), V - 1)

        if OWN_CONF_STATS:
            c_max, c_sum, c_t1, c_m2 = tl.where(r_max > _NEG_INF, r_max, 0.0), r_sum, r_t1, r_m2
        else:
            c_max, c_sum, c_t1, c_m2 = safe_s, s_sum, s_t1, s_m2
        if CONF_RAW:
            c_temp = 1.0
        else:
            c_temp = temp
        # An empty confidence distribution (every id it could measure suppressed) gives the
        # least value of the kind: 0 for prob and margin, -inf for the negative entropy.
        c_empty = c_sum == 0.0
        c_norm = tl.where(c_empty, 1.0, c_sum)
        if CONFIDENCE == 0:
            if HAS_QUERY:
                query = tl.minimum(tl.maximum(tl.load(query_ptr + row), 0), V - 1)  # never read out of bounds
                z_tok = tl.load(row_ptr + query).to(tl.float32) / c_temp
            else:
                z_tok = tl.load(row_ptr + token).to(tl.float32) / c_temp
            conf = tl.exp(z_tok - c_max) / c_norm
            for i in tl.static_range(NUM_CONF_SUPPRESS):
                conf = tl.where(token == tl.load(csupp_ptr + i), 0.0, conf)
            conf = tl.where(c_empty, 0.0, conf)
        elif CONFIDENCE == 1:
            conf = tl.where(c_empty, 0.0, (1.0 - tl.exp(c_m2 - c_max)) / c_norm)
        elif CONFIDENCE == 2:
            conf = tl.where(c_empty, _NEG_INF, c_t1 / c_norm - tl.log(c_norm))
        else:
            c2r, c3r = rng_counter_hi(offset, STREAM_CONFIDENCE)
            conf = philox_uniform(k0, k1, c2r, c3r, row, 0)
        tl.store(tokens_ptr + row, tl.where(bad != 0, -1, token))
        tl.store(conf_ptr + row, tl.where(bad != 0, float("nan"), conf))
        if RETURN_ARGMAX:
            tl.store(argmax_ptr + row, tl.where(bad != 0, -1, tl.minimum(x_arg, V - 1)))
    else:
        tl.store(tokens_ptr + row, -1)
        tl.store(conf_ptr + row, _NEG_INF)
        if RETURN_ARGMAX:
            tl.store(argmax_ptr + row, -1)


@triton.jit
def _filter_logits_kernel(
    logits_ptr, stride_row, out_ptr, out_stride_row, bad_ptr, V,
    top_k_ptr, top_k_value, top_p_ptr, top_p_value, min_p_ptr, min_p_value,
    HAS_TOP_K: tl.constexpr, HAS_TOP_P: tl.constexpr, HAS_MIN_P: tl.constexpr, TOP_P_BD3LM: tl.constexpr,
    KEY_SHIFT: tl.constexpr, NUM_PIVOTS: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
):
    """filter_logits, one program per row: stats, threshold search, masked copy."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    out_row_ptr = out_ptr + row * out_stride_row
    top_k = _load_param(top_k_ptr, row, top_k_value, HAS_TOP_K).to(tl.int64)
    top_p = _load_param(top_p_ptr, row, top_p_value, HAS_TOP_P).to(tl.float32)
    min_p = _load_param(min_p_ptr, row, min_p_value, HAS_MIN_P).to(tl.float32)
    one = tl.full([], 1.0, tl.float32)

    z_max, _, key_min, key_max, bad = _row_stats(row_ptr, V, one, row_ptr, 0, KEY_SHIFT, SEARCH_BLOCK)
    safe_max = tl.where(z_max > _NEG_INF, z_max, 0.0)
    key_floor = key_min
    if bad == 0:
        key_floor = _filter_threshold(row_ptr, V, row_ptr, one, safe_max, key_min, key_max, top_k, top_p,
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
# Host launchers. ``wrap`` is torch.library.wrap_triton when the caller is a triton_op, so
# torch.compile can trace the launches; the identity otherwise.
# --------------------------------------------------------------------------------------------

import torch  # noqa: E402

KEY_SHIFT = {torch.float32: 0, torch.float16: 13, torch.bfloat16: 16}
CONFIDENCE_KINDS = {"prob": CONF_PROB, "margin": CONF_MARGIN, "neg_entropy": CONF_NEG_ENTROPY, "random": CONF_RANDOM}
_TARGET_PROGRAMS_PER_SM = 2


def _identity(kernel):
    return kernel


def _tile_block(vocab: int) -> int:
    return NOISE_TILE if vocab > NOISE_TILE else max(16, triton.next_power_of_2(vocab))


def _search_block(vocab: int) -> int:
    return min(SEARCH_BLOCK, max(16, triton.next_power_of_2(vocab)))


def _num_parts(rows: int, num_tiles: int, device: torch.device) -> int:
    """Programs per row for the unfiltered path: enough to fill the GPU at small batch."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = _TARGET_PROGRAMS_PER_SM * sms
    if rows >= want:
        return 1
    return max(1, min(num_tiles, -(-want // rows)))


class _Dummies:
    def __init__(self, device):
        self.f = torch.empty(1, dtype=torch.float32, device=device)
        self.i = torch.empty(1, dtype=torch.int64, device=device)


def _seed_args(seed, seed_value, dummy):
    if seed is None:
        return dummy, 0, seed_value
    return seed, (0 if seed.numel() == 1 else 1), seed_value


def predict_tokens_fwd(logits2d, mask, suppress, temperature, temperature_value, top_k, top_k_value, top_p, top_p_value,
                       min_p, min_p_value, seed, seed_value, offset, *, confidence: str, conf_raw: bool, filtered: bool,
                       top_p_mode: str = "inclusive", conf_suppress=None, return_argmax: bool = False,
                       gate=None, query=None, wrap=_identity):
    """Launch the row kernel: tokens (int64 [R]), confidences (fp32 [R]) and, with
    ``return_argmax``, the first argmax of the suppressed logits (int64 [R]).

    ``mask``: bool [R] or None; ``suppress`` / ``conf_suppress``: int64 ids or None;
    ``gate``: fp32 [R] posterior probabilities or None; ``query``: int64 [R] tokens whose
    probability to report, or None. Per-row parameters are [R] tensors or None with the scalar
    in ``*_value``; ``seed`` an int64 tensor of R or 1 values.
    """
    rows, vocab = logits2d.shape
    device = logits2d.device
    tokens = torch.empty(rows, dtype=torch.int64, device=device)
    conf = torch.empty(rows, dtype=torch.float32, device=device)
    argmax = torch.empty(rows if return_argmax else 0, dtype=torch.int64, device=device)
    outputs = (tokens, conf, argmax) if return_argmax else (tokens, conf)
    if rows == 0:
        return outputs
    d = _Dummies(device)
    wrap(_row_kernel)[(rows,)](
        logits2d, logits2d.stride(0), vocab, triton.cdiv(vocab, NOISE_TILE),
        mask if mask is not None else d.i, suppress if suppress is not None else d.i,
        conf_suppress if conf_suppress is not None else d.i,
        gate if gate is not None else d.f, query if query is not None else d.i,
        temperature if temperature is not None else d.f, temperature_value,
        top_k if top_k is not None else d.i, top_k_value,
        top_p if top_p is not None else d.f, top_p_value,
        min_p if min_p is not None else d.f, min_p_value,
        *_seed_args(seed, seed_value, d.i), offset, tokens, conf, argmax if return_argmax else d.i,
        HAS_MASK=mask is not None, NUM_SUPPRESS=0 if suppress is None else suppress.numel(),
        NUM_CONF_SUPPRESS=0 if conf_suppress is None else conf_suppress.numel(),
        HAS_GATE=gate is not None, HAS_QUERY=query is not None,
        HAS_TEMP=temperature is not None, HAS_TOP_K=top_k is not None,
        HAS_TOP_P=top_p is not None, HAS_MIN_P=min_p is not None, HAS_SEED=seed is not None,
        FILTERED=filtered, TOP_P_BD3LM=top_p_mode == "bd3lm", CONFIDENCE=CONFIDENCE_KINDS[confidence],
        CONF_RAW=conf_raw, RETURN_ARGMAX=return_argmax,
        KEY_SHIFT=KEY_SHIFT[logits2d.dtype], NUM_PIVOTS=NUM_PIVOTS, SEARCH_BLOCK=_search_block(vocab),
        NOISE_TILE=NOISE_TILE, TILE_BLOCK=_tile_block(vocab), num_warps=8 if filtered else 4,
    )
    return outputs


def sample_fwd(logits2d, temperature, temperature_value, top_k, top_k_value, top_p, top_p_value,
               min_p, min_p_value, seed, seed_value, offset, *, filtered: bool, top_p_mode: str = "inclusive",
               num_parts=None, wrap=_identity):
    """Launch the sampling kernels on a [R, V] view with unit column stride.

    Returns ``(tokens int64 [R], probs fp32 [R])``; invalid rows (NaN / +inf / all -inf) get
    token -1. Filtered rows go through the row kernel; unfiltered ones through the split
    partial + finalize pair, which keeps the GPU busy at small batch.
    """
    if filtered:
        return predict_tokens_fwd(logits2d, None, None, temperature, temperature_value, top_k, top_k_value, top_p,
                                  top_p_value, min_p, min_p_value, seed, seed_value, offset, confidence="prob",
                                  conf_raw=False, filtered=True, top_p_mode=top_p_mode, wrap=wrap)
    rows, vocab = logits2d.shape
    device = logits2d.device
    tokens = torch.empty(rows, dtype=torch.int64, device=device)
    probs = torch.empty(rows, dtype=torch.float32, device=device)
    if rows == 0:
        return tokens, probs
    d = _Dummies(device)
    temp_args = (temperature if temperature is not None else d.f, temperature_value)
    seed_args = _seed_args(seed, seed_value, d.i)
    num_tiles = triton.cdiv(vocab, NOISE_TILE)
    parts = num_parts or _num_parts(rows, num_tiles, device)
    tiles_per_part = triton.cdiv(num_tiles, parts)
    parts = triton.cdiv(num_tiles, tiles_per_part)
    part_max = torch.empty((rows, parts), dtype=torch.float32, device=device)
    part_sum = torch.empty_like(part_max)
    part_score = torch.empty_like(part_max)
    part_tile = torch.empty((rows, parts), dtype=torch.int32, device=device)
    part_arg = torch.empty((rows, parts), dtype=torch.int64, device=device)
    part_flags = torch.empty((rows, parts), dtype=torch.int32, device=device)
    common = dict(HAS_TEMP=temperature is not None, HAS_SEED=seed is not None, NOISE_TILE=NOISE_TILE,
                  TILE_BLOCK=_tile_block(vocab), num_warps=4)
    wrap(_sample_partial_kernel)[(rows, parts)](
        logits2d, logits2d.stride(0), vocab, num_tiles, tiles_per_part, *temp_args, *seed_args, offset,
        part_max, part_sum, part_score, part_tile, part_arg, part_flags, **common,
    )
    wrap(_sample_finalize_kernel)[(rows,)](
        logits2d, logits2d.stride(0), vocab, parts, *temp_args, *seed_args, offset,
        part_max, part_sum, part_score, part_tile, part_arg, part_flags, tokens, probs,
        PARTS_BLOCK=max(2, triton.next_power_of_2(parts)), **common,
    )
    return tokens, probs


def filter_logits_fwd(logits2d, top_k, top_k_value, top_p, top_p_value, min_p, min_p_value, *,
                      top_p_mode: str = "inclusive", wrap=_identity):
    """Launch filter_logits on a [R, V] view; returns (filtered [R, V], invalid-row flags int8 [R])."""
    rows, vocab = logits2d.shape
    device = logits2d.device
    out = torch.empty((rows, vocab), dtype=logits2d.dtype, device=device)
    bad = torch.zeros(rows, dtype=torch.int8, device=device)
    if rows == 0:
        return out, bad
    d = _Dummies(device)
    wrap(_filter_logits_kernel)[(rows,)](
        logits2d, logits2d.stride(0), out, out.stride(0), bad, vocab,
        top_k if top_k is not None else d.i, top_k_value,
        top_p if top_p is not None else d.f, top_p_value,
        min_p if min_p is not None else d.f, min_p_value,
        HAS_TOP_K=top_k is not None, HAS_TOP_P=top_p is not None, HAS_MIN_P=min_p is not None,
        TOP_P_BD3LM=top_p_mode == "bd3lm",
        KEY_SHIFT=KEY_SHIFT[logits2d.dtype], NUM_PIVOTS=NUM_PIVOTS, SEARCH_BLOCK=_search_block(vocab), num_warps=8,
    )
    return out, bad
