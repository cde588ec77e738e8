r"""Training losses of token diffusion: MDLM (and BD3LM), UDLM; the BD3LM attention mask; noising.

Losses are Monte-Carlo estimates of the continuous-time negative ELBO, in nats per token,
averaged over every token of the batch (``B · L``), with ``t`` drawn by
:func:`sample_times` (low-discrepancy over the batch, in ``[t_min, 1]``):

* :func:`mdlm_loss` (absorbing, SUBS parameterisation: the mask logit is excluded, MDLM
  Sahoo et al. 2024): at a masked position, ``w(t) · (−log x̂_0(x_0))`` with
  ``w(t) = −α'(t) / (1 − α(t))`` (``1/t`` for the log-linear schedule). With ``block_size`` it is
  BD3LM's loss: one ``t`` per block, and the model sees ``x_t ⊕ x_0`` under
  :func:`block_diffusion_mask`.
* :func:`udlm_loss` (uniform, UDLM Schiff et al. 2024): the continuous-time limit of the
  per-step KL between the true and the model posteriors (derived in its docstring).

The denoiser is called through :func:`ddiff.denoiser.denoiser_logits`, so a transformers
decoder that declares ``config.ddiff_attention`` is made bidirectional / block-causal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import ddiff
from ddiff.denoiser import denoiser_logits

Tensor = torch.Tensor

__all__ = [
    "BlockDiffusionMask",
    "LANGUAGES",
    "alpha_derivative",
    "block_diffusion_mask",
    "is_valid",
    "mdlm_loss",
    "noise_absorbing",
    "noise_uniform",
    "sample_language",
    "sample_times",
    "udlm_loss",
    "uniform_support",
]


# ---------------------------------------------------------------------------------------------
# Schedules and times
# ---------------------------------------------------------------------------------------------


def alpha_derivative(t: Tensor, kind: str = "log_linear", eps: float = 1e-3, *, sigma_min: float = 1e-4,
                     sigma_max: float = 20.0) -> Tensor:
    """dα/dt of :func:`ddiff.alpha_schedule` (closed forms; all are <= 0)."""
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if kind == "log_linear":
        return torch.full_like(t, -(1.0 - eps))
    if kind == "linear":
        return torch.full_like(t, -(1.0 - 2.0 * eps))
    if kind == "cosine":
        return -(1.0 - 2.0 * eps) * (math.pi / 2.0) * torch.sin((math.pi / 2.0) * (1.0 - t))
    if kind == "geometric":
        sigma = sigma_min ** (1.0 - t) * sigma_max**t
        return -torch.exp(-sigma) * sigma * (math.log(sigma_max) - math.log(sigma_min))
    raise ValueError(f"unknown alpha schedule {kind!r}.")


def sample_times(shape, *, t_min: float = 1e-3, antithetic: bool = True, generator: Optional[torch.Generator] = None,
                 device=None) -> Tensor:
    """Diffusion times in ``[t_min, 1]``: ``U(0,1)`` per entry, or with ``antithetic`` the
    low-discrepancy draw of MDLM / BD3LM (one uniform shift of an evenly spaced grid)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    n = math.prod(shape)
    u = torch.rand(n if not antithetic else 1, generator=generator, device=device)
    if antithetic:
        u = (u / n + torch.arange(n, device=device) / n) % 1.0
        u = u[torch.randperm(n, generator=generator, device=device)]
    return (t_min + (1.0 - t_min) * u).view(shape)


def _token_times(t: Tensor, batch: int, seq_len: int, block_size: Optional[int]) -> Tensor:
    """Per-token times ``[B, L]`` from per-sequence ``[B]`` or per-block ``[B, n_blocks]`` times."""
    if t.dim() == 0:
        t = t.expand(batch)
    if block_size is None:
        if t.shape == (batch, seq_len):
            return t
        if t.shape != (batch,):
            raise ValueError(f"`t` must be a scalar, [B] or [B, L]; got {tuple(t.shape)}.")
        return t[:, None].expand(batch, seq_len)
    n_blocks = -(-seq_len // block_size)
    if t.shape == (batch,):
        t = t[:, None].expand(batch, n_blocks)
    if t.shape != (batch, n_blocks):
        raise ValueError(f"with block_size, `t` must be [B] or [B, n_blocks={n_blocks}]; got {tuple(t.shape)}.")
    return t.repeat_interleave(block_size, dim=1)[:, :seq_len]


# ---------------------------------------------------------------------------------------------
# Forward processes (noising helpers)
# ---------------------------------------------------------------------------------------------


def noise_absorbing(x0: Tensor, alpha: Tensor, mask_token_id: int, *,
                    generator: Optional[torch.Generator] = None) -> Tensor:
    """``x_t``: each token kept with probability ``alpha`` (broadcast to ``x0``), else the mask."""
    keep = torch.rand(x0.shape, generator=generator, device=x0.device) < alpha
    return torch.where(keep, x0, torch.full_like(x0, mask_token_id))


def noise_uniform(x0: Tensor, alpha: Tensor, num_tokens: int, *,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """``x_t``: each token kept with probability ``alpha``, else uniform over ``[0, num_tokens)``
    (which may redraw the same token, as the uniform process does)."""
    keep = torch.rand(x0.shape, generator=generator, device=x0.device) < alpha
    noise = torch.randint(0, num_tokens, x0.shape, generator=generator, device=x0.device)
    return torch.where(keep, x0, noise)


def uniform_support(vocab_size: int, mask_token_id: Optional[int]) -> int:
    """``N`` of the uniform process, as :class:`~ddiff.pipelines.TokenDiffusionScheduler` defines it."""
    if mask_token_id is None:
        return vocab_size
    if mask_token_id != vocab_size - 1:
        raise ValueError(f"the uniform process can only exclude a mask id equal to vocab_size - 1 "
                         f"({vocab_size - 1}), got {mask_token_id}.")
    return vocab_size - 1


# ---------------------------------------------------------------------------------------------
# BD3LM attention mask
# ---------------------------------------------------------------------------------------------


@dataclass
class BlockDiffusionMask:
    """BD3LM's training mask over ``x_t ⊕ x_0`` (length ``2L``), two ways.

    ``mask_mod(b, h, q_idx, kv_idx) -> bool`` for ``torch.nn.attention.flex_attention``
    (``create_block_mask(mask.mask_mod, B, H, 2L, 2L)``), and ``dense``, a bool ``[2L, 2L]``
    (True = may attend) for SDPA or a 4-D ``attention_mask``. Unpacks as ``mask_mod, dense``.
    """

    mask_mod: Callable
    dense: Tensor
    seq_len: int
    block_size: int

    def __iter__(self):
        yield self.mask_mod
        yield self.dense


def block_diffusion_mask(seq_len: int, block_size: int, *, device=None) -> BlockDiffusionMask:
    r"""The BD3LM ``x_t ⊕ x_0`` attention mask (Arriola et al. 2025, "Block Diffusion").

    Queries and keys ``0 .. L-1`` are the noisy ``x_t``, ``L .. 2L-1`` the clean ``x_0``; ``b(i)``
    is a position's block within its half. A query may attend to a key iff

    * both are noisy and in the same block (block-diagonal: a noisy block is denoised as a whole);
    * the query is noisy, the key clean and ``b(key) < b(query)`` (offset block-causal: a noisy
      block sees the clean blocks before it);
    * both are clean and ``b(key) <= b(query)`` (block-causal: the clean sequence as a
      block-autoregressive model sees it, which is what the KV cache holds at sampling time).

    Clean queries never see noisy keys. With ``block_size >= seq_len`` the noisy half is fully
    bidirectional and sees nothing clean (MDLM).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"`seq_len` must be an int >= 1, got {seq_len!r}.")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"`block_size` must be an int >= 1, got {block_size!r}.")
    n = seq_len

    def mask_mod(b, h, q_idx, kv_idx):
        q_clean = q_idx >= n
        kv_clean = kv_idx >= n
        q_block = torch.where(q_clean, q_idx - n, q_idx) // block_size
        kv_block = torch.where(kv_clean, kv_idx - n, kv_idx) // block_size
        diagonal = (q_block == kv_block) & (q_clean == kv_clean)
        offset_causal = ~q_clean & kv_clean & (kv_block < q_block)
        causal = q_clean & kv_clean & (kv_block <= q_block)
        return diagonal | offset_causal | causal

    idx = torch.arange(2 * n, device=device)
    dense = mask_mod(None, None, idx[:, None], idx[None, :])
    return BlockDiffusionMask(mask_mod=mask_mod, dense=dense, seq_len=seq_len, block_size=block_size)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def _alpha(t, alpha_schedule, eps, sigma_min, sigma_max):
    return ddiff.alpha_schedule(t, alpha_schedule, eps, sigma_min=sigma_min, sigma_max=sigma_max)


@dataclass
class LossOutput:
    """``loss``: scalar (nats per token); ``token_loss``: ``[B, L]``; ``x_t``: the noised input; ``t``."""

    loss: Tensor
    token_loss: Tensor
    x_t: Tensor
    t: Tensor


def _absorbing_loss(logits, x0, x_t, t_tok, alpha, mask_token_id, alpha_schedule, eps, sigma_min, sigma_max,
                    return_output):
    """MDLM's continuous-time absorbing loss from the denoiser's logits at ``x_t``: the mask id is
    never a prediction (SUBS), each masked token's NLL is weighted by -alpha'(t) / (1 - alpha)."""
    logits = logits.float()
    logits = logits.index_fill(-1, torch.tensor([mask_token_id], device=logits.device), float("-inf"))
    nll = -torch.log_softmax(logits, -1).gather(-1, x0[..., None]).squeeze(-1)
    weight = -alpha_derivative(t_tok, alpha_schedule, eps, sigma_min=sigma_min, sigma_max=sigma_max) / (1.0 - alpha)
    token_loss = torch.where(x_t == mask_token_id, weight * nll, torch.zeros_like(nll))
    loss = token_loss.sum() / token_loss.numel()
    if return_output:
        return LossOutput(loss=loss, token_loss=token_loss, x_t=x_t, t=t_tok)
    return loss


def mdlm_loss(model, x0: Tensor, t: Optional[Tensor] = None, *, mask_token_id: int,
              alpha_schedule: str = "log_linear", eps: float = 1e-3, sigma_min: float = 1e-4, sigma_max: float = 20.0,
              block_size: Optional[int] = None, t_min: float = 1e-3, antithetic: bool = True,
              generator: Optional[torch.Generator] = None, return_output: bool = False):
    r"""MDLM's continuous-time NELBO for the absorbing process (BD3LM's with ``block_size``).

    ``x_t`` keeps each token of ``x0`` with probability ``α(t)`` and masks it otherwise; the loss
    of a masked position is ``−α'(t)/(1 − α(t)) · (−log x̂_0(x_0))`` with ``x̂_0`` the softmax of
    the logits with the mask column removed (SUBS), unmasked positions cost 0, and the sum is
    divided by ``B · L``. It is the ``T → ∞`` limit of the sum over steps of
    ``KL(q(x_s | x_t, x_0) ‖ q(x_s | x_t, x̂_0))``.

    Args:
        model: denoiser, called via :func:`ddiff.denoiser.denoiser_logits`.
        x0: int64 ``[B, L]`` clean tokens (never the mask id).
        t: ``[B]`` times (``[B, n_blocks]`` with ``block_size``); drawn by :func:`sample_times` if None.
        block_size: BD3LM: one ``t`` per block, and the model runs on ``x_t ⊕ x_0`` (positions
            ``0..L-1`` twice) under :func:`block_diffusion_mask`; it must declare
            ``config.ddiff_attention`` (a 4-D mask is passed).
        return_output: return a :class:`LossOutput` instead of the scalar.
    """
    batch, seq_len = x0.shape
    device = x0.device
    if t is None:
        shape = (batch,) if block_size is None else (batch, -(-seq_len // block_size))
        t = sample_times(shape, t_min=t_min, antithetic=antithetic, generator=generator, device=device)
    t_tok = _token_times(torch.as_tensor(t, device=device, dtype=torch.float32), batch, seq_len, block_size)
    alpha = _alpha(t_tok, alpha_schedule, eps, sigma_min, sigma_max)
    x_t = noise_absorbing(x0, alpha, mask_token_id, generator=generator)
    if block_size is None:
        logits = denoiser_logits(model, x_t)
    else:
        positions = torch.arange(seq_len, device=device).repeat(2)[None].expand(batch, 2 * seq_len)
        mask = block_diffusion_mask(seq_len, block_size, device=device).dense
        logits = denoiser_logits(model, torch.cat([x_t, x0], dim=1), attention_mask=mask,
                                 position_ids=positions)[:, :seq_len]
    return _absorbing_loss(logits, x0, x_t, t_tok, alpha, mask_token_id, alpha_schedule, eps, sigma_min, sigma_max,
                           return_output)


def udlm_integrand(log_x0_hat: Tensor, x0: Tensor, x_t: Tensor, alpha: Tensor, dalpha: Tensor) -> Tensor:
    r"""UDLM's continuous-time NELBO integrand per position, ``[B, L]`` (>= 0; 0 iff x̂_0 = x_0).

    Derivation. The uniform process over ``N`` ids jumps at rate ``β = −α'/α`` to a uniform id,
    so the off-diagonal forward rate is ``β/N``. Writing ``x̄ = N α e_{x_0} + (1 − α)`` (N times the
    marginal ``q_t(· | x_0)``) and ``x̄_θ = N α x̂_0 + (1 − α)``, the true reverse rate from
    ``x_t = i`` to ``j ≠ i`` is ``(β/N) x̄_j / x̄_i`` and the model's is ``(β/N) x̄_θ,j / x̄_θ,i``
    (the small-step limit of :func:`ddiff.udlm_step`'s posterior). The continuous-time ELBO of a
    CTMC (Campbell et al. 2022) integrates ``Σ_{j≠i} [R̂_j − R_j + R_j log(R_j / R̂_j)]``; using
    ``Σ_j x̄_j = Σ_j x̄_θ,j = N`` this is

    ``(−α' / (N α)) · [ N/x̄_θ,i − N/x̄_i + Σ_{j≠i} (x̄_j / x̄_i) · log( x̄_j x̄_θ,i / (x̄_i x̄_θ,j) ) ]``,

    UDLM's expression. The sum over ``j`` is done in closed form: ``x̄`` takes only two values.
    """
    n = log_x0_hat.shape[-1]
    a = alpha.double()
    one_minus = 1.0 - a
    log_xbar_theta = torch.logaddexp(log_x0_hat.double() + torch.log(n * a)[..., None],
                                     torch.log(one_minus)[..., None])  # [B, L, N]
    lt_i = log_xbar_theta.gather(-1, x_t[..., None]).squeeze(-1)
    lt_x0 = log_xbar_theta.gather(-1, x0[..., None]).squeeze(-1)
    hit = x_t == x0
    xbar_i = torch.where(hit, n * a + one_minus, one_minus)
    big = n * a + one_minus
    # Σ_j x̄_j log x̄_j and Σ_j x̄_j log x̄_θ,j over all j, then remove j = i.
    sum_xlogx = (n - 1) * torch.xlogy(one_minus, one_minus) + torch.xlogy(big, big)
    sum_xlogt = one_minus * log_xbar_theta.sum(-1) + n * a * lt_x0
    excl_i = xbar_i * (torch.log(xbar_i) - lt_i)
    s = sum_xlogx - sum_xlogt - excl_i
    bracket = n * torch.exp(-lt_i) - n / xbar_i + s / xbar_i + (n - xbar_i) / xbar_i * (lt_i - torch.log(xbar_i))
    return (-dalpha.double() / (n * a) * bracket).float()


def udlm_loss(model, x0: Tensor, t: Optional[Tensor] = None, *, vocab_size: int, mask_token_id: Optional[int] = None,
              alpha_schedule: str = "log_linear", eps: float = 1e-3, sigma_min: float = 1e-4, sigma_max: float = 20.0,
              t_min: float = 1e-3, antithetic: bool = True, generator: Optional[torch.Generator] = None,
              return_output: bool = False):
    r"""UDLM's continuous-time NELBO for the uniform process (see :func:`udlm_integrand`).

    Noise is uniform over ``[0, N)``, ``N = vocab_size`` or ``vocab_size − 1`` when
    ``mask_token_id == vocab_size − 1`` (the mask excluded, as the scheduler does); the model's
    logits are cut to their first ``N`` columns. The loss is the mean over all ``B · L``
    positions. The schedule weighting is ``−α'(t) / (N α(t))``.
    """
    batch, seq_len = x0.shape
    device = x0.device
    n = uniform_support(vocab_size, mask_token_id)
    if t is None:
        t = sample_times((batch,), t_min=t_min, antithetic=antithetic, generator=generator, device=device)
    t_tok = _token_times(torch.as_tensor(t, device=device, dtype=torch.float32), batch, seq_len, None)
    alpha = _alpha(t_tok, alpha_schedule, eps, sigma_min, sigma_max)
    x_t = noise_uniform(x0, alpha, n, generator=generator)
    logits = denoiser_logits(model, x_t)[..., :n].float()
    dalpha = alpha_derivative(t_tok, alpha_schedule, eps, sigma_min=sigma_min, sigma_max=sigma_max)
    token_loss = udlm_integrand(torch.log_softmax(logits, -1), x0, x_t, alpha, dalpha)
    loss = token_loss.mean()
    if return_output:
        return LossOutput(loss=loss, token_loss=token_loss, x_t=x_t, t=t_tok)
    return loss


# ---------------------------------------------------------------------------------------------
# Synthetic languages with checkable structure (tests, the tiny checkpoints)
# ---------------------------------------------------------------------------------------------

# name -> (token strings; the last one is the mask token)
LANGUAGES = {
    "sorted_digits": [str(d) for d in range(10)] + ["[MASK]"],
    "brackets": ["(", ")", "[MASK]"],
}


def sample_language(name: str, batch: int, seq_len: int, *, generator: Optional[torch.Generator] = None,
                    device=None) -> Tensor:
    """Valid sentences ``[batch, seq_len]`` of a synthetic language (token ids of ``LANGUAGES[name]``).

    * ``"sorted_digits"``: ``seq_len`` digits, each uniform in 0..9, sorted (non-decreasing).
    * ``"brackets"``: balanced bracket strings (``seq_len`` even): a uniformly random Dyck word
      drawn uniformly: a random arrangement of ``L/2 + 1`` ``(`` and ``L/2`` ``)``, rotated to the one
      cyclic shift whose partial sums stay positive (the cycle lemma), minus its first ``(``.
    """
    if name == "sorted_digits":
        digits = torch.randint(0, 10, (batch, seq_len), generator=generator, device=device)
        return digits.sort(dim=-1).values
    if name == "brackets":
        if seq_len % 2:
            raise ValueError("brackets need an even seq_len.")
        half = seq_len // 2
        # n+1 "(" and n ")" in random order; the cycle lemma rotates each to a unique Dyck prefix.
        steps = torch.cat([torch.ones(batch, half + 1), -torch.ones(batch, half)], dim=1)
        perm = torch.argsort(torch.rand(batch, seq_len + 1, generator=generator), dim=1)
        steps = steps.gather(1, perm)
        height = steps.cumsum(1)
        # rotate to start right after the last position where the walk reaches its minimum
        at_min = (height == height.min(1, keepdim=True).values).flip(1)
        start = seq_len - at_min.float().argmax(1) + 1
        idx = (start[:, None] + torch.arange(seq_len + 1)) % (seq_len + 1)
        rotated = steps.gather(1, idx)[:, 1:]  # drop the leading "(": a Dyck word of length seq_len
        return torch.where(rotated > 0, 0, 1).long().to(device)
    raise ValueError(f"unknown language {name!r}; choose from {sorted(LANGUAGES)}.")


def is_valid(name: str, sequences: Tensor) -> Tensor:
    """Bool ``[B]``: which rows are sentences of the language."""
    seq = sequences.long()
    if name == "sorted_digits":
        in_range = ((seq >= 0) & (seq <= 9)).all(-1)
        return in_range & (seq[:, 1:] >= seq[:, :-1]).all(-1)
    if name == "brackets":
        in_range = ((seq == 0) | (seq == 1)).all(-1)
        height = torch.where(seq == 0, 1, -1).cumsum(-1)
        return in_range & (height >= 0).all(-1) & (height[:, -1] == 0)
    raise ValueError(f"unknown language {name!r}; choose from {sorted(LANGUAGES)}.")


def language_tokenizer(name: str):
    """A word-level ``PreTrainedTokenizerFast`` for a synthetic language (mask token last)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = LANGUAGES[name]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[MASK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, mask_token="[MASK]")
