"""DFlash block-diagonal anchor attention: ``anchor_attention`` and its FlexAttention ``anchor_mask_mod``."""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ddiff._backend import launch_wrapper, resolve_backend
from ddiff._checks import check_dim, check_int, check_real, check_tensor, eager, is_integer_dtype
from ddiff.reference.attention import anchor_attention_dense, anchor_attention_reference
from ddiff.reference.attention import anchor_mask_mod as _anchor_mask_mod_ref

Tensor = torch.Tensor

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------
# Input checks, shared by every backend
# ---------------------------------------------------------------------------------------------


def _check_mask_args(anchors, context_len, block_size, keep, device=None, batch=None):
    context_len = check_int("context_len", context_len, 0)
    block_size = check_int("block_size", block_size, 1)
    check_tensor("anchors", anchors)
    if not is_integer_dtype(anchors.dtype):
        raise TypeError(f"`anchors` must be an integer tensor (int64), got {anchors.dtype}.")
    if anchors.dim() != 2:
        raise ValueError(f"`anchors` must have shape [B, N], got {tuple(anchors.shape)}.")
    if batch is not None and anchors.shape[0] != batch:
        raise ValueError(f"`anchors` has batch size {anchors.shape[0]} but `q` has {batch}.")
    if device is not None and anchors.device != device:
        raise ValueError(f"`anchors` is on {anchors.device} but `q` is on {device}.")
    if keep is not None:
        if not isinstance(keep, torch.Tensor):
            raise TypeError(f"`keep` must be a bool torch.Tensor or None, got {type(keep).__name__}.")
        if keep.dtype != torch.bool:
            raise TypeError(f"`keep` must be a bool tensor, got {keep.dtype}.")
        if keep.shape != anchors.shape:
            raise ValueError(
                f"`keep` must have the shape of `anchors` {tuple(anchors.shape)}, got {tuple(keep.shape)}."
            )
        if keep.device != anchors.device:
            raise ValueError(f"`keep` is on {keep.device} but `anchors` is on {anchors.device}.")
    if eager() and anchors.numel() > 0:
        # One host sync: skipped under torch.compile and inside ddiff.sync_checks(False).
        lo, hi = (int(x) for x in torch.aminmax(anchors))
        if lo < 0 or hi > context_len:
            raise ValueError(
                f"`anchors` must lie in [0, context_len={context_len}], got values in [{lo}, {hi}]."
            )
    return context_len, block_size


def _check_inputs(q, k, v, anchors, context_len, block_size, keep, scale) -> tuple[int, int, float]:
    """Validate every argument; return ``(context_len, block_size, scale)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        check_dim(name, t, 4, "[B, H, L, D]")
    if q.dtype not in _DTYPES:
        raise TypeError(f"`q` must be float16, bfloat16, float32 or float64, got {q.dtype}.")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"`{name}` has dtype {t.dtype} but `q` has {q.dtype}; they must match.")
        if t.device != q.device:
            raise ValueError(f"`{name}` is on {t.device} but `q` is on {q.device}.")
    if v.shape != k.shape:
        raise ValueError(f"`v` must have the shape of `k` {tuple(k.shape)}, got {tuple(v.shape)}.")
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, Dk = k.shape
    if k.shape[0] != B:
        raise ValueError(f"`k` has batch size {k.shape[0]} but `q` has {B}.")
    if Dk != D:
        raise ValueError(f"`k` has head dim {Dk} but `q` has {D}; they must match.")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={D} (last dim of `q`) is unsupported; supported: {SUPPORTED_HEAD_DIMS}.")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"`q` heads ({Hq}) must be a multiple of `k`/`v` heads ({Hkv}) (GQA).")
    context_len, block_size = _check_mask_args(anchors, context_len, block_size, keep, q.device, B)
    N = anchors.shape[1]
    if Lq != N * block_size:
        raise ValueError(
            f"`q` has length {Lq} but N * block_size = {N} * {block_size} = {N * block_size} "
            "(N = anchors.shape[1])."
        )
    if Lk != context_len + N * block_size:
        raise ValueError(
            f"`k`/`v` have length {Lk} but context_len + N * block_size = "
            f"{context_len} + {N * block_size} = {context_len + N * block_size}."
        )
    if scale is None:
        scale = D**-0.5
    else:
        scale = check_real("scale", scale, finite=True)
    return context_len, block_size, float(scale)


# ---------------------------------------------------------------------------------------------
# Triton path: forward and backward registered as triton_ops, joined by autograd
# ---------------------------------------------------------------------------------------------


@torch.library.triton_op("ddiff::anchor_attention_triton", mutates_args=())
def _anchor_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, anc: Tensor, perm: Tensor, context_len: int, block_size: int, scale: float,
    tiles: Optional[list[int]] = None,
) -> tuple[Tensor, Tensor]:
    from ddiff.kernels import anchor_attention as kernels

    return kernels.anchor_attention_fwd(q, k, v, anc, perm, context_len, block_size, scale, tiles,
                                        wrap=launch_wrapper())


@torch.library.triton_op("ddiff::anchor_attention_triton_backward", mutates_args=())
def _anchor_attention_triton_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, anc: Tensor, perm: Tensor,
    context_len: int, block_size: int, scale: float, tiles: Optional[list[int]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    from ddiff.kernels import anchor_attention as kernels

    return kernels.anchor_attention_bwd(grad_out, q, k, v, out, lse, anc, perm, context_len, block_size, scale,
                                        tiles, wrap=launch_wrapper())


def _setup_context(ctx, inputs, output):
    q, k, v, anc, perm, context_len, block_size, scale, tiles = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, anc, perm)
    ctx.args = (context_len, block_size, scale, tiles)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, anc, perm = ctx.saved_tensors
    context_len, block_size, scale, tiles = ctx.args
    dq, dk, dv = torch.ops.ddiff.anchor_attention_triton_backward(grad_out, q, k, v, out, lse, anc, perm,
                                                                   context_len, block_size, scale, tiles)
    return dq, dk, dv, None, None, None, None, None, None


_anchor_attention_triton.register_autograd(_backward, setup_context=_setup_context)


def triton_anchor_attention(q, k, v, anchors, keep, context_len: int, block_size: int, scale: float, tiles=None):
    """The Triton path on validated inputs; ``tiles`` overrides the kernels' tile sizes (tests)."""
    from ddiff.kernels import anchor_attention as kernels

    anc, perm = kernels.sort_blocks(anchors, keep)
    out, _ = torch.ops.ddiff.anchor_attention_triton(q, k, v, anc, perm, context_len, block_size, float(scale),
                                                     None if tiles is None else [int(t) for t in tiles])
    return out


# ---------------------------------------------------------------------------------------------
# FlexAttention path
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex_block_mask(anchors, context_len, block_size, keep, q_len, kv_len, device):
    """The FlexAttention BlockMask of the rule (compiled ``create_block_mask`` on CUDA).

    On CPU, torch 2.13's inductor fails to compile ``create_block_mask`` for this mask_mod, so the
    eager builder runs there (it materialises the Q x KV grid: small shapes only).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = _anchor_mask_mod_ref(anchors, context_len, block_size, keep)
    build = _compiled_create_block_mask() if device.type == "cuda" else create_block_mask
    return build(mask_mod, anchors.shape[0], None, q_len, kv_len, device=device)


def _flex_apply(q, k, v, block_mask, scale, keep, block_size):
    """FlexAttention with a prebuilt block mask (compiled on CUDA, eager on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = _compiled_flex_attention() if q.is_cuda else flex_attention
    out = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if keep is not None:
        row_keep = keep.repeat_interleave(block_size, dim=1)[:, None, :, None]
        out = torch.where(row_keep, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def _flex_anchor_attention(q, k, v, anchors, keep, context_len, block_size, scale):
    block_mask = _flex_block_mask(anchors, context_len, block_size, keep, q.shape[2], k.shape[2], q.device)
    return _flex_apply(q, k, v, block_mask, scale, keep, block_size)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def anchor_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    anchors: Tensor,
    *,
    context_len: int,
    block_size: int,
    keep: Optional[Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    r"""Block-diagonal anchor attention for DFlash draft-model training.

    ``N`` anchor blocks of ``block_size`` noise tokens are queried at once. Query block ``b`` attends
    to the context positions ``j < anchors[b]`` and to its own noise block (bidirectionally), and to
    nothing else::

        out[:, h, b*bs + i] = softmax_j(scale * q[:, h, b*bs + i] . k[:, h // G, j]) @ v[:, h // G, j]
        over j in {0 .. anchors[b]-1}  U  {context_len + b*bs .. context_len + (b+1)*bs - 1}

    Parameters
    ----------
    q : torch.Tensor
        Queries, shape ``[B, Hq, N * block_size, D]``: block ``b`` is rows ``b*block_size ...``.
        float16, bfloat16 or float32 (float64 on the ``"torch"`` and ``"flex"`` backends).
        ``D`` in ``(16, 32, 64, 128)``.
    k, v : torch.Tensor
        Keys and values, shape ``[B, Hkv, context_len + N * block_size, D]``: the context first, then
        the ``N`` noise blocks in the order of ``q``. Same dtype and device as ``q``; ``Hq`` must be a
        multiple of ``Hkv`` (GQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``).
    anchors : torch.Tensor
        Integer tensor (int64) ``[B, N]`` with values in ``[0, context_len]``: how many context tokens
        each block sees. Unsorted and repeated anchors are fine; ``0`` means the block sees only
        itself. Checked on the host (one sync), except under ``torch.compile`` and inside
        ``ddiff.sync_checks(False)``, where out-of-range anchors are clamped to
        ``[0, context_len]`` on the device instead (so no kernel reads past the context).
    context_len : int
        Number of context positions ``S`` at the front of ``k``/``v`` (may be 0).
    block_size : int
        Tokens per block (16 in DFlash).
    keep : torch.Tensor, optional
        bool ``[B, N]``. Blocks with ``keep == False`` output exactly zero and get (and give) exactly
        zero gradient, never NaN.
    scale : float, optional
        Softmax scale; default ``D ** -0.5``.
    backend : str
        ``"torch"``: SDPA with the dense ``[B, 1, N*bs, S + N*bs]`` mask while every query,
        key and value is finite (one host check), else the reference, one SDPA per (batch row, block)
        over exactly the keys that block sees: a NaN / inf key or value a block must not see never
        reaches it. Small sizes only. The triton kernels keep it out too (invisible key tiles are
        skipped, scores masked, and in a key tile a block only partly sees the non-finite keys and
        values are zeroed before the products), in the output and in every gradient. On both, a row
        that does see a non-finite key or value gets a non-finite output (on triton an inf may give
        NaN), and the keys no kept block sees get exactly zero dk / dv. ``"flex"``:
        FlexAttention with :func:`anchor_mask_mod` and a compiled
        ``create_block_mask`` (eager on CPU, where FlexAttention has no backward). ``"triton"``: the
        fused kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``). ``"auto"``: triton on CUDA,
        torch otherwise.

    Returns
    -------
    torch.Tensor
        ``[B, Hq, N * block_size, D]`` in the dtype of ``q``. Differentiable in ``q``, ``k``, ``v``.

    Example
    -------
    >>> B, Hq, Hkv, D, S, N, bs = 1, 4, 2, 64, 32, 3, 16
    >>> q = torch.randn(B, Hq, N * bs, D)
    >>> k = torch.randn(B, Hkv, S + N * bs, D); v = torch.randn_like(k)
    >>> anchors = torch.tensor([[20, 5, 32]])
    >>> out = anchor_attention(q, k, v, anchors, context_len=S, block_size=bs)
    >>> out.shape
    torch.Size([1, 4, 48, 64])
    """
    context_len, block_size, scale = _check_inputs(q, k, v, anchors, context_len, block_size, keep, scale)
    if not eager():  # the range check was skipped: keep every anchor inside the context
        anchors = anchors.clamp(0, context_len)
    backend = resolve_backend(backend, q, extra=("flex",))
    if backend == "triton" and q.dtype not in _TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports float16, bfloat16 and float32 `q`, got {q.dtype}; "
                        "use backend='torch' for float64.")
    if q.numel() == 0 or k.numel() == 0:  # nothing to launch: the reference handles empty shapes
        backend = "torch"

    if backend == "triton":
        return triton_anchor_attention(q, k, v, anchors, keep, context_len, block_size, scale)
    if backend == "flex":
        return _flex_anchor_attention(q, k, v, anchors, keep, context_len, block_size, scale)
    # The dense mask is exact while every query, key and value is finite (one check, one SDPA);
    # otherwise the per-block reference keeps what a block must not see out of it.
    finite = all(bool(torch.isfinite(t).all()) for t in (q, k, v))
    torch_path = anchor_attention_dense if finite else anchor_attention_reference
    return torch_path(q, k, v, anchors, context_len=context_len, block_size=block_size, keep=keep, scale=scale)


def anchor_mask_mod(anchors: Tensor, context_len: int, block_size: int, keep: Optional[Tensor] = None):
    r"""FlexAttention ``mask_mod`` for the anchor rule of :func:`anchor_attention`.

    Returns ``mask_mod(b, h, q_idx, kv_idx) -> bool``: True where query ``q_idx`` (block
    ``q_idx // block_size``) may attend to key ``kv_idx`` in the ``[context | noise blocks]`` layout.
    ``anchors`` ``[B, N]`` (int, in ``[0, context_len]``) and ``keep`` ``[B, N]`` (bool, optional;
    dropped blocks attend to nothing) are captured by the closure.

    Example
    -------
    >>> from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    >>> mm = anchor_mask_mod(anchors, context_len=S, block_size=16)
    >>> bm = create_block_mask(mm, B, None, N * 16, S + N * 16, device=q.device)
    >>> out = flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    """
    context_len, block_size = _check_mask_args(anchors, context_len, block_size, keep)
    return _anchor_mask_mod_ref(anchors, context_len, block_size, keep)
