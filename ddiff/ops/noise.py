"""Uniform renoising: ``renoise_uniform`` (the corruption step of uniform-noise samplers)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.library import custom_op, triton_op

from ddiff._backend import launch_wrapper, resolve_backend
from ddiff._checks import check_device, check_dtype, check_int, check_shape, check_tensor, is_integer_dtype
from ddiff._params import RngArgs, rng_args, seed_rows
from ddiff.reference.noise import renoise_uniform_reference

__all__ = ["renoise_uniform"]

Tensor = torch.Tensor


@custom_op("ddiff::renoise_uniform_torch", mutates_args=())
def _renoise_torch(tokens: Tensor, keep: Optional[Tensor], vocab_size: int, seed: Optional[Tensor], seed_value: int,
                   offset: int) -> Tensor:
    seeds = seed_rows(RngArgs(seed, seed_value, offset), tokens.shape[0], tokens.device)
    return renoise_uniform_reference(tokens, keep, vocab_size, seeds, offset)


@_renoise_torch.register_fake
def _(tokens, keep, vocab_size, seed, seed_value, offset):
    return torch.empty(tokens.shape, dtype=torch.int64, device=tokens.device)


@triton_op("ddiff::renoise_uniform_triton", mutates_args=())
def _renoise_triton(tokens: Tensor, keep: Optional[Tensor], vocab_size: int, seed: Optional[Tensor], seed_value: int,
                    offset: int) -> Tensor:
    from ddiff.kernels import noise as kernels

    return kernels.renoise_uniform_fwd(tokens, keep, vocab_size, seed, seed_value, offset, wrap=launch_wrapper())


def renoise_uniform(tokens: Tensor, keep: Optional[Tensor] = None, *, vocab_size: int, seed=None, offset: int = 0,
                    generator: Optional[torch.Generator] = None, backend: str = "auto") -> Tensor:
    """Keep ``tokens`` where ``keep`` is True and replace every other position by a uniform token.

    The renoising half of uniform-corruption samplers (DiffusionGemma's
    ``EntropyBoundSampler.renoise_canvas``, diffusers' ``EntropyBoundScheduler``): rejected
    positions get a fresh token drawn uniformly from ``[0, vocab_size)``. With ``keep=None``
    every position is fresh (the initial canvas, ``x_T ~ U(V)``).

    Randomness follows ddiff's counter-based convention: position ``(row, col)`` of the
    flattened ``[R, L]`` canvas (``L`` the last dimension) draws from Philox with counter
    ``(col, row, offset, STREAM_RENOISE)``, so a draw depends only on
    ``(seed, offset, row, col)``, both backends give the same tokens, and advancing
    ``offset`` by one per step gives fresh noise. The token is ``floor(x * V / 2^64)`` of a
    64-bit Philox integer ``x``: uniform to within ``2^-64`` per token.

    Args:
        tokens: integer tensor ``[..., L]`` (at least 1-D): the candidate tokens.
        keep: bool tensor of ``tokens``' shape, or None (keep nothing).
        vocab_size: int in ``[1, 2^31)``: fresh tokens lie in ``[0, vocab_size)``.
        seed: int, or int64 tensor with one value per row (``tokens.numel() // L``) or one value.
        offset: int in ``[0, 2^56)``: advance it by one per call that needs fresh noise.
        generator: draw the seed from this ``torch.Generator`` (instead of ``seed``).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        int64 tensor of ``tokens``' shape.

    Example::

        >>> canvas = ddiff.renoise_uniform(torch.empty(2, 256, dtype=torch.long), vocab_size=262144, seed=0)
        >>> canvas = ddiff.renoise_uniform(sampled, accepted, vocab_size=262144, seed=0, offset=step + 1)
    """
    check_tensor("tokens", tokens)
    if not is_integer_dtype(tokens.dtype):
        raise TypeError(f"`tokens` must hold integer token ids, got {tokens.dtype}.")
    if tokens.dim() < 1:
        raise ValueError("`tokens` must have at least one dimension (the positions).")
    if keep is not None:
        check_tensor("keep", keep)
        check_dtype("keep", keep, "bool")
        check_shape("keep", keep, tokens.shape, "the shape of `tokens`")
        check_device("keep", keep, tokens.device, "`tokens`")
    check_int("vocab_size", vocab_size, 1, 2**31 - 1)
    tokens2d = tokens.reshape(math.prod(tokens.shape[:-1]), tokens.shape[-1])
    keep2d = None if keep is None else keep.reshape(tokens2d.shape)
    rng = rng_args(seed, offset, generator, tokens2d.shape[0], tokens.device)
    args = (tokens2d, keep2d, int(vocab_size), rng.seed, rng.seed_value, rng.offset)
    if resolve_backend(backend, tokens) == "triton":
        out = torch.ops.ddiff.renoise_uniform_triton(*args)
    else:
        out = torch.ops.ddiff.renoise_uniform_torch(*args)
    return out.view(tokens.shape)
