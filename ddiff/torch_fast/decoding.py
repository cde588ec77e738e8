"""Fast torch path of ``predict_tokens``, ``mdlm_step`` and ``udlm_step``.

Same results as ``ddiff.reference.decoding`` (tokens bit for bit; confidences and posterior
weights up to float rounding), built on :mod:`ddiff.torch_fast.sampling`:

* only the rows that are predicted (``mask``; for ``mdlm_step`` the masked rows whose
  posterior coin reveals them) are read, as in the Triton kernel;
* ``suppress_tokens`` are applied to the tempered copy the race reads (no copy of the logits)
  unless a filter needs the suppressed logits themselves;
* the confidence reuses the race's tile statistics when it is measured on the same
  distribution (``"sampling"``, or ``"raw"`` at temperature 1 without filters) and otherwise
  takes one log-sum-exp over its own distribution;
* the per-row posterior arithmetic of ``udlm_step`` runs in float64 where the device has it
  (as the reference), in fp32 on MPS;
* rows run in chunks of bounded working memory (``ddiff.torch_fast.sampling.row_chunks``; a
  chunk of picked rows is gathered chunk by chunk), with the same results bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch

from ddiff.reference.rng import STREAM_CONFIDENCE, STREAM_POSTERIOR
from ddiff.torch_fast import rng
from ddiff.torch_fast.sampling import (
    NEG_INF,
    Param,
    RowParams,
    filter_threshold,
    host_readable,
    race,
    row_chunks,
    suppress_columns_,
    tempered_tiles,
)

Tensor = torch.Tensor


def row_uniform(seed, offset: int, stream: int, row_ids: Tensor, index: int = 0) -> Tensor:
    """One fp32 uniform per row (``reference.decoding.row_uniform``) for the rows ``row_ids``."""
    cols = torch.full((1,), index, dtype=torch.int64, device=row_ids.device)
    return rng.uniform(seed, offset, row_ids, cols, stream).reshape(-1).to(row_ids.device)


def _confidence(dist: Tensor, tokens: Tensor, kind: str, log_norm: Optional[Tensor] = None) -> Tensor:
    """Confidence of ``tokens`` under softmax(dist) (fp32 [n, V'], -inf = excluded), as
    ``reference.decoding.confidence_of``; an empty distribution gives 0 (``prob``, ``margin``)
    or -inf (``neg_entropy``)."""
    if log_norm is None:
        log_norm = torch.logsumexp(dist, -1)
    empty = torch.isneginf(log_norm)
    safe = torch.where(empty, torch.zeros_like(log_norm), log_norm)
    if kind == "prob":
        conf = torch.exp(dist.gather(-1, tokens[:, None]).squeeze(-1) - safe)
        least = 0.0
    elif kind == "margin":
        if dist.shape[-1] == 1:
            conf = torch.exp(dist[:, 0] - safe)
        else:
            top2 = torch.exp(dist.topk(2, dim=-1).values - safe[:, None])
            conf = top2[:, 0] - top2[:, 1]
        least = 0.0
    else:
        # softmax's own normalisation (by the maximum): a shift by the log-normaliser would add an
        # absolute error of ulp(log_norm) to every probability, large against a small entropy.
        probs = torch.softmax(dist, -1)
        conf = torch.special.xlogy(probs, probs).sum(-1)
        least = NEG_INF
    return torch.where(empty, torch.full_like(conf, least), conf)


def _suppressed(x: Tensor, ids: Optional[Tensor], owned: bool) -> Tensor:
    """``x`` with the ``ids`` columns at -inf (in place when the caller owns ``x``)."""
    if ids is None or ids.numel() == 0:
        return x
    return suppress_columns_(x if owned else x.clone(), ids, x.shape[1])


def predict_rows(x: Tensor, params: RowParams, offset: int, *, suppress: Optional[Tensor], owned: bool,
                 confidence: Optional[str], confidence_from: str = "raw", confidence_suppress: Optional[Tensor] = None,
                 return_argmax: bool = False):
    """Tokens, confidences (or None), argmax (or None) and invalid flags of the rows of ``x``.

    ``owned``: ``x`` is a private copy (a gathered subset) that may be modified in place.
    """
    t = params.tempering()
    any_filter = params.any_filter() is not False
    unit = params.unit_temperature()
    all_greedy = params.all_greedy() is True
    scored = confidence not in (None, "random")
    # The confidence is measured on the race's own distribution (its tile statistics serve).
    same_dist = confidence_from == "sampling" or (unit and not any_filter)
    # The filters, a hot row's argmax and a raw confidence that is not the race's distribution
    # read the suppressed logits; otherwise the suppression goes into the tempered copy only.
    need_x = any_filter or (return_argmax and not all_greedy) or (scored and not same_dist)
    if need_x:
        x = _suppressed(x, suppress, owned)
        owned = owned or (suppress is not None and suppress.numel() > 0)
    theta = filter_threshold(x, t, params) if any_filter else None  # None: no row filters
    tiles = tempered_tiles(x, t, theta, unit_temperature=unit, suppress=None if need_x else suppress)
    greedy = None if all_greedy or params.any_greedy() is False else params.column("temperature") == 0
    tokens = race(tiles, params, offset, greedy=greedy, all_greedy=all_greedy)
    bad = tiles.bad()
    argmax = None
    if return_argmax:
        argmax = tokens if all_greedy else x.argmax(-1)

    conf = None
    if confidence == "random":
        conf = row_uniform(params.seed, offset, STREAM_CONFIDENCE, params.row_ids)
    elif scored:
        has_conf_ids = confidence_suppress is not None and confidence_suppress.numel() > 0
        if same_dist:
            # The race is done with the tempered copy: the confidence may overwrite it.
            log_norm = tiles.log_norm() if confidence == "prob" and not has_conf_ids else None
            dist = suppress_columns_(tiles.zp, confidence_suppress, tiles.vocab) if has_conf_ids else tiles.zp
        else:
            dist = x.float()
            if has_conf_ids:
                dist = _suppressed(dist, confidence_suppress, owned=owned or dist is not x)
            log_norm = None
        conf = _confidence(dist, tokens, confidence, log_norm)
    return tokens, conf, argmax, bad


def _predict_chunked(logits2d: Tensor, picked: Optional[Tensor], params: RowParams, offset: int, *,
                     suppress: Optional[Tensor], confidence: Optional[str], confidence_from: str = "raw",
                     confidence_suppress: Optional[Tensor] = None, return_argmax: bool = False):
    """:func:`predict_rows` of the rows ``picked`` of ``logits2d`` (None: every row; ``params`` are
    theirs), in row chunks of bounded memory; a chunk of picked rows is gathered on its own."""
    n = logits2d.shape[0] if picked is None else picked.shape[0]
    chunks = row_chunks(logits2d, n)
    kwargs = dict(suppress=suppress, confidence=confidence, confidence_from=confidence_from,
                  confidence_suppress=confidence_suppress, return_argmax=return_argmax)
    if len(chunks) == 1:
        x = logits2d if picked is None else logits2d.index_select(0, picked)
        return predict_rows(x, params, offset, owned=picked is not None, **kwargs)
    out = None
    for start, stop in chunks:
        x = logits2d[start:stop] if picked is None else logits2d.index_select(0, picked[start:stop])
        part = predict_rows(x, params.chunk(start, stop), offset, owned=picked is not None, **kwargs)
        del x
        if out is None:
            out = [None if p is None else p.new_empty((n,) + tuple(p.shape[1:])) for p in part]
        for buffer, p in zip(out, part):
            if buffer is not None:
                buffer[start:stop] = p
    return tuple(out)


def _picked_rows(mask: Optional[Tensor]) -> Optional[Tensor]:
    """Indices of the rows to compute, or None for every row.

    Off the host (MPS, CUDA) the row indices would need a device sync: every row is computed
    and the mask applied to the results instead.
    """
    if mask is None or not host_readable(mask) or bool(mask.all()):
        return None
    return torch.nonzero(mask).squeeze(-1)


def predict_tokens(logits2d: Tensor, mask: Optional[Tensor], suppress: Optional[Tensor], temperature: Param,
                   top_k: Param, top_p: Param, min_p: Param, seed: Param, offset: int, *, confidence: str,
                   confidence_from: str, top_p_mode: str = "inclusive", confidence_suppress: Optional[Tensor] = None,
                   return_argmax: bool = False):
    """``(tokens, confidence, argmax or None, bad)`` of ``ddiff.predict_tokens`` for [R, V] logits.

    Rows outside ``mask`` get token -1, confidence -inf (argmax -1) and are never read.
    """
    rows, vocab = logits2d.shape
    device = logits2d.device
    params = RowParams(rows, vocab, device, temperature, top_k, top_p, min_p, seed, top_p_mode=top_p_mode)
    picked = _picked_rows(mask)
    if picked is not None:
        params = params.select(picked)
    if (rows if picked is None else picked.shape[0]) == 0:
        tokens = torch.full((rows,), -1, dtype=torch.int64, device=device)
        conf = torch.full((rows,), NEG_INF, dtype=torch.float32, device=device)
        return tokens, conf, (tokens.clone() if return_argmax else None), torch.zeros(rows, dtype=torch.bool,
                                                                                       device=device)
    tokens, conf, argmax, bad = _predict_chunked(logits2d, picked, params, offset, suppress=suppress,
                                                 confidence=confidence, confidence_from=confidence_from,
                                                 confidence_suppress=confidence_suppress, return_argmax=return_argmax)
    if picked is None:
        if mask is None or host_readable(mask):
            return tokens, conf, argmax, bad
        return (torch.where(mask, tokens, -1), torch.where(mask, conf, NEG_INF),
                None if argmax is None else torch.where(mask, argmax, -1), bad & mask)
    full_tokens = torch.full((rows,), -1, dtype=torch.int64, device=device).index_copy_(0, picked, tokens)
    full_conf = torch.full((rows,), NEG_INF, dtype=torch.float32, device=device).index_copy_(0, picked, conf)
    full_argmax = None
    if argmax is not None:
        full_argmax = torch.full((rows,), -1, dtype=torch.int64, device=device).index_copy_(0, picked, argmax)
    full_bad = torch.zeros(rows, dtype=torch.bool, device=device).index_copy_(0, picked, bad)
    return full_tokens, full_conf, full_argmax, full_bad


def unmask_probability(alpha_t: Tensor, alpha_s: Tensor) -> Tensor:
    from ddiff.reference.decoding import unmask_probability as definition

    return definition(alpha_t, alpha_s)


def mdlm_step(logits2d: Tensor, x_t: Tensor, mask_token_id: int, alpha_t: Tensor, alpha_s: Tensor, temperature: Param,
              top_k: Param, top_p: Param, min_p: Param, seed: Param, offset: int, top_p_mode: str = "inclusive"):
    """``(x_s, bad)`` of ``ddiff.mdlm_step`` for [R, V] logits and [R] tokens.

    The posterior coin is drawn for the masked rows only, and only the rows it reveals are read;
    ``bad`` flags revealed rows whose logits cannot be sampled (they stay masked).
    """
    rows, vocab = logits2d.shape
    device = logits2d.device
    params = RowParams(rows, vocab, device, temperature, top_k, top_p, min_p, seed, top_p_mode=top_p_mode)
    suppress = torch.tensor([mask_token_id], dtype=torch.int64, device=device)
    if not host_readable(x_t):
        # No row indices off the host (a device sync): every row is drawn, the coin selects.
        reveal = (x_t == mask_token_id) & (row_uniform(params.seed, offset, STREAM_POSTERIOR, params.row_ids)
                                           < unmask_probability(alpha_t, alpha_s))
        tokens, _, _, bad = _predict_chunked(logits2d, None, params, offset, suppress=suppress, confidence=None)
        bad = bad & reveal
        return torch.where(reveal & ~bad, tokens, x_t), bad
    masked_rows = torch.nonzero(x_t == mask_token_id).squeeze(-1)
    bad = torch.zeros(rows, dtype=torch.bool, device=device)
    if masked_rows.numel() == 0:
        return x_t.clone(), bad
    seed_m = params.select(masked_rows).seed
    coin = row_uniform(seed_m, offset, STREAM_POSTERIOR, masked_rows)
    gate = unmask_probability(alpha_t[masked_rows], alpha_s[masked_rows])
    picked = masked_rows[coin < gate]
    x_s = x_t.clone()
    if picked.numel() == 0:
        return x_s, bad
    sub = params.select(picked)
    tokens, _, _, sub_bad = _predict_chunked(logits2d, picked, sub, offset, suppress=suppress, confidence=None)
    x_s.index_copy_(0, picked, torch.where(sub_bad, x_t[picked], tokens))
    return x_s, bad.index_copy_(0, picked, sub_bad)


def udlm_step(logits2d: Tensor, x_t: Tensor, alpha_t: Tensor, alpha_s: Tensor, seed: Param, offset: int):
    """``(x_s, bad)`` of ``ddiff.udlm_step``: the reference's three-part posterior mixture."""
    rows, vocab = logits2d.shape
    device = logits2d.device
    params = RowParams(rows, vocab, device, (None, 1.0), (None, 0), (None, 1.0), (None, 0.0), seed)
    if rows == 0:
        return x_t.clone(), torch.zeros(0, dtype=torch.bool, device=device)
    model_tokens = torch.empty(rows, dtype=torch.int64, device=device)
    p_xt = torch.empty(rows, dtype=torch.float32, device=device)
    bad = torch.empty(rows, dtype=torch.bool, device=device)
    for start, stop in row_chunks(logits2d):
        sub = params.chunk(start, stop)
        tiles = tempered_tiles(logits2d[start:stop], sub.tempering(), None, unit_temperature=True)
        model_tokens[start:stop] = race(tiles, sub, offset, greedy=None, all_greedy=False)
        p_xt[start:stop] = tiles.prob_of(x_t[start:stop])
        bad[start:stop] = tiles.bad()
        del tiles
    return udlm_choose(model_tokens, p_xt, x_t, alpha_t, alpha_s, vocab, params.seed, offset, params.row_ids), bad


def udlm_choose(model_tokens, p_xt, x_t, alpha_t, alpha_s, vocab: int, seed, offset: int, row_ids: Tensor) -> Tensor:
    """``reference.decoding.udlm_choose`` with the fast uniforms (float64 where the device has it)."""
    from ddiff.reference.decoding import udlm_posterior_weights

    acc = torch.float32 if p_xt.device.type == "mps" else torch.float64
    w_model, w_uniform, w_keep = udlm_posterior_weights(p_xt.to(acc), alpha_t.to(acc), alpha_s.to(acc), vocab)
    total = w_model + w_uniform + w_keep
    u = row_uniform(seed, offset, STREAM_POSTERIOR, row_ids, 0).to(acc) * total
    u_token = row_uniform(seed, offset, STREAM_POSTERIOR, row_ids, 1).to(acc)
    uniform_tokens = torch.clamp((u_token * vocab).long(), max=vocab - 1)
    out = torch.where(u < w_model, model_tokens, uniform_tokens)
    return torch.where(u >= w_model + w_uniform, x_t, out)
