"""Fast torch path of ``sample`` and ``filter_logits``: the reference's tokens, fewer passes.

How it differs from ``ddiff.reference.sampling`` (which defines the results):

* **Filters as one threshold.** top-k, top-p (both modes) and min-p each keep an upper set of
  the logit order, so the kept set of a row is ``x >= theta``. ``theta`` comes from the sorted
  head of the row given by ``torch.topk``, doubled until every active filter's boundary lies
  inside it (a full sort only when the head would pass ``V / 4``). The cumulative masses are
  the reference's, prefix for prefix: the same ``cumsum`` over the same values. A top-p row
  without top-k needs its total mass: summed in float64 where the device has it (CPU, CUDA;
  equal to the reference's sorted-order sum up to rounding of the last fp32 bit), in fp32 on
  MPS.
* **One padded tempered copy.** ``z = x / T`` is written once into a ``[n, tiles * 1024]``
  buffer whose tail is ``-inf`` (the reference's padded layout, so its tile log-sum-exps are
  bit-identical), filtered in place, and serves the tile race, the token race, the greedy
  argmax and the normaliser of the probabilities.
* **Invalid rows** (NaN or +inf after tempering, or all ``-inf``) are the rows whose maximum is
  not finite: no separate ``isnan`` / ``isinf`` passes.
* **Philox** (``ddiff.torch_fast.rng``) only for the ``tiles`` tile draws and the 1024 columns of
  the winning tile of each non-greedy row.
* Host decisions (is any row greedy, is any filter active, how long a head to take) read
  Python scalars, or per-row tensors on CPU, where reading costs no device sync; on other
  devices the general path runs without reading.
* **Bounded memory: rows in chunks** (:func:`row_chunks`). Every op of this package runs on
  chunks of rows whose working memory (the padded fp32 copy, its statistics' temporaries, a
  sort) is about a quarter of the input's size, at least ``CHUNK_MIN_BYTES`` and at most
  ``CHUNK_MAX_BYTES``: the memory an op needs beyond its input and its outputs stays within
  1.5x the input's size (plus ``CHUNK_MIN_BYTES`` for small inputs), also at tiny
  vocabularies whose rows are padded to a 1024-column tile. Chunking changes no result, bit
  for bit: the noise is keyed by the global row index, a chunk takes the code path its whole
  batch would (:meth:`RowParams.chunk`), and a chunk holds at least two rows (a multi-threaded
  CPU reduction over a single row may sum in another order than the same row in a batch).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ddiff.reference.rng import NOISE_TILE, STREAM_TILE, STREAM_TOKEN
from ddiff.torch_fast import rng

Tensor = torch.Tensor
Param = tuple  # (per-row tensor [R] or None, python scalar), as the ops pass them
NEG_INF = float("-inf")


def host_readable(tensor: Tensor) -> bool:
    """Reading this tensor's values costs no device sync."""
    return tensor.device.type == "cpu"


def suppress_columns_(x: Tensor, ids: Tensor, vocab: int) -> Tensor:
    """``x[:, ids] = -inf`` in place; ids outside ``[0, vocab)`` are ignored, as the kernels do.

    The public ops reject such ids while they can read them without a device sync; what gets
    here unchecked (a device tensor inside ``ddiff.sync_checks(False)``) is handled on the
    device: an invalid id is replaced by the first valid one (or, when none is valid, its column
    is written back unchanged), so duplicate indices always write the same value.
    """
    valid = (ids >= 0) & (ids < vocab)
    if host_readable(ids):
        ids = ids[valid]
        return x.index_fill_(1, ids, NEG_INF) if ids.numel() else x
    first = ids.gather(0, valid.to(torch.int32).argmax().reshape(1))
    idx = torch.where(valid, ids, first.clamp(0, max(vocab - 1, 0)))
    return x.index_copy_(1, idx, torch.where(valid.any(), NEG_INF, x.index_select(1, idx)))


class RowParams:
    """Per-row sampling parameters of ``n`` rows, kept as Python scalars where they are scalars.

    ``column(name)`` gives an ``[n]`` tensor; the host flags (``all_greedy`` ...) read the
    scalars, or per-row tensors on CPU, and are ``None`` ("unknown") where reading would
    need a device sync.
    """

    def __init__(self, rows: int, vocab: int, device, temperature: Param, top_k: Param, top_p: Param,
                 min_p: Param, seed: Param, *, top_p_mode: str = "inclusive", row_ids: Optional[Tensor] = None):
        self.rows, self.vocab, self.device, self.top_p_mode = rows, vocab, torch.device(device), top_p_mode
        self.params = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
        seed_tensor, seed_value = seed
        self.seed = seed_value if seed_tensor is None else seed_tensor.to(torch.int64)
        self._row_ids = row_ids
        self._decided: Optional[dict] = None  # a chunk's host flags: its whole batch's (see ``chunk``)

    def select(self, picked: Tensor) -> "RowParams":
        """The parameters of the rows ``picked`` (their noise keeps their original row ids)."""
        seed = self.seed
        if isinstance(seed, Tensor) and seed.numel() > 1:
            seed = seed[picked]
        params = {k: (v[0][picked], v[1]) if v[0] is not None else v for k, v in self.params.items()}
        return RowParams(picked.shape[0], self.vocab, self.device, params["temperature"], params["top_k"],
                         params["top_p"], params["min_p"], (seed if isinstance(seed, Tensor) else None, seed),
                         top_p_mode=self.top_p_mode, row_ids=self.row_ids[picked])

    def chunk(self, start: int, stop: int) -> "RowParams":
        """The parameters of rows ``start:stop``: their noise keeps their row ids, and the host
        flags (``all_greedy`` ...) are the whole batch's, so a chunk takes the code path the
        whole batch would (same tokens, same bits of every probability and confidence)."""
        seed = self.seed
        if isinstance(seed, Tensor) and seed.numel() > 1:
            seed = seed[start:stop]
        params = {k: (v[0][start:stop], v[1]) if v[0] is not None else v for k, v in self.params.items()}
        out = RowParams(stop - start, self.vocab, self.device, params["temperature"], params["top_k"],
                        params["top_p"], params["min_p"], (seed if isinstance(seed, Tensor) else None, seed),
                        top_p_mode=self.top_p_mode, row_ids=self.row_ids[start:stop])
        if self._decided is None:
            self._decided = {"any_greedy": self.any_greedy(), "all_greedy": self.all_greedy(),
                             "unit_temperature": self.unit_temperature(), "filter_flags": self.filter_flags(),
                             "any_filter": self.any_filter()}
        out._decided = self._decided
        return out

    @property
    def row_ids(self) -> Tensor:
        if self._row_ids is None:
            self._row_ids = aranged(self.rows, self.device)
        return self._row_ids

    def column(self, name: str) -> Tensor:
        tensor, scalar = self.params[name]
        dtype = torch.int64 if name == "top_k" else torch.float32
        if tensor is not None:
            return tensor.to(dtype)
        return torch.full((self.rows,), scalar, dtype=dtype, device=self.device)

    def _host(self, name: str, test) -> Optional[bool]:
        """Does ``test`` hold for any row? (None: unknown without a device sync.)"""
        tensor, scalar = self.params[name]
        if tensor is None:
            return bool(test(scalar))
        if not host_readable(tensor) or tensor.numel() == 0:
            return None if tensor.numel() else False
        return bool(test(tensor).any())

    def any_greedy(self) -> Optional[bool]:
        if self._decided is not None:
            return self._decided["any_greedy"]
        return self._host("temperature", lambda t: t == 0)

    def all_greedy(self) -> Optional[bool]:
        if self._decided is not None:
            return self._decided["all_greedy"]
        hot = self._host("temperature", lambda t: t != 0)
        return None if hot is None else not hot

    def unit_temperature(self) -> bool:
        """Every row is divided by exactly 1 (temperature 1, or greedy)."""
        if self._decided is not None:
            return self._decided["unit_temperature"]
        return self._host("temperature", lambda t: (t != 0) & (t != 1)) is False

    def filter_flags(self) -> dict:
        """Per filter: does any row use it (True / False, None: unknown without a device sync)?"""
        if self._decided is not None:
            return dict(self._decided["filter_flags"])
        return {"top_k": self._host("top_k", lambda k: (k > 0) & (k < self.vocab)),
                "top_p": self._host("top_p", lambda p: p < 1), "min_p": self._host("min_p", lambda m: m > 0)}

    def any_filter(self) -> Optional[bool]:
        if self._decided is not None:
            return self._decided["any_filter"]
        flags = list(self.filter_flags().values())
        if any(flags):
            return True
        return None if None in flags else False

    def tempering(self) -> Tensor:
        """fp32 ``[n]`` divisors of the logits: the temperature, 1 for greedy rows."""
        tensor, scalar = self.params["temperature"]
        if tensor is None:
            return torch.full((self.rows,), scalar if scalar != 0 else 1.0, dtype=torch.float32, device=self.device)
        t = tensor.to(torch.float32)
        return torch.where(t == 0, torch.ones_like(t), t)


# ---------------------------------------------------------------------------------------------
# Filters: one threshold per row
# ---------------------------------------------------------------------------------------------


def _float64_ok(device) -> bool:
    return torch.device(device).type != "mps"


@dataclass
class _Filter:
    """One filter's per-row value and which rows use it: Python scalars when the parameter is a
    scalar (no tensor op is spent on it), else ``[n, 1]`` values and a bool ``[n]`` tensor."""

    value: object
    active: object


def _filter(params: RowParams, name: str, test) -> Optional[_Filter]:
    tensor, scalar = params.params[name]
    if tensor is None:
        return _Filter(scalar, True) if test(scalar) else None
    column = params.column(name)
    return _Filter(column[:, None], test(column))


def _where(active, a, b):
    """``torch.where`` for a per-row bool tensor; a Python bool picks a side without an op."""
    if active is True:
        return a
    if active is False:
        return b
    return torch.where(active, a, b)


def _both(a, b):
    if a is True or b is False:
        return b
    if b is True or a is False:
        return a
    return a & b


def _negate(a):
    return (not a) if isinstance(a, bool) else ~a


def filter_threshold(x: Tensor, t: Tensor, params: RowParams) -> Optional[Tensor]:
    """fp32 ``[n]`` threshold: the kept set of row r is ``x[r] >= theta[r]`` (``-inf``: no filter).

    Equal to the set ``ddiff.reference.sampling.keep_mask`` keeps (up to the last fp32 bit of a
    top-p total mass without top-k, see the module docstring). None when no row filters.
    """
    n, vocab = x.shape
    top_k = _filter(params, "top_k", lambda k: (k > 0) & (k < vocab))
    top_p = _filter(params, "top_p", lambda p: p < 1)
    min_p = _filter(params, "min_p", lambda m: m > 0)
    if n == 0 or (top_k is None and top_p is None and min_p is None):
        return None
    readable = host_readable(x)
    if top_k is not None and not isinstance(top_k.active, bool):
        top_k.value = torch.where(top_k.active[:, None], top_k.value, 0)  # 0: the row has no top-k

    total = None
    p_only = None if top_p is None else _both(top_p.active, _negate(top_k.active) if top_k else True)
    if p_only is not None and p_only is not False and (not readable or isinstance(p_only, bool) or bool(p_only.any())):
        # Total mass of a top-p row without top-k: the sum of exp(z - max z) over the row.
        z = x.float() / t[:, None]
        e = torch.exp(z - z.amax(-1, keepdim=True))
        total = e.sum(-1, dtype=torch.float64 if _float64_ok(x.device) else torch.float32).to(torch.float32)

    if not readable:
        head = vocab
    else:
        k_max = 0 if top_k is None else (top_k.value if isinstance(top_k.active, bool) else int(top_k.value.max()))
        head = max(k_max, 48) + 16
    while True:
        head = vocab if min(head, vocab) > vocab // 4 else min(head, vocab)
        vals = torch.topk(x, head, dim=-1).values.float()
        theta, done = _head_threshold(vals, t, top_k, top_p, min_p, params.top_p_mode, total, whole=head == vocab)
        if head == vocab or not readable or done is None or done is True or (done is not False and bool(done.all())):
            return theta
        head *= 2


def _head_threshold(vals: Tensor, t: Tensor, top_k, top_p, min_p, mode: str, total, *, whole: bool):
    """Thresholds from the sorted head ``vals`` [n, K] of each row, and whether the head sufficed
    (None: it always does). ``top_k`` / ``top_p`` / ``min_p`` are None when no row uses them."""
    n, head = vals.shape
    none = vals.new_full((n,), NEG_INF)
    theta = none
    done = None if whole else True
    kth = None
    if top_k is not None:
        if isinstance(top_k.value, int):
            kth = vals[:, top_k.value - 1]
        else:
            kth = vals.gather(-1, top_k.value.clamp(1, head) - 1).squeeze(-1)
        theta = _where(top_k.active, kth, none)
    if top_p is None and min_p is None:
        return theta, done
    z_head = vals / t[:, None]
    e = torch.exp(z_head - z_head[:, :1])
    if top_p is not None:
        k_active = top_k.active if top_k is not None else False
        if kth is not None:
            # Every token tied with the k-th is kept: top-p sees the whole top-k set.
            below = vals < kth[:, None]
            e_kept = e.masked_fill(below if k_active is True else (k_active[:, None] & below), 0.0)
        else:
            e_kept = e
        mass = e_kept.cumsum(-1)
        total_rows = mass[:, -1] if total is None else _where(k_active, mass[:, -1], total)
        target = top_p.value * total_rows[:, None]
        if mode == "inclusive":
            first = (mass >= target).int().argmax(-1, keepdim=True)
            theta_p = vals.gather(-1, first).squeeze(-1)
            p_inside = mass[:, -1] >= target[:, 0]
        else:
            # BD3LM: mass strictly above a token (its tie group's exclusive cumsum) plus its own.
            group_start = torch.searchsorted(-vals, -vals, side="left")
            above = (mass - e_kept).gather(-1, group_start)
            count = ((above + e_kept <= target) | (vals == vals[:, :1])).sum(-1, keepdim=True)
            theta_p = vals.gather(-1, (count - 1).clamp_min(0)).squeeze(-1)
            p_inside = count.squeeze(-1) < head
        theta = torch.maximum(theta, _where(top_p.active, theta_p, none))
        if done is not None:
            # With top-k the k-th's ties must lie in the head; without it, the p boundary.
            ties_inside = (vals[:, -1] < kth) if kth is not None else True
            inside = _where(k_active, ties_inside, p_inside) if not isinstance(k_active, bool) else (
                ties_inside if k_active else p_inside)
            done = _both(done, _where(top_p.active, inside, True) if not isinstance(top_p.active, bool) else inside)
    if min_p is not None:
        count_m = (e >= min_p.value).sum(-1, keepdim=True)
        theta_m = vals.gather(-1, (count_m - 1).clamp_min(0)).squeeze(-1)
        theta = torch.maximum(theta, _where(min_p.active, theta_m, none))
        if done is not None:
            # A min-p boundary below the head matters only for rows without top-k and top-p,
            # whose boundaries lie inside the head and higher.
            others = _both(_negate(top_k.active) if top_k else True, _negate(top_p.active) if top_p else True)
            if others is not False:
                m_inside = count_m.squeeze(-1) < head
                needs = _both(min_p.active, others)
                done = _both(done, m_inside if needs is True else (~needs | m_inside))
    return theta, done


# ---------------------------------------------------------------------------------------------
# The padded tempered logits and their tile statistics
# ---------------------------------------------------------------------------------------------


@dataclass
class Tiles:
    """``z = filter(x / T)`` in the reference's padded layout and its per-tile statistics."""

    zp: Tensor  # fp32 [n, tiles * NOISE_TILE]; columns >= V and filtered entries are -inf
    tile_max: Tensor  # fp32 [n, tiles]
    lse: Tensor  # fp32 [n, tiles]: log-sum-exp of each tile (-inf for an empty tile)
    vocab: int

    @property
    def tiles(self) -> int:
        return self.zp.shape[1] // NOISE_TILE

    _row_max: Optional[Tensor] = None

    @property
    def row_max(self) -> Tensor:
        if self._row_max is None:
            self._row_max = self.tile_max.amax(-1)
        return self._row_max

    def bad(self) -> Tensor:
        """NaN / +inf after tempering, or nothing left: the row maximum is not finite."""
        return ~torch.isfinite(self.row_max)

    def log_norm(self) -> Tensor:
        """log sum(exp(z)) over each row (finite rows), from the tile log-sum-exps."""
        row_max = self.row_max[:, None]
        return torch.exp(self.lse - row_max).sum(-1).log_().add_(row_max[:, 0])

    def prob_of(self, tokens: Tensor) -> Tensor:
        """fp32 probability of ``tokens`` under softmax(z)."""
        # Tokens index the padded buffer (< tiles * NOISE_TILE), so the gather is always in bounds.
        z_tok = self.zp.gather(-1, tokens[:, None]).squeeze(-1)
        return torch.exp(z_tok - self.log_norm())


def tempered_tiles(x: Tensor, t: Tensor, theta: Optional[Tensor], *, unit_temperature: bool = False,
                   suppress: Optional[Tensor] = None) -> Tiles:
    """Write ``x / t`` into the padded buffer, drop ``x < theta`` and the ``suppress`` columns,
    and take the tile statistics."""
    n, vocab = x.shape
    tiles = -(-vocab // NOISE_TILE)
    zp = torch.empty((n, tiles * NOISE_TILE), dtype=torch.float32, device=x.device)
    if tiles * NOISE_TILE > vocab:
        zp[:, vocab:] = NEG_INF
    z = zp[:, :vocab]
    if unit_temperature:
        z.copy_(x)
    else:
        torch.div(x, t[:, None], out=z)
    if theta is not None:
        z.masked_fill_(x < theta[:, None], NEG_INF)
    if suppress is not None and suppress.numel():
        suppress_columns_(zp, suppress, vocab)
    view = zp.view(n, tiles, NOISE_TILE)
    return Tiles(zp, view.amax(-1), torch.logsumexp(view, -1), vocab)


# ---------------------------------------------------------------------------------------------
# The hierarchical Gumbel race
# ---------------------------------------------------------------------------------------------


def race(tiles: Tiles, params: RowParams, offset: int, *, greedy: Optional[Tensor], all_greedy: bool) -> Tensor:
    """int64 [n] tokens: the reference's tile race and in-tile race; greedy rows take the first argmax."""
    if host_readable(tiles.zp):
        return _race_host(tiles, params, offset, greedy=greedy, all_greedy=all_greedy)
    n = tiles.zp.shape[0]
    device = tiles.zp.device
    num_tiles, vocab = tiles.tiles, tiles.vocab
    width = min(NOISE_TILE, vocab)
    first_max_tile = None if greedy is None and not all_greedy else tiles.tile_max.argmax(-1)
    if all_greedy:
        tile = first_max_tile
    else:
        noise = rng.gumbel(params.seed, offset, params.row_ids, aranged(num_tiles, device), STREAM_TILE)
        tile = (tiles.lse + noise.to(device)).argmax(-1)
        if greedy is not None:
            tile = torch.where(greedy, first_max_tile, tile)
    start = tile * NOISE_TILE
    if n == 1 and host_readable(tile):
        first = int(start)
        z_tile = tiles.zp[:, first:first + width]
        cols = aranged(width, device) + first
    else:
        view = tiles.zp.view(n, num_tiles, NOISE_TILE)
        z_tile = view.gather(1, tile[:, None, None].expand(n, 1, NOISE_TILE)).view(n, NOISE_TILE)[:, :width]
        cols = start[:, None] + aranged(width, device)
    if all_greedy:
        return start + z_tile.argmax(-1)
    scores = z_tile + rng.gumbel(params.seed, offset, params.row_ids, cols, STREAM_TOKEN).to(device)
    if greedy is not None:
        scores = torch.where(greedy[:, None], z_tile, scores)
    return start + scores.argmax(-1)


def _race_host(tiles: Tiles, params: RowParams, offset: int, *, greedy: Optional[Tensor], all_greedy: bool) -> Tensor:
    """:func:`race` on CPU, on NumPy views of the same buffers: the additions and first-maximum
    argmaxes are the same IEEE operations, at a fraction of a torch op's dispatch cost."""
    zp = tiles.zp.numpy()
    n, num_tiles, width = zp.shape[0], tiles.tiles, min(NOISE_TILE, tiles.vocab)
    greedy_rows = None if greedy is None else greedy.numpy()
    first_max_tile = None if greedy is None and not all_greedy else tiles.tile_max.numpy().argmax(-1)
    if all_greedy:
        tile = first_max_tile
    else:
        noise = rng.gumbel(params.seed, offset, params.row_ids, _numpy_arange(num_tiles), STREAM_TILE).numpy()
        tile = (tiles.lse.numpy() + noise).argmax(-1)
        if greedy_rows is not None:
            tile = np.where(greedy_rows, first_max_tile, tile)
    start = tile * NOISE_TILE
    if n == 1:
        z_tile = zp[:, start[0]:start[0] + width]
    else:
        z_tile = zp.reshape(n, num_tiles, NOISE_TILE)[_numpy_arange(n), tile, :width]
    if all_greedy:
        return torch.from_numpy(start + z_tile.argmax(-1))
    cols = start[:, None] + _numpy_arange(width)
    scores = z_tile + rng.gumbel(params.seed, offset, params.row_ids, cols, STREAM_TOKEN).numpy()
    if greedy_rows is not None:
        scores = np.where(greedy_rows[:, None], z_tile, scores)
    return torch.from_numpy(start + scores.argmax(-1))


@functools.lru_cache(maxsize=64)
def _numpy_arange(size: int) -> np.ndarray:
    out = np.arange(size, dtype=np.int64)
    out.setflags(write=False)
    return out


_ARANGES: dict = {}


def aranged(size: int, device) -> Tensor:
    """``torch.arange(size)`` on ``device``, cached (read-only)."""
    key = (size, str(device))
    cached = _ARANGES.get(key)  # one read: another thread may clear the cache between two
    if cached is None:
        if len(_ARANGES) > 64:
            _ARANGES.clear()
        cached = _ARANGES[key] = torch.arange(size, device=device)
    return cached


# Row chunks. The working memory of a row is estimated as WORK_BYTES_PER_COLUMN bytes per column
# of its padded copy (fp32 copies and temporaries, a full sort's values and int64 indices).
WORK_BYTES_PER_COLUMN = 32
CHUNK_MIN_BYTES = 4 << 20
CHUNK_MAX_BYTES = 64 << 20


def row_chunks(x: Tensor, rows: Optional[int] = None) -> list:
    """``(start, stop)`` bounds of the row chunks for ``[R, V]`` logits ``x`` (``rows``: how many of
    its rows are computed, default all): each chunk's working memory is about a quarter of ``x``'s
    size, within ``[CHUNK_MIN_BYTES, CHUNK_MAX_BYTES]``, and holds at least two rows."""
    rows = x.shape[0] if rows is None else rows
    width = -(-x.shape[1] // NOISE_TILE) * NOISE_TILE
    budget = min(CHUNK_MAX_BYTES, max(CHUNK_MIN_BYTES, x.numel() * x.element_size() // 4))
    per = max(2, budget // (width * WORK_BYTES_PER_COLUMN))
    if per >= rows:
        return [(0, rows)]
    bounds = list(range(0, rows, per)) + [rows]
    if bounds[-1] - bounds[-2] < 2:
        del bounds[-2]  # no single-row chunk
    return list(zip(bounds[:-1], bounds[1:]))


def sample_rows(x: Tensor, params: RowParams, offset: int) -> tuple[Tensor, Tiles]:
    """Tokens of the rows of ``x`` (any float dtype, [n, V]) and the tile statistics they came from."""
    t = params.tempering()
    theta = filter_threshold(x, t, params)
    all_greedy = params.all_greedy() is True
    tiles = tempered_tiles(x, t, theta, unit_temperature=params.unit_temperature())
    greedy = None if all_greedy or params.any_greedy() is False else params.column("temperature") == 0
    return race(tiles, params, offset, greedy=greedy, all_greedy=all_greedy), tiles


# ---------------------------------------------------------------------------------------------
# The ops' torch paths
# ---------------------------------------------------------------------------------------------


def sample(logits2d: Tensor, temperature: Param, top_k: Param, top_p: Param, min_p: Param, seed: Param, offset: int,
           top_p_mode: str = "inclusive", *, return_probs: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(tokens, probs, bad)`` of ``ddiff.sample`` for [R, V] logits; invalid rows are flagged, not
    fixed. ``probs`` is empty unless ``return_probs``."""
    rows, vocab = logits2d.shape
    device = logits2d.device
    if rows == 0:
        empty = torch.empty(0, device=device)
        return empty.long(), empty, empty.bool()
    params = RowParams(rows, vocab, device, temperature, top_k, top_p, min_p, seed, top_p_mode=top_p_mode)
    chunks = row_chunks(logits2d)
    if len(chunks) == 1:
        tokens, tiles = sample_rows(logits2d, params, offset)
        probs = tiles.prob_of(tokens) if return_probs else torch.empty(0, device=device)
        return tokens, probs, tiles.bad()
    tokens = torch.empty(rows, dtype=torch.int64, device=device)
    probs = torch.empty(rows if return_probs else 0, dtype=torch.float32, device=device)
    bad = torch.empty(rows, dtype=torch.bool, device=device)
    for start, stop in chunks:
        part, tiles = sample_rows(logits2d[start:stop], params.chunk(start, stop), offset)
        tokens[start:stop] = part
        if return_probs:
            probs[start:stop] = tiles.prob_of(part)
        bad[start:stop] = tiles.bad()
        del tiles
    return tokens, probs, bad


def filter_logits(logits2d: Tensor, top_k: Param, top_p: Param, min_p: Param,
                  top_p_mode: str = "inclusive") -> tuple[Tensor, Tensor]:
    """``(filtered logits, bad)`` of ``ddiff.filter_logits`` for [R, V] logits."""
    rows, vocab = logits2d.shape
    device = logits2d.device
    bad = ~torch.isfinite(logits2d.amax(-1)) if vocab else torch.zeros(rows, dtype=torch.bool, device=device)
    if rows == 0:
        return logits2d.clone(), bad
    params = RowParams(rows, vocab, device, (None, 1.0), top_k, top_p, min_p, (None, 0), top_p_mode=top_p_mode)
    chunks = row_chunks(logits2d)
    if len(chunks) == 1:
        theta = filter_threshold(logits2d, torch.ones(rows, dtype=torch.float32, device=device), params)
        if theta is None:
            return logits2d.clone(), bad
        return logits2d.masked_fill(logits2d < theta[:, None], NEG_INF), bad
    out = logits2d.clone()
    for start, stop in chunks:
        x = logits2d[start:stop]
        theta = filter_threshold(x, torch.ones(stop - start, dtype=torch.float32, device=device),
                                 params.chunk(start, stop))
        if theta is None:
            break  # no row filters (the same for every chunk)
        out[start:stop].masked_fill_(x < theta[:, None], NEG_INF)
    return out, bad
