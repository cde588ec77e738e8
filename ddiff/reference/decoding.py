"""Plain PyTorch references for the decoding ops: ``predict_tokens``, ``mdlm_step``, ``udlm_step``.

Rows are the flattened ``[B, L]`` positions: row ``b * L + l``. Tokens are drawn exactly as
``ddiff.reference.sampling.sample_reference`` draws them (same noise streams), so a seed gives
the same tokens as ``ddiff.sample`` on the flattened logits.
"""

from __future__ import annotations

import torch

from ddiff.reference.rng import STREAM_CONFIDENCE, STREAM_POSTERIOR, philox_uniform
from ddiff.reference.sampling import invalid_rows, keep_mask, sample_reference

CONFIDENCE_KINDS = ("prob", "margin", "neg_entropy", "random")


def suppress(logits2d: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """Copy of the logits with the ``ids`` columns set to -inf (LLaDA's ``logits_eos_inf``)."""
    if ids is None or ids.numel() == 0:
        return logits2d
    out = logits2d.clone()
    out[:, ids] = float("-inf")
    return out


def row_uniform(seed_rows: torch.Tensor, offset: int, stream: int, index: int = 0, row_ids=None) -> torch.Tensor:
    """One uniform per row from ``stream`` (fp32, in (0, 1]); ``row_ids`` default to 0..R-1."""
    rows = torch.arange(seed_rows.numel(), device=seed_rows.device) if row_ids is None else row_ids
    return philox_uniform(seed_rows, offset, rows, torch.full_like(rows, index), stream)


def confidence_of(dist_logits: torch.Tensor, tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """Confidence of ``tokens`` under ``softmax(dist_logits)`` (fp32 [R, V], -inf = excluded).

    ``prob``: p[token] (LLaDA low_confidence, Dream maskgit_plus, Fast-dLLM);
    ``margin``: top-1 minus top-2 probability (Dream topk_margin; 0 for the second when V = 1);
    ``neg_entropy``: sum p log p (Dream entropy; 0 log 0 = 0).
    A row whose distribution is empty (every entry -inf, which ``confidence_suppress_tokens``
    can cause) gets the least value of its kind: 0 for ``prob`` and ``margin``, ``-inf`` for
    ``neg_entropy``.
    """
    empty = torch.isneginf(dist_logits).all(-1)
    probs = torch.softmax(dist_logits, dim=-1)
    if kind == "prob":
        conf = probs.gather(-1, tokens[:, None]).squeeze(-1)
    elif kind == "margin":
        if probs.shape[-1] == 1:
            conf = probs[:, 0]
        else:
            top2 = probs.topk(2, dim=-1).values
            conf = top2[:, 0] - top2[:, 1]
    else:
        conf = torch.special.xlogy(probs, probs).sum(-1)
    least = float("-inf") if kind == "neg_entropy" else 0.0
    return torch.where(empty, torch.full_like(conf, least), conf)


def predict_tokens_reference(logits2d, mask, temperature, top_k, top_p, min_p, seed_rows, offset: int, *,
                             confidence: str, confidence_from: str, suppress_ids=None, row_ids=None,
                             top_p_mode: str = "inclusive", confidence_suppress_ids=None, return_argmax: bool = False):
    """Tokens and confidences for every row; rows with ``mask`` False get (-1, -inf).

    The token is ``sample_reference`` on the suppressed logits. The confidence is measured
    under ``softmax(suppressed logits)`` (``confidence_from="raw"``: LLaDA, Fast-dLLM, dInfer)
    or under the tempered and filtered sampling distribution (``"sampling"``: Dream, the
    diffusers BlockRefinement scheduler; at temperature 0 it is the filtered softmax at
    temperature 1). ``"random"`` is a uniform from its own stream (LLaDA remasking="random").

    ``confidence_suppress_ids`` are set to -inf in the distribution the confidence is measured
    under only (after the filters; the kept set is not recomputed), never in the one the token
    is drawn from: LLaDA ``generate``'s ``confidence_eos_eot_inf``. A drawn token among them
    has ``prob`` confidence 0. With ``return_argmax`` a third output holds the first argmax of
    the suppressed logits per row (-1 where ``mask`` is False).
    """
    rows = logits2d.shape[0]
    if mask is not None:
        # Only the masked rows are computed; the noise is keyed on the row index, so the
        # subset draws what the whole batch would.
        picked = torch.nonzero(mask).squeeze(-1)
        sub = predict_tokens_reference(
            logits2d[picked], None, temperature[picked], top_k[picked], top_p[picked], min_p[picked],
            seed_rows[picked], offset, confidence=confidence, confidence_from=confidence_from,
            suppress_ids=suppress_ids, row_ids=picked, top_p_mode=top_p_mode,
            confidence_suppress_ids=confidence_suppress_ids, return_argmax=return_argmax)
        tokens = torch.full((rows,), -1, dtype=torch.int64, device=logits2d.device)
        conf = torch.full((rows,), float("-inf"), dtype=torch.float32, device=logits2d.device)
        out = (tokens.index_copy(0, picked, sub[0]), conf.index_copy(0, picked, sub[1]))
        if return_argmax:
            out += (torch.full_like(tokens, -1).index_copy(0, picked, sub[2]),)
        return out
    x = suppress(logits2d, suppress_ids)
    tokens, _ = sample_reference(x, temperature, top_k, top_p, min_p, seed_rows, offset, row_ids=row_ids,
                                 top_p_mode=top_p_mode)
    if confidence == "random":
        conf = row_uniform(seed_rows, offset, STREAM_CONFIDENCE, row_ids=row_ids)
    else:
        if confidence_from == "raw":
            dist = x.float()
        else:
            keep, z = keep_mask(x, temperature, top_k, top_p, min_p, top_p_mode)
            dist = z.masked_fill(~keep, float("-inf"))
        conf = confidence_of(suppress(dist, confidence_suppress_ids), tokens, confidence)
    if return_argmax:
        return tokens, conf.float(), torch.argmax(x.float(), dim=-1)
    return tokens, conf.float()


def masked_invalid_rows(logits2d, mask, temperature, suppress_ids=None):
    bad = invalid_rows(suppress(logits2d, suppress_ids), temperature)
    return bad if mask is None else bad & mask


def unmask_probability(alpha_t: torch.Tensor, alpha_s: torch.Tensor) -> torch.Tensor:
    """MDLM's chance that a masked token is revealed between t and s: (α_s − α_t) / (1 − α_t)."""
    denom = 1.0 - alpha_t
    return torch.where(denom > 0, (alpha_s - alpha_t) / torch.where(denom > 0, denom, 1.0), torch.ones_like(alpha_t))


def mdlm_step_reference(logits2d, x_t, mask_token_id: int, alpha_t, alpha_s, temperature, top_p, seed_rows,
                        offset: int, top_k=None, min_p=None, top_p_mode: str = "inclusive"):
    """One ancestral step of the absorbing (SUBS) posterior (MDLM ``_ddpm_update``).

    A masked row un-masks when its posterior coin ``u < (α_s − α_t)/(1 − α_t)`` (uniform from
    ``STREAM_POSTERIOR``), to a token sampled from filter(softmax(logits / T)) with the mask
    logit at -inf (top-k for Dream ``alg="origin"``, top-p for BD3LM's nucleus sampling with
    ``top_p_mode="bd3lm"``, min-p). Other rows are copied. ``top_k`` / ``min_p``: [R] tensors
    or None (no filter).
    """
    rows = logits2d.shape[0]
    masked = x_t == mask_token_id
    reveal = masked & (row_uniform(seed_rows, offset, STREAM_POSTERIOR) < unmask_probability(alpha_t, alpha_s))
    if top_k is None:
        top_k = torch.zeros(rows, dtype=torch.int64, device=x_t.device)
    if min_p is None:
        min_p = torch.zeros(rows, dtype=torch.float32, device=x_t.device)
    tokens, _ = predict_tokens_reference(
        logits2d, reveal, temperature, top_k, top_p, min_p, seed_rows, offset,
        confidence="prob", confidence_from="raw", suppress_ids=torch.tensor([mask_token_id], device=x_t.device),
        top_p_mode=top_p_mode,
    )
    return torch.where(reveal, tokens, x_t)


def udlm_posterior_weights(p_xt: torch.Tensor, alpha_t, alpha_s, vocab: int):
    """Mixture weights of the uniform-noise posterior (UDLM, discrete-diffusion-guidance).

    With x̂0 = softmax(logits), α_ts = α_t / α_s and N = V:
    ``q(x_s = j) ∝ (α_s − α_t) x̂0_j + (1 − α_ts)(1 − α_s)/N + [j = x_t] (α_t N x̂0_{x_t} + α_ts − α_t)``,
    normalised by ``α_t N x̂0_{x_t} + 1 − α_t``. Returns the (unnormalised) weights of its three
    components: draw from x̂0, draw uniformly, keep x_t.
    """
    alpha_ts = torch.where(alpha_s > 0, alpha_t / torch.where(alpha_s > 0, alpha_s, 1.0), torch.zeros_like(alpha_t))
    w_model = alpha_s - alpha_t
    w_uniform = (1.0 - alpha_ts) * (1.0 - alpha_s)
    w_keep = alpha_t * vocab * p_xt + alpha_ts - alpha_t
    return w_model, w_uniform, w_keep


def udlm_choose(model_tokens, p_xt, x_t, alpha_t, alpha_s, vocab: int, seed_rows, offset: int):
    """Pick the posterior component per row from two uniforms of ``STREAM_POSTERIOR``."""
    w_model, w_uniform, w_keep = udlm_posterior_weights(p_xt.double(), alpha_t.double(), alpha_s.double(), vocab)
    total = w_model + w_uniform + w_keep
    u = row_uniform(seed_rows, offset, STREAM_POSTERIOR, 0).double() * total
    u_token = row_uniform(seed_rows, offset, STREAM_POSTERIOR, 1).double()
    uniform_tokens = torch.clamp((u_token * vocab).long(), max=vocab - 1)
    out = torch.where(u < w_model, model_tokens, uniform_tokens)
    return torch.where(u >= w_model + w_uniform, x_t, out)


def udlm_step_reference(logits2d, x_t, alpha_t, alpha_s, seed_rows, offset: int):
    rows, vocab = logits2d.shape
    ones = torch.ones(rows, dtype=torch.float32, device=x_t.device)
    model_tokens, _ = sample_reference(logits2d, ones, torch.zeros_like(x_t), ones, 0 * ones, seed_rows, offset)
    p_xt = torch.softmax(logits2d.float(), -1).gather(-1, x_t[:, None]).squeeze(-1)
    return udlm_choose(model_tokens, p_xt, x_t, alpha_t, alpha_s, vocab, seed_rows, offset)
