"""Plain PyTorch references for the token-selection ops.

These are the ground truth the Triton kernel in ``ddiff.kernels.selection`` is tested
against, and they are what ``backend="torch"`` runs. Everything is vectorised over the
batch: no Python loop over rows, no host synchronisation.

Conventions shared by every rule (and by the kernel):

* Comparisons happen in fp32: the confidence is cast to fp32 (fp16/bf16 exactly, fp64 by
  rounding) and a Python-float threshold is rounded to fp32, which is also what
  ``fp32_tensor > python_float`` does in PyTorch.
* NaN confidences count as ``-inf``; ``-0.0`` and ``+0.0`` are equal.
* "The k most confident" means the first k candidates in the order (confidence
  descending, position ascending): among tied confidences the lower positions win.
* A row without candidates (``mask`` all False) selects nothing.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ddiff.reference.rng import STREAM_SELECT, philox_gumbel

Number = Union[int, float]

# Rule codes shared with the ops layer and the kernel.
RULE_TOPK = 0
RULE_THRESHOLD = 1
RULE_BOTH = 2
RULE_FACTOR = 3
RULE_ENTROPY_BOUND = 4

__all__ = [
    "RULE_BOTH",
    "RULE_ENTROPY_BOUND",
    "RULE_FACTOR",
    "RULE_THRESHOLD",
    "RULE_TOPK",
    "entropy_bound_count_reference",
    "factor_count_reference",
    "num_transfer_tokens_reference",
    "select_edits_reference",
    "selection_keys_reference",
    "select_transfer_reference",
]


def _canonical_confidence(confidence: torch.Tensor) -> torch.Tensor:
    c = confidence.to(torch.float32)
    return torch.where(torch.isnan(c), torch.full_like(c, float("-inf")), c)


def _candidate_order(c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row permutation: candidates first, by (confidence desc, position asc)."""
    masked = c.masked_fill(~mask, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    # A candidate whose confidence is -inf ties with the non-candidates: a second stable
    # sort on "is not a candidate" moves every candidate in front without reordering them.
    not_cand = (~mask.gather(1, order)).to(torch.uint8)
    return order.gather(1, torch.sort(not_cand, dim=1, stable=True).indices)


def _per_row(value, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reshape(-1).expand(batch)
    return torch.full((batch,), value, dtype=dtype, device=device)


def factor_count_reference(sorted_conf: torch.Tensor, n_cand: torch.Tensor, factor) -> torch.Tensor:
    """How many tokens Fast-dLLM's dynamic rule commits, per row.

    ``sorted_conf`` is [B, L] fp32 with each row's candidate confidences first, in
    descending order (c_1 >= c_2 >= ... >= c_N); ``n_cand`` is N per row.

    Fast-dLLM (``get_transfer_index_dynamic``, llada/generate.py and the Dream port):
    rank n (1-indexed) has the bar ``t_n = 1 - factor / (n + 1)``, computed in float64 and
    compared after rounding to the confidence dtype; rank 1's bar is -1 (always passes).
    Walking down the ranks, the first rank n >= 2 with ``c_n < t_n`` stops the walk and
    the top ``n - 1`` are committed; if no rank fails, all N are. Faithful to the source,
    a first failure at the very last rank (n == N) still commits all N, and a row with
    no candidates commits nothing.
    """
    batch, length = sorted_conf.shape
    device = sorted_conf.device
    f = _per_row(factor, batch, torch.float64, device)[:, None]
    ranks = torch.arange(1, length + 1, device=device, dtype=torch.float64)
    bars = (1.0 - f / (ranks + 1.0)).to(torch.float32)  # [B, L]
    j = torch.arange(length, device=device)
    n = n_cand.to(torch.int64)[:, None]
    fails = (sorted_conf < bars) & (j >= 1) & (j < n)
    first_fail = torch.where(
        fails.any(dim=1), fails.to(torch.int8).argmax(dim=1) + 1, n_cand.to(torch.int64) + 1
    )  # 1-indexed rank of the first failure, N + 1 if none
    passed = first_fail - 1
    n_cand = n_cand.to(torch.int64)
    return torch.where(passed >= n_cand - 1, n_cand, passed)


def entropy_bound_count_reference(sorted_conf: torch.Tensor, n_cand: torch.Tensor, bound) -> torch.Tensor:
    """How many tokens the entropy-bound rule commits, per row (arXiv 2505.24857).

    ``sorted_conf`` is [B, L] fp32 with each row's candidate confidences first, in
    descending order; ``n_cand`` is N per row. A candidate's cost is its entropy,
    ``e = max(-confidence, 0)`` (the confidence is ``predict_tokens``' ``neg_entropy``;
    ``-inf`` costs ``+inf``). Rank n (1-indexed) is accepted when the costs of the ranks
    before it sum to at most the bound: ``e_1 + ... + e_{n-1} <= bound``, i.e.
    ``sum(e_1..e_n) - max(e_1..e_n) <= bound`` as DiffusionGemma's ``EntropyBoundSampler``
    writes it. The sums are accumulated in float64 and compared with the bound rounded to
    fp32. The left side only grows with n, so the accepted ranks are the first k; rank 1
    always passes (an empty sum is 0), so k >= 1 whenever N >= 1.
    """
    batch, length = sorted_conf.shape
    device = sorted_conf.device
    b = _per_row(bound, batch, torch.float32, device).to(torch.float64)[:, None]
    j = torch.arange(length, device=device)
    in_row = j[None, :] < n_cand.to(torch.int64)[:, None]
    cost = torch.where(in_row, (-sorted_conf.to(torch.float64)).clamp_min(0.0), torch.zeros((), dtype=torch.float64,
                                                                                            device=device))
    # Exclusive prefix sums without a subtraction, so an infinite cost never meets inf - inf.
    before = torch.cat([torch.zeros_like(cost[:, :1]), torch.cumsum(cost, dim=1)[:, :-1]], dim=1)
    return (in_row & (before <= b)).sum(dim=1)


def select_transfer_reference(
    confidence: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_transfer: Optional[Union[int, torch.Tensor]] = None,
    threshold: Optional[Union[Number, torch.Tensor]] = None,
    factor: Optional[Union[Number, torch.Tensor]] = None,
    entropy_bound: Optional[Union[Number, torch.Tensor]] = None,
    min_transfer: int = 1,
) -> torch.Tensor:
    """Which masked positions to commit this step. Returns a bool [B, L] tensor.

    Only positions with ``mask`` True (the candidates) can be chosen. Let N be the number
    of candidates in a row and "top-k" the k most confident candidates (ties: lower
    position first). The rules:

    * ``num_transfer=k`` only (LLaDA ``low_confidence`` remasking): top-min(k, N).
    * ``threshold=τ`` only (Fast-dLLM parallel decoding, dInfer): every candidate with
      confidence > τ (strict); if that is fewer than ``min_transfer``, the
      top-min(min_transfer, N) instead, so at least one token is committed by default.
    * ``num_transfer=k`` and ``threshold=τ`` (SDAR ``low_confidence_dynamic``, diffusers
      BlockRefinementScheduler): all candidates above τ if there are at least k of them,
      else the top-min(k, N). ``min_transfer`` is not used.
    * ``factor=f`` (Fast-dLLM ``get_transfer_index_dynamic``): the top-n, with n from
      :func:`factor_count_reference`.
    * ``entropy_bound=b`` (DiffusionGemma's ``EntropyBoundSampler``; ``confidence`` is the
      negative entropy): the top-n, with n from :func:`entropy_bound_count_reference`.

    ``num_transfer``, ``threshold``, ``factor`` and ``entropy_bound`` may be Python scalars or [B] tensors.
    Negative per-row ``num_transfer`` entries count as 0. No argument checking happens
    here: :func:`ddiff.ops.select_transfer` validates.
    """
    batch, length = confidence.shape
    device = confidence.device
    mask = mask.to(torch.bool)
    if batch == 0 or length == 0:
        return torch.zeros((batch, length), dtype=torch.bool, device=device)
    c = _canonical_confidence(confidence)
    order = _candidate_order(c, mask)
    positions = torch.arange(length, device=device, dtype=torch.int64).expand(batch, length)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # 0-indexed rank per position
    n_cand = mask.sum(dim=1)

    def top(k):
        return torch.minimum(k.to(torch.int64).clamp_min(0), n_cand)

    if factor is not None:
        k_eff = factor_count_reference(c.gather(1, order), n_cand, factor)
    elif entropy_bound is not None:
        k_eff = entropy_bound_count_reference(c.gather(1, order), n_cand, entropy_bound)
    else:
        if threshold is not None:
            thr = _per_row(threshold, batch, torch.float32, device)
            n_pass = (mask & (c > thr[:, None])).sum(dim=1)
        if num_transfer is not None:
            k = top(_per_row(num_transfer, batch, torch.int64, device))
            k_eff = k if threshold is None else torch.maximum(n_pass, k)
        else:
            floor = top(torch.full((batch,), min_transfer, dtype=torch.int64, device=device))
            k_eff = torch.maximum(n_pass, floor)
    # Taking the top max(n_pass, k) is the same as "all passers if there are >= k of
    # them, else the top k": the passers are exactly the top n_pass.
    return mask & (rank < k_eff[:, None])


def selection_keys_reference(confidence: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                             offset: int) -> torch.Tensor:
    """Gumbel-top-k keys of ``select_transfer(..., temperature=τ)``: fp32 ``[B, L]``.

    A row's key is ``c / τ + G`` with ``G = philox_gumbel(seed_b, offset, row=b, index=l,
    STREAM_SELECT)``, so its top-k is k positions drawn without replacement with probabilities
    ``softmax(c / τ)`` over the candidates (Gumbel-top-k; Vieira 2014, Kool et al. 2019): Dream's
    ``multinomial(softmax(confidence / alg_temp), k)``. NaN confidences count as ``-inf`` and
    ``-inf`` stays ``-inf``; a row with ``τ = 0`` keeps its confidence (the deterministic top-k).
    ``temperature`` and ``seeds`` are ``[B]`` tensors.
    """
    c = _canonical_confidence(confidence)
    batch, length = c.shape
    rows = torch.arange(batch, device=c.device)[:, None]
    cols = torch.arange(length, device=c.device)[None, :]
    gumbel = philox_gumbel(seeds.to(c.device)[:, None], offset, rows, cols, STREAM_SELECT)
    tau = temperature.to(device=c.device, dtype=torch.float32)[:, None]
    sampled = c / torch.where(tau > 0, tau, torch.ones_like(tau)) + gumbel
    sampled = torch.where(torch.isneginf(c), c, sampled)
    return torch.where(tau > 0, sampled, c)


def num_transfer_tokens_reference(mask: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's ``get_num_transfer_tokens``: split each row's masked count n over ``steps``.

    Every step gets ``n // steps`` tokens and the first ``n % steps`` steps one more.
    Returns int64 [B, steps].
    """
    n = mask.sum(dim=1, keepdim=True).to(torch.int64)
    base = n // steps
    extra = torch.arange(steps, device=mask.device)[None, :] < (n % steps)
    return base + extra.to(torch.int64)


def select_edits_reference(pred_tokens, confidence, x, editable, threshold) -> torch.Tensor:
    """LLaDA2's token editing: re-write an editable position whose prediction differs
    from the current token and whose confidence is strictly above ``threshold``."""
    batch = confidence.shape[0]
    c = _canonical_confidence(confidence)
    thr = _per_row(threshold, batch, torch.float32, confidence.device)[:, None]
    return editable.to(torch.bool) & (pred_tokens != x) & (c > thr)
