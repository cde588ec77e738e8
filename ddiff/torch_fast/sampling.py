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


def _host_scalar(param: Param):
    """The parameter's value when it is a Python scalar (known on the host), else None."""
    return param[1] if param[0] is None else None


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

    def select(self, picked: Tensor) -> "RowParams":
        """The parameters of the rows ``picked`` (their noise keeps their original row ids)."""
        seed = self.seed
        if isinstance(seed, Tensor) and seed.numel() > 1:
            seed = seed[picked]
        params = {k: (v[0][picked], v[1]) if v[0] is not None else v for k, v in self.params.items()}
        return RowParams(picked.shape[0], self.vocab, self.device, params["temperature"], params["top_k"],
                         params["top_p"], params["min_p"], (seed if isinstance(seed, Tensor) else None, seed),
                         top_p_mode=self.top_p_mode, row_ids=self.row_ids[picked])

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
        return self._host("temperature", lambda t: t == 0)

    def all_greedy(self) -> Optional[bool]:
        hot = self._host("temperature", lambda t: t != 0)
        return None if hot is None else not hot

    def unit_temperature(self) -> bool:
        """Every row is divided by exactly 1 (temperature 1, or greedy)."""
        return self._host("temperature", lambda t: (t != 0) & (t != 1)) is False

    def filter_flags(self) -> dict:
        """Per filter: does any row use it (True / False, None: unknown without a device sync)?"""
        return {"top_k": self._host("top_k", lambda k: (k > 0) & (k < self.vocab)),
                "top_p": self._host("top_p", lambda p: p < 1), "min_p": self._host("min_p", lambda m: m > 0)}

    def any_filter(self) -> Optional[bool]:
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


def filter_threshold(x: Tensor, t: Tensor, params: RowParams) -> Optional[Tensor]:
    """fp32 ``[n]`` threshold: the kept set of row r is ``x[r] >= theta[r]`` (``-inf``: no filter).

    Equal to the set ``ddiff.reference.sampling.keep_mask`` keeps (up to the last fp32 bit of a
    top-p total mass without top-k, see the module docstring). None when no row filters.
    """
    n, vocab = x.shape
    flags = params.filter_flags()
    if n == 0 or not any(flag is not False for flag in flags.values()):
        return None
    readable = host_readable(x)
    f32 = dict(dtype=torch.float32, device=x.device)
    no = torch.zeros(n, dtype=torch.bool, device=x.device)
    top_k = params.column("top_k") if flags["top_k"] is not False else None
    k_act = (top_k > 0) & (top_k < vocab) if top_k is not None else no
    top_p = params.column("top_p") if flags["top_p"] is not False else None
    p_act = top_p < 1 if top_p is not None else no
    min_p = params.column("min_p") if flags["min_p"] is not False else None
    m_act = min_p > 0 if min_p is not None else no

    total = None
    if top_p is not None and (not readable or bool((p_act & ~k_act).any())):
        # Total mass of a top-p row without top-k: the sum of exp(z - max z) over the row.
        z = x.float() / t[:, None]
        e = torch.exp(z - z.amax(-1, keepdim=True))
        total = e.sum(-1, dtype=torch.float64 if _float64_ok(x.device) else torch.float32).to(torch.float32)

    k_eff = torch.where(k_act, top_k, torch.zeros_like(top_k)) if top_k is not None else None
    head = (max(int(k_eff.max()) if k_eff is not None else 0, 48) + 16) if readable else vocab
    while True:
        head = vocab if min(head, vocab) > vocab // 4 else min(head, vocab)
        vals = torch.topk(x, head, dim=-1).values.float()
        theta, done = _head_threshold(vals, t, top_p, min_p, params.top_p_mode, k_act, p_act, m_act, k_eff, total,
                                      head == vocab, torch.full((n,), NEG_INF, **f32))
        if head == vocab or not readable or done is None or bool(done.all()):
            return theta
        head *= 2


def _head_threshold(vals: Tensor, t: Tensor, top_p, min_p, mode: str, k_act, p_act, m_act, k_eff, total,
                    whole: bool, none: Tensor):
    """Thresholds from the sorted head ``vals`` [n, K] of each row, and whether the head sufficed
    (None: it always does). ``top_p`` / ``min_p`` / ``k_eff`` are None for filters no row uses."""
    head = vals.shape[1]
    theta = none
    done = None if whole else torch.ones_like(none, dtype=torch.bool)
    kth = None
    if k_eff is not None:
        kth = vals.gather(-1, (k_eff.clamp(1, head) - 1)[:, None]).squeeze(-1)
        theta = torch.where(k_act, kth, none)
    if top_p is None and min_p is None:
        return theta, None
    z_head = vals / t[:, None]
    e = torch.exp(z_head - z_head[:, :1])
    if top_p is not None:
        if kth is not None:
            # Every token tied with the k-th is kept: top-p sees the whole top-k set.
            e_kept = torch.where(k_act[:, None] & (vals < kth[:, None]), torch.zeros_like(e), e)
        else:
            e_kept = e
        mass = e_kept.cumsum(-1)
        total_rows = mass[:, -1] if total is None else torch.where(k_act, mass[:, -1], total)
        target = top_p[:, None] * total_rows[:, None]
        if mode == "inclusive":
            first = (mass >= target).int().argmax(-1)
            theta_p = vals.gather(-1, first[:, None]).squeeze(-1)
            p_inside = mass[:, -1] >= target[:, 0]
        else:
            # BD3LM: mass strictly above a token (its tie group's exclusive cumsum) plus its own.
            group_start = torch.searchsorted(-vals, -vals, side="left")
            above = (mass - e_kept).gather(-1, group_start)
            count = ((above + e_kept <= target) | (vals == vals[:, :1])).sum(-1)
            theta_p = vals.gather(-1, (count - 1).clamp_min(0)[:, None]).squeeze(-1)
            p_inside = count < head
        theta = torch.maximum(theta, torch.where(p_act, theta_p, none))
        if done is not None:
            # Without top-k the p boundary must lie in the head; with it, the k-th's ties must.
            ties_inside = vals[:, -1] < kth if kth is not None else torch.ones_like(p_inside)
            done = done & torch.where(k_act, ~p_act | ties_inside, ~p_act | p_inside)
    if min_p is not None:
        count_m = (e >= min_p[:, None]).sum(-1)
        theta_m = vals.gather(-1, (count_m - 1).clamp_min(0)[:, None]).squeeze(-1)
        theta = torch.maximum(theta, torch.where(m_act, theta_m, none))
        if done is not None:
            # A min-p boundary below the head matters only without top-k / top-p, whose
            # boundaries are inside the head and higher.
            done = done & (~m_act | k_act | p_act | (count_m < head))
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
        zp.index_fill_(1, suppress, NEG_INF)
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
    if key not in _ARANGES:
        if len(_ARANGES) > 64:
            _ARANGES.clear()
        _ARANGES[key] = torch.arange(size, device=device)
    return _ARANGES[key]


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
    tokens, tiles = sample_rows(logits2d, params, offset)
    probs = tiles.prob_of(tokens) if return_probs else torch.empty(0, device=device)
    return tokens, probs, tiles.bad()


def filter_logits(logits2d: Tensor, top_k: Param, top_p: Param, min_p: Param,
                  top_p_mode: str = "inclusive") -> tuple[Tensor, Tensor]:
    """``(filtered logits, bad)`` of ``ddiff.filter_logits`` for [R, V] logits."""
    rows, vocab = logits2d.shape
    device = logits2d.device
    bad = ~torch.isfinite(logits2d.amax(-1)) if vocab else torch.zeros(rows, dtype=torch.bool, device=device)
    if rows == 0:
        return logits2d.clone(), bad
    params = RowParams(rows, vocab, device, (None, 1.0), top_k, top_p, min_p, (None, 0), top_p_mode=top_p_mode)
    theta = filter_threshold(logits2d, torch.ones(rows, dtype=torch.float32, device=device), params)
    if theta is None:
        return logits2d.clone(), bad
    return logits2d.masked_fill(logits2d < theta[:, None], NEG_INF), bad
