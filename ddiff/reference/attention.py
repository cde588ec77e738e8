"""Plain PyTorch reference for DFlash block-diagonal anchor attention.

The rule
--------
A DFlash training step packs ``N`` anchor blocks of one sequence into a single attention call.

* Queries are ``N`` blocks of ``block_size`` noise tokens: ``q[:, :, b * block_size + i]`` is token
  ``i`` of block ``b``.
* Keys and values are ``[context (context_len tokens) | block_0 | ... | block_{N-1}]``: key position
  ``j < context_len`` is context token ``j``; key position ``context_len + b * block_size + i`` is
  token ``i`` of noise block ``b``.
* Query block ``b`` sees the context positions ``j < anchors[b]`` and every token of its own noise
  block (bidirectional inside the block), and nothing else. ``anchors[b] == 0`` means the block sees
  its own noise tokens only; ``anchors[b] == context_len`` means the whole context.
* A block with ``keep[b] == False`` sees nothing: its output is exactly zero and it neither receives
  nor sends any gradient.

Anchors may be unsorted and may repeat. Every kept query row sees at least its own block, so its
softmax is always well defined (no NaN, even with an empty context).

:func:`anchor_attention_reference` runs one SDPA per (batch row, block) over the keys that block
sees; :func:`anchor_attention_explicit` (an independent check) materialises the dense
``[B, N*block_size, context_len + N*block_size]`` mask. Both are meant for small shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def anchor_attention_mask(
    anchors: torch.Tensor, context_len: int, block_size: int, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense boolean mask ``[B, N*block_size, context_len + N*block_size]`` (True = attend).

    Rows of blocks with ``keep == False`` are all False.
    """
    B, N = anchors.shape
    device = anchors.device
    Lq = N * block_size
    q_idx = torch.arange(Lq, device=device)
    kv_idx = torch.arange(context_len + Lq, device=device)
    q_blk = q_idx // block_size  # [Lq]
    row_anchor = anchors.to(torch.int64)[:, q_blk]  # [B, Lq]
    context = kv_idx[None, None, :] < row_anchor[:, :, None]  # anchors <= context_len, so j < context_len
    noise_blk = torch.div(kv_idx - context_len, block_size, rounding_mode="floor")
    own = (kv_idx[None, :] >= context_len) & (noise_blk[None, :] == q_blk[:, None])  # [Lq, Lkv]
    mask = context | own[None]
    if keep is not None:
        mask = mask & keep.to(torch.bool)[:, q_blk][:, :, None]
    return mask


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def anchor_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    anchors: torch.Tensor,
    *,
    context_len: int,
    block_size: int,
    keep: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The rule written literally: one SDPA per (batch row, block) over exactly the keys that block
    sees, ``[context[:anchor] | own block]`` (see the module docstring).

    Keys and values a block must not see never enter its computation, so a NaN or inf there cannot
    reach its output (a dense-mask SDPA multiplies them by a zero weight: ``0 * NaN = NaN``).
    ``q``: [B, Hq, N*block_size, D]; ``k``, ``v``: [B, Hkv, context_len + N*block_size, D] with
    ``Hq % Hkv == 0`` (query head ``h`` reads key/value head ``h // (Hq // Hkv)``). Reads the anchors
    on the host (one sync). No input checks: :func:`ddiff.ops.anchor_attention` validates before
    calling this. Differentiable in q, k and v; dropped blocks (``keep == False``) are exact zeros
    with exactly zero gradients.
    """
    B, _, Lq, _ = q.shape
    k, v = _expand_kv(k, q.shape[1] // k.shape[1]), _expand_kv(v, q.shape[1] // k.shape[1])
    if B == 0 or Lq == 0:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)  # empty, with the autograd graph
    blocks = Lq // block_size
    anchor_rows = anchors.tolist()
    keep_rows = None if keep is None else keep.to(torch.bool).tolist()
    rows = []
    for b in range(B):
        outs = []
        for n in range(blocks):
            q_rows = slice(n * block_size, (n + 1) * block_size)
            own = slice(context_len + n * block_size, context_len + (n + 1) * block_size)
            seen = [slice(0, int(anchor_rows[b][n])), own]
            qb = q[b:b + 1, :, q_rows]
            kb = torch.cat([k[b:b + 1, :, s] for s in seen], dim=2)
            vb = torch.cat([v[b:b + 1, :, s] for s in seen], dim=2)
            dropped = keep_rows is not None and not keep_rows[b][n]
            if dropped:  # finite stand-ins: a zero upstream gradient times a NaN would still be NaN
                qb, kb, vb = (torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))
                              for t in (qb, kb, vb))
            out = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
            if dropped:
                # where, not a multiply: exact zeros and zero gradients, with every input still in
                # the graph (a step whose blocks are all dropped still reaches every parameter).
                out = torch.where(torch.zeros((), dtype=torch.bool, device=out.device), out, torch.zeros_like(out))
            outs.append(out)
        rows.append(torch.cat(outs, dim=2))
    return torch.cat(rows, dim=0)


def anchor_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    anchors: torch.Tensor,
    *,
    context_len: int,
    block_size: int,
    keep: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """One SDPA with the dense anchor mask: equal to :func:`anchor_attention_reference` when every
    key and value is finite (a non-finite one a block must not see still reaches it as
    ``0 * NaN``), and faster for many blocks. Same arguments."""
    groups = q.shape[1] // k.shape[1]
    mask = anchor_attention_mask(anchors, context_len, block_size, None)  # dropped rows stay defined
    out = F.scaled_dot_product_attention(
        q, _expand_kv(k, groups), _expand_kv(v, groups), attn_mask=mask[:, None], scale=scale
    )
    if keep is not None:
        row_keep = keep.to(torch.bool)[:, torch.arange(q.shape[2], device=q.device) // block_size]
        # where (not a multiply) so that the dropped rows' gradients are exactly zero.
        out = torch.where(row_keep[:, None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def anchor_attention_explicit(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    anchors: torch.Tensor,
    *,
    context_len: int,
    block_size: int,
    keep: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The same rule written as explicit softmax math (an independent check of the SDPA path)."""
    groups = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = anchor_attention_mask(anchors, context_len, block_size, keep)[:, None]  # [B, 1, Lq, Lkv]
    scores = torch.einsum("bhqd,bhkd->bhqk", q, _expand_kv(k, groups)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    row_live = mask.any(-1, keepdim=True)
    scores = torch.where(row_live, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    p = torch.softmax(scores, dim=-1) * row_live
    return torch.einsum("bhqk,bhkd->bhqd", p, _expand_kv(v, groups))


def anchor_mask_mod(anchors: torch.Tensor, context_len: int, block_size: int, keep: torch.Tensor | None = None):
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` for the anchor rule.

    ``anchors`` (and ``keep``) are captured, so build a new mask_mod when they change.
    """
    anchors = anchors.to(torch.int64)
    keep_b = None if keep is None else keep.to(torch.bool)

    def mask_mod(b, h, q_idx, kv_idx):
        blk = q_idx // block_size
        context = kv_idx < anchors[b, blk]
        own = (kv_idx >= context_len) & ((kv_idx - context_len) // block_size == blk)
        live = context | own
        if keep_b is not None:
            live = live & keep_b[b, blk]
        return live

    return mask_mod
