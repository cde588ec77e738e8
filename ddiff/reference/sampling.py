"""Plain PyTorch reference for ``filter_logits`` and ``sample``; it defines their semantics.

Rows are the flattened leading dims of the logits; every per-row parameter arrives here as a
``[R]`` tensor (the public ops broadcast scalars).

Filtering (``keep_mask``) follows transformers' ``TopKLogitsWarper`` -> ``TopPLogitsWarper`` ->
``MinPLogitsWarper`` (``min_tokens_to_keep=1``), each applied to what the one before left, on
the tempered fp32 logits ``z = logits.float() / T``, with one deliberate difference: tokens
tied at the top-k or top-p boundary are all kept (transformers keeps an arbitrary subset of a
tie, decided by its sort). In terms of the logit order:

* top-k keeps ``l >= v_k``, the k-th largest logit (``k`` = 0 or ``k >= V``: no-op);
* top-p (``top_p_mode="inclusive"``, the default) keeps ``l >= v_p``, the largest logit whose
  "mass at or above" reaches ``p``: ``sum(softmax(z)[l_j >= v_p]) >= p`` over the top-k
  survivors (``p`` = 1: no-op). So a token is kept iff the mass of tokens strictly above it is
  below ``p``, as in transformers: the token that crosses ``p`` is kept;
* top-p with ``top_p_mode="bd3lm"`` is BD3LM's nucleus (kuleshov-group/bd3lms
  ``_nucleus_sample``: sort, ``cumsum(probs) <= p``, always the top token): a token is kept
  iff the mass strictly above it plus its own probability is at most ``p``, or it ties with
  the largest logit. With ties, "the mass strictly above" counts none of the tied tokens, so a
  tie group is kept whole iff its first member (in any sort order) would be: ddiff keeps every
  tie that BD3LM's sort might keep. The token that crosses ``p`` is dropped;
* min-p keeps ``exp(z - max z) >= min_p`` (``min_p`` = 0: no-op).

Sampling draws ``argmax(z_i + G_i)`` over the kept tokens, hierarchically and exactly:
a Gumbel race over the noise tiles' log-sum-exps picks a tile of ``NOISE_TILE`` columns (tile
noise: stream ``STREAM_TILE``, index = tile), then a race inside that tile picks the token
(stream ``STREAM_TOKEN``, index = column). ``P(tile) = Z_tile / Z`` and
``P(i | tile) = p_i / Z_tile``, so the token is distributed as softmax(z) over the kept set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddiff.reference.rng import NOISE_TILE, STREAM_TILE, STREAM_TOKEN, philox_gumbel


def invalid_rows(logits2d: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Rows that contain NaN or +inf (also after tempering), or are entirely -inf."""
    x = logits2d.float()
    t = torch.where(temperature == 0, torch.ones_like(temperature), temperature)
    z = x / t[:, None]
    return torch.isnan(z).any(-1) | torch.isposinf(z).any(-1) | torch.isneginf(x).all(-1)


TOP_P_MODES = ("inclusive", "bd3lm")


def keep_mask(logits2d: torch.Tensor, temperature, top_k, top_p, min_p, top_p_mode: str = "inclusive"):
    """Boolean [R, V] mask of the tokens that survive top-k -> top-p -> min-p, and ``z``.

    ``temperature`` 0 (greedy) rows are filtered at temperature 1. ``top_p_mode`` is
    ``"inclusive"`` (transformers) or ``"bd3lm"`` (BD3LM's nucleus), see the module docstring.
    """
    rows, vocab = logits2d.shape
    x = logits2d.float()
    t = torch.where(temperature == 0, torch.ones_like(temperature), temperature).float()
    z = x / t[:, None]
    keep = torch.ones_like(x, dtype=torch.bool)
    if rows == 0:
        return keep, z

    k_active = (top_k > 0) & (top_k < vocab)
    p_active = top_p < 1
    if bool(k_active.any()) or bool(p_active.any()):
        order = torch.argsort(x, dim=-1, descending=True, stable=True)
        x_sorted = x.gather(-1, order)

    if bool(k_active.any()):
        kth = x_sorted.gather(-1, (top_k.clamp(1, vocab) - 1).long()[:, None])
        keep &= (x >= kth) | ~k_active[:, None]

    z_max = z.max(-1, keepdim=True).values
    e = torch.exp(z - z_max)
    if bool(p_active.any()):
        e_sorted = torch.where(keep, e, torch.zeros_like(e)).gather(-1, order)
        mass_sorted = e_sorted.cumsum(-1)
        target = top_p.float()[:, None] * mass_sorted[:, -1:]
        if top_p_mode == "inclusive":
            first = (mass_sorted >= target).int().argmax(-1, keepdim=True)
            keep_p = x >= x_sorted.gather(-1, first)
        else:
            # Mass strictly above a token: the exclusive cumsum at the first member of its tie
            # group (``-x_sorted`` is ascending, so searchsorted finds that member).
            group_start = torch.searchsorted(-x_sorted, -x_sorted, side="left")
            above = (mass_sorted - e_sorted).gather(-1, group_start)
            fits = (above + e_sorted <= target) | (x_sorted == x_sorted[:, :1])
            keep_p = torch.zeros_like(keep).scatter(-1, order, fits)
        keep &= keep_p | ~p_active[:, None]

    m_active = min_p > 0
    if bool(m_active.any()):
        keep &= (e >= min_p.float()[:, None]) | ~m_active[:, None]
    return keep, z


def filter_logits_reference(logits2d, top_k, top_p, min_p, top_p_mode: str = "inclusive") -> torch.Tensor:
    ones = torch.ones(logits2d.shape[0], dtype=torch.float32, device=logits2d.device)
    keep, _ = keep_mask(logits2d, ones, top_k, top_p, min_p, top_p_mode)
    return logits2d.masked_fill(~keep, float("-inf"))


def _gumbel_race(z_kept: torch.Tensor, seed: torch.Tensor, offset: int, row_ids: torch.Tensor) -> torch.Tensor:
    """The hierarchical Gumbel-max over [R, V] tempered, filtered logits (-inf = excluded)."""
    rows, vocab = z_kept.shape
    device = z_kept.device
    num_tiles = -(-vocab // NOISE_TILE)
    padded = F.pad(z_kept, (0, num_tiles * NOISE_TILE - vocab), value=float("-inf"))
    tile_lse = torch.logsumexp(padded.view(rows, num_tiles, NOISE_TILE), dim=-1)
    row_ids, seed = row_ids[:, None], seed[:, None]
    tile_ids = torch.arange(num_tiles, device=device)[None, :]
    tile = torch.argmax(tile_lse + philox_gumbel(seed, offset, row_ids, tile_ids, STREAM_TILE), dim=-1)
    # Columns past V read -inf and never win: a row shorter than a tile needs only its V columns.
    cols = tile[:, None] * NOISE_TILE + torch.arange(min(NOISE_TILE, vocab), device=device)[None, :]
    scores = padded.gather(-1, cols) + philox_gumbel(seed, offset, row_ids, cols, STREAM_TOKEN)
    return cols.gather(-1, torch.argmax(scores, dim=-1, keepdim=True)).squeeze(-1)


def sample_reference(logits2d, temperature, top_k, top_p, min_p, seed, offset: int, row_ids=None,
                     top_p_mode: str = "inclusive"):
    """Tokens (int64 [R]) and their fp32 probabilities under the filtered sampling distribution.

    Greedy rows (``temperature == 0``) return the first maximal index, with its probability
    under the filtered softmax at temperature 1. ``row_ids`` are the rows' indices in the
    noise counter (default 0..R-1), for callers that pass a subset of a batch.
    """
    rows, vocab = logits2d.shape
    device = logits2d.device
    keep, z = keep_mask(logits2d, temperature, top_k, top_p, min_p, top_p_mode)
    z_kept = z.masked_fill(~keep, float("-inf"))
    if rows == 0:
        return torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, dtype=torch.float32, device=device)

    tokens = torch.argmax(logits2d.float(), dim=-1)
    hot = torch.nonzero(temperature != 0).squeeze(-1)  # greedy rows draw no noise
    if hot.numel():
        rows_all = torch.arange(rows, device=device) if row_ids is None else row_ids
        tokens[hot] = _gumbel_race(z_kept[hot], seed.to(device)[hot], offset, rows_all[hot])
    z_max = z_kept.max(-1, keepdim=True).values
    norm = torch.exp(z_kept - z_max).sum(-1)
    probs = torch.exp(z_kept.gather(-1, tokens[:, None]).squeeze(-1) - z_max.squeeze(-1)) / norm
    return tokens, probs
