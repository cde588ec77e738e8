r"""The hybrid-transition loss: the continuous-time NELBO of the process ``TokenDiffusionPipeline`` samples.

The hybrid process of :class:`~ddiff.pipelines.TokenDiffusionScheduler` (``forward_process="hybrid"``)
corrupts a token by jumping, at rate ``β(t) = −α'(t)/α(t)``, to a draw from

    π = λ · δ(mask) + (1 − λ) · Uniform(K),        K = vocab_size − 1 (every id but the mask),

so ``q_t(· | x_0) = m = α δ(x_0) + (1 − α) π`` with ``α = α(t)`` (:func:`ddiff.alpha_schedule`) and
``λ = mask_fraction``. The denoiser predicts ``x̂_0`` over the non-mask ids (the mask logit is
dropped: SUBS) and the sampler plugs it in: ``m̂ = α x̂_0 + (1 − α) π``.

**ELBO.** For a CTMC the negative ELBO is ``∫_0^1 E_{x_t ~ q_t(·|x_0)} Σ_{j ≠ x_t} [R̂(x_t→j) − R(x_t→j)
+ R(x_t→j) log(R(x_t→j)/R̂(x_t→j))] dt`` (Campbell et al. 2022), with the true reverse rates
``R(i→j) = β π_i m_j / m_i`` and the model's ``R̂`` with ``m̂`` in place of ``m``. Writing ``ā = 1 − α``,
``u = (1 − λ)/K`` (the uniform part's mass per id) and

    S = Σ_{j ≠ mask} m_j log(m_j / m̂_j)          (≥ 0: Σ_j m_j = Σ_j m̂_j = α + ā(1 − λ)),

the integrand at one position is (the mask column never contributes: ``m_mask = m̂_mask = ā λ``)

* ``x_t`` = mask:      ``(β / ā) · S``;
* ``x_t = i`` ≠ mask:  ``(β u / m_i) · [ r − 1 − log r + S ]`` with ``r = m_i / m̂_i``.

Both are 0 iff ``x̂_0 = δ(x_0)``. **Weighting**: the schedule enters only through ``β/ā =
−α'/(α(1 − α))`` at masks and ``β u / m_i`` elsewhere: no extra weighting is applied (this is the
ELBO itself, not a reweighted cross-entropy). At ``λ = 1`` (``u = 0``) it is MDLM's loss
``−α'/(1 − α) · (−log x̂_0(x_0))`` at masks and 0 elsewhere; at ``λ = 0`` it is UDLM's
(:func:`~ddiff.training.udlm_integrand` with ``N = K``). ``S`` needs one sum over the vocabulary
(``m_j`` takes two values, so ``Σ m_j log m̂_j = ā u Σ_j log m̂_j + α log m̂_{x_0}``).

The diffusers ``train_hybrid_token_diffusion.py`` example trains its (differently parameterised)
hybrid scheduler with an unweighted cross-entropy on every token; this is the ELBO of ddiff's
process instead.
"""

from __future__ import annotations

from typing import Optional

import torch

from ddiff.denoiser import denoiser_logits
from ddiff.training.loop import Recipe, TrainingSetup
from ddiff.training.token_diffusion import LossOutput, _token_times, alpha_derivative, sample_times
from ddiff.training.token_diffusion_recipes import add_denoiser_arguments, build_denoiser, saver

Tensor = torch.Tensor

__all__ = ["HYBRID", "hybrid_integrand", "hybrid_loss", "noise_hybrid"]


def _scheduler(vocab_size, mask_token_id, mask_fraction, alpha_schedule, eps, sigma_min, sigma_max):
    from ddiff.pipelines.token_diffusion_scheduler import TokenDiffusionScheduler

    return TokenDiffusionScheduler(vocab_size=vocab_size, mask_token_id=mask_token_id, forward_process="hybrid",
                                   alpha_schedule=alpha_schedule, eps=eps, sigma_min=sigma_min, sigma_max=sigma_max,
                                   mask_fraction=mask_fraction)


def noise_hybrid(x0: Tensor, t: Tensor, *, vocab_size: int, mask_token_id: int, mask_fraction: float = 0.5,
                 alpha_schedule: str = "log_linear", eps: float = 1e-3, sigma_min: float = 1e-4,
                 sigma_max: float = 20.0, generator: Optional[torch.Generator] = None) -> Tensor:
    """``x_t ~ q_t(· | x_0)`` of the hybrid process: :meth:`TokenDiffusionScheduler.add_noise` itself."""
    sched = _scheduler(vocab_size, mask_token_id, mask_fraction, alpha_schedule, eps, sigma_min, sigma_max)
    return sched.add_noise(x0, t, generator=generator)


def hybrid_integrand(log_x0_hat: Tensor, x0: Tensor, x_t: Tensor, alpha: Tensor, dalpha: Tensor, *,
                     mask_token_id: int, mask_fraction: float) -> Tensor:
    r"""The hybrid NELBO integrand per position, ``[B, L]`` float32 (module docstring).

    Args:
        log_x0_hat: ``[B, L, V]`` log-probabilities of the model's x̂_0 (the mask column is ignored;
            it should be ``-inf``).
        x0, x_t: int64 ``[B, L]`` clean and noisy tokens (``x0`` never the mask).
        alpha, dalpha: ``[B, L]`` α(t) and α'(t).
        mask_token_id, mask_fraction: the mask id and λ.
    """
    vocab = log_x0_hat.shape[-1]
    k = vocab - 1
    lam = float(mask_fraction)
    u = (1.0 - lam) / k
    a = alpha.double()
    abar = 1.0 - a
    beta = -dalpha.double() / a
    logp = log_x0_hat.double()
    is_real = torch.ones(vocab, dtype=torch.bool, device=logp.device)
    is_real[mask_token_id] = False
    # log m̂_j over the non-mask ids (the mask column is dropped from every sum below)
    if u > 0:
        log_mhat = torch.logaddexp(logp + torch.log(a)[..., None], torch.log(abar * u)[..., None])
    else:
        log_mhat = logp + torch.log(a)[..., None]
    log_mhat = log_mhat.masked_fill(~is_real, 0.0)
    log_mhat_x0 = log_mhat.gather(-1, x0[..., None]).squeeze(-1)
    m_x0 = a + abar * u
    sum_mlogm = torch.xlogy(m_x0, m_x0) + (k - 1) * torch.xlogy(abar * u, abar * u)
    sum_mlogmhat = a * log_mhat_x0
    if u > 0:
        sum_mlogmhat = sum_mlogmhat + abar * u * log_mhat.sum(-1)
    s = (sum_mlogm - sum_mlogmhat).clamp_min(0.0)  # >= 0 exactly; clamp float rounding only

    at_mask = x_t == mask_token_id
    at_mask_loss = beta / abar * s
    if u > 0:
        x_i = torch.where(at_mask, x0, x_t)  # any real id where x_t is the mask (result unused there)
        m_i = torch.where(x_i == x0, a + abar * u, abar * u)
        log_r = torch.log(m_i) - log_mhat.gather(-1, x_i[..., None]).squeeze(-1)
        real_loss = beta * u / m_i * (torch.expm1(log_r) - log_r + s)
    else:  # λ = 1: a real x_t is x_0 itself and never moves
        real_loss = torch.zeros_like(at_mask_loss)
    return torch.where(at_mask, at_mask_loss, real_loss).float()


def hybrid_loss(model, x0: Tensor, t: Optional[Tensor] = None, *, vocab_size: int, mask_token_id: int,
                mask_fraction: float = 0.5, alpha_schedule: str = "log_linear", eps: float = 1e-3,
                sigma_min: float = 1e-4, sigma_max: float = 20.0, t_min: float = 1e-3, antithetic: bool = True,
                generator: Optional[torch.Generator] = None, return_output: bool = False):
    r"""The hybrid process's continuous-time NELBO, nats per token averaged over ``B · L`` (module docstring).

    ``x_t`` is drawn by the scheduler's own forward process (:func:`noise_hybrid`), the model's
    logits are cut to ``vocab_size`` columns with the mask column removed (SUBS), and the
    integrand is :func:`hybrid_integrand`.

    Args:
        model: denoiser, called via :func:`ddiff.denoiser.denoiser_logits`.
        x0: int64 ``[B, L]`` clean tokens (never the mask id).
        t: ``[B]`` times; drawn by :func:`~ddiff.training.sample_times` in ``[t_min, 1]`` if None.
        vocab_size, mask_token_id, mask_fraction, alpha_schedule, eps, sigma_min, sigma_max: the
            process, as :class:`~ddiff.pipelines.TokenDiffusionScheduler` takes them.
        return_output: return a :class:`~ddiff.training.LossOutput` instead of the scalar.

    Example::

        >>> loss = hybrid_loss(model, x0, vocab_size=11, mask_token_id=10, mask_fraction=0.5)
        >>> loss.backward()
    """
    batch, seq_len = x0.shape
    device = x0.device
    if t is None:
        t = sample_times((batch,), t_min=t_min, antithetic=antithetic, generator=generator, device=device)
    t_tok = _token_times(torch.as_tensor(t, device=device, dtype=torch.float32), batch, seq_len, None)
    sched = _scheduler(vocab_size, mask_token_id, mask_fraction, alpha_schedule, eps, sigma_min, sigma_max)
    alpha = sched.alpha(t_tok).to(torch.float32)
    x_t = sched.add_noise(x0, t_tok, generator=generator)
    logits = denoiser_logits(model, x_t)[..., :vocab_size].float()
    logits = logits.index_fill(-1, torch.tensor([mask_token_id], device=device), float("-inf"))
    dalpha = alpha_derivative(t_tok, alpha_schedule, eps, sigma_min=sigma_min, sigma_max=sigma_max)
    token_loss = hybrid_integrand(torch.log_softmax(logits, -1), x0, x_t, alpha, dalpha, mask_token_id=mask_token_id,
                                  mask_fraction=mask_fraction)
    loss = token_loss.mean()
    if return_output:
        return LossOutput(loss=loss, token_loss=token_loss, x_t=x_t, t=t_tok)
    return loss


# ---------------------------------------------------------------------------------------------
# ``python -m ddiff.train hybrid``
# ---------------------------------------------------------------------------------------------


def _hybrid_arguments(parser) -> None:
    add_denoiser_arguments(parser)
    parser.add_argument("--mask_fraction", type=float, default=0.5,
                        help="λ: share of corrupted tokens that become the mask (the rest: uniform real tokens)")


def _hybrid_setup(args, accelerator) -> TrainingSetup:
    from ddiff.pipelines.token_diffusion_scheduler import TokenDiffusionScheduler
    from ddiff.training.data import build_model, prepare_data

    data = prepare_data(args, accelerator)
    vocab_size, mask_id = data.vocab_size, data.mask_token_id
    scheduler = TokenDiffusionScheduler(vocab_size=vocab_size, mask_token_id=mask_id, forward_process="hybrid",
                                        alpha_schedule=args.alpha_schedule, eps=args.eps,
                                        mask_fraction=args.mask_fraction)
    gen = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index + 1)
    kwargs = dict(vocab_size=vocab_size, mask_token_id=mask_id, mask_fraction=args.mask_fraction,
                  alpha_schedule=args.alpha_schedule, eps=args.eps, t_min=args.t_min)
    model = build_model(args, data, lambda: build_denoiser(args, vocab_size))
    return TrainingSetup(model=model, next_batch=data.next_batch,
                         loss=lambda model, x0: hybrid_loss(model, x0, generator=gen, **kwargs),
                         save=saver(data.tokenizer, scheduler), eval_batches=data.eval_batches,
                         eval_loss=lambda model, x0: hybrid_loss(model, x0, **kwargs), generators={"noise": gen})


HYBRID = Recipe("hybrid", "hybrid-transition diffusion (mask + uniform corruption): its continuous-time NELBO",
                _hybrid_arguments, _hybrid_setup)
