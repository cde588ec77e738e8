r"""``TokenDiffusionScheduler``: forward processes, priors, timesteps and reverse steps of token diffusion.

All three forward processes belong to one family (D3PM's "interpolating" transitions). With a
stationary distribution ``π`` over the vocabulary and the clean-token probability ``α(t)`` of
:func:`ddiff.alpha_schedule`,

    q(x_t | x_0) = α_t · δ(x_0) + (1 − α_t) · π,        q(x_t | x_s) = α_{t|s} · δ(x_s) + (1 − α_{t|s}) · π,

with ``α_{t|s} = α_t / α_s`` for ``s < t`` (the two are consistent, so this is a Markov chain):

* ``"absorbing"`` (MDLM, BD3LM): ``π = δ(mask)``;
* ``"uniform"`` (UDLM): ``π`` = uniform over ``N`` token ids ``[0, N)``; ``N = vocab_size``, or
  ``vocab_size − 1`` when the mask id is the last id (the mask token is then never noise);
* ``"hybrid"``: ``π = λ · δ(mask) + (1 − λ) · Uniform(K)``, where ``K = vocab_size − 1`` counts
  every id but the mask and ``λ = mask_fraction``. A corrupted token becomes the mask with
  probability ``λ`` and a random real token otherwise. ``λ = 1`` is exactly absorbing and
  ``λ = 0`` exactly uniform (over the non-mask ids).

The prior (``t = 1``) is ``π`` itself (:meth:`TokenDiffusionScheduler.sample_prior`).

Reverse steps (:meth:`TokenDiffusionScheduler.step`) use the posterior
``q(x_s | x_t, x̂_0)`` with the model's ``x̂_0 = softmax(logits)`` in place of ``x_0``:

* absorbing: :func:`ddiff.mdlm_step` (reveal with probability ``(α_s − α_t)/(1 − α_t)``);
* uniform: :func:`ddiff.udlm_step` (UDLM's closed form);
* hybrid: by Bayes, ``q(x_s = j | x_t = i, x̂_0) ∝ [α_{t|s} δ_{ij} + (1 − α_{t|s}) π_i] · [α_s x̂_0(j) + (1 − α_s) π_j]``,
  which is a mixture of four parts; with ``c = (1 − λ)/K`` the unnormalised weights are

  ================  =============================  ==============================================
  part              ``x_t`` = mask                 ``x_t = i`` ≠ mask (all weights divided by c)
  ================  =============================  ==============================================
  draw from x̂_0     ``α_s − α_t``                  ``α_s − α_t``
  uniform non-mask  ``(1 − α_{t|s})(1 − α_s)(1−λ)`` ``(1 − α_{t|s})(1 − α_s)(1 − λ)``
  the mask          ``(α_{t|s} + (1 − α_{t|s})λ)(1 − α_s)``  ``(1 − α_{t|s})(1 − α_s) λ``
  keep ``x_t``      (same as "the mask")           ``α_t x̂_0(i)/c + α_{t|s} − α_t``
  ================  =============================  ==============================================

  ddiff has no fused hybrid kernel, so the hybrid step composes ddiff ops: ``ddiff.sample``
  picks the part from the four log-weights of each position, ``ddiff.predict_tokens`` draws
  the x̂_0 tokens only where that part won, and ``ddiff.sample`` over ``K`` equal logits draws
  the uniform tokens. The weights need ``x̂_0(x_t)``, one log-sum-exp per position. At ``λ = 1``
  the mask column reduces to MDLM's posterior; at ``λ = 0`` the other column is UDLM's with
  ``N = K``.

Randomness: a step with ``(seed, offset)`` draws its token noise at ``offset`` and any other
draw (the hybrid part, its uniform tokens, the first-hitting position and time) at
``offset + j · 2^48`` for a small ``j``, so callers advance ``offset`` by one per step.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

import ddiff
from ddiff.ops.schedules import ALPHA_SCHEDULES
from ddiff.pipelines.scheduler_config import SchedulerConfigMixin

Tensor = torch.Tensor

FORWARD_PROCESSES = ("absorbing", "uniform", "hybrid")
AUX_OFFSET = 1 << 48  # offset stride between the independent draws of one step
_AUX_HYBRID_PART, _AUX_UNIFORM_TOKEN, _AUX_POSITION, _AUX_TIME = 1, 2, 3, 4


def _int(name, value, low=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
    if low is not None and value < low:
        raise ValueError(f"`{name}` must be >= {low}, got {value}.")
    return int(value)


class TokenDiffusionScheduler(SchedulerConfigMixin):
    r"""Forward process, prior, timesteps and reverse step of MDLM / UDLM / hybrid token diffusion.

    Args:
        vocab_size: number of token ids the process works on (``[0, vocab_size)``). Model
            logits may have more columns (padding); those are never used as noise.
        mask_token_id: the mask id. Required by ``"absorbing"`` and ``"hybrid"``. For
            ``"uniform"`` it is either None (noise over all ``vocab_size`` ids) or
            ``vocab_size − 1`` (noise over ``[0, vocab_size − 1)``, the mask excluded): an id in
            the middle of the vocabulary cannot be excluded from :func:`ddiff.udlm_step`'s
            uniform draw, which covers a contiguous ``[0, N)``, and is rejected.
        forward_process: ``"absorbing"``, ``"uniform"`` or ``"hybrid"`` (see the module docstring).
        alpha_schedule, eps, sigma_min, sigma_max: α(t), via :func:`ddiff.alpha_schedule`.
        mask_fraction: λ of the hybrid process, in [0, 1]. The default 0.5 is a genuinely mixed
            process, unlike a default that makes the uniform share vanish (the review of the
            diffusers hybrid scheduler found its default ``p_uniform = 0`` clipped to ``e^-20``,
            i.e. absorbing diffusion in disguise). Compared with absorbing diffusion, with
            λ = 0.5: half of the prior's positions are random real tokens rather than masks;
            a position that is not a mask is not frozen, since the posterior may keep it,
            resample it from x̂_0, replace it by a random token or re-mask it, so early mistakes
            can be corrected; and the step needs ``x̂_0(x_t)`` at every position, not only at
            masks.

    Example::

        >>> sched = TokenDiffusionScheduler(vocab_size=11, mask_token_id=10, forward_process="hybrid")
        >>> sched.set_timesteps(64)
        >>> x = sched.sample_prior((4, 32), generator=torch.Generator().manual_seed(0))
        >>> x = sched.step(logits, x, sched.alphas[0], sched.alphas[1], seed=0, offset=0)
    """

    def __init__(self, vocab_size: int, mask_token_id: Optional[int] = None, forward_process: str = "absorbing",
                 alpha_schedule: str = "log_linear", eps: float = 1e-3, sigma_min: float = 1e-4,
                 sigma_max: float = 20.0, mask_fraction: float = 0.5):
        vocab_size = _int("vocab_size", vocab_size, 2)
        if forward_process not in FORWARD_PROCESSES:
            raise ValueError(f"`forward_process` must be one of {FORWARD_PROCESSES}, got {forward_process!r}.")
        if alpha_schedule not in ALPHA_SCHEDULES:
            raise ValueError(f"`alpha_schedule` must be one of {ALPHA_SCHEDULES}, got {alpha_schedule!r}.")
        ddiff.alpha_schedule(0.5, alpha_schedule, eps, sigma_min=sigma_min, sigma_max=sigma_max)  # checks eps etc.
        if mask_token_id is not None:
            mask_token_id = _int("mask_token_id", mask_token_id)
            if not 0 <= mask_token_id < vocab_size:
                raise ValueError(f"`mask_token_id` must lie in [0, vocab_size={vocab_size}), got {mask_token_id}.")
        if forward_process in ("absorbing", "hybrid") and mask_token_id is None:
            raise ValueError(f"the {forward_process} process needs a `mask_token_id`.")
        if forward_process == "uniform" and mask_token_id is not None and mask_token_id != vocab_size - 1:
            raise ValueError(
                f"the uniform process cannot use mask_token_id={mask_token_id}: its noise is uniform over a "
                f"contiguous range [0, N) of ids, so the mask can only be excluded when it is the last id "
                f"({vocab_size - 1}). Pass mask_token_id=None (noise over all {vocab_size} ids) or "
                f"{vocab_size - 1}."
            )
        if isinstance(mask_fraction, bool) or not isinstance(mask_fraction, numbers.Real) \
                or not 0.0 <= float(mask_fraction) <= 1.0:
            raise ValueError(f"`mask_fraction` must be a float in [0, 1], got {mask_fraction!r}.")
        self.config = dict(vocab_size=vocab_size, mask_token_id=mask_token_id, forward_process=forward_process,
                           alpha_schedule=alpha_schedule, eps=float(eps), sigma_min=float(sigma_min),
                           sigma_max=float(sigma_max), mask_fraction=float(mask_fraction))
        self.timesteps: Optional[Tensor] = None
        self.alphas: Optional[Tensor] = None
        self.num_inference_steps: Optional[int] = None

    # -----------------------------------------------------------------------------------------
    # Config
    # -----------------------------------------------------------------------------------------

    def __getattr__(self, name):
        config = self.__dict__.get("config")
        if config is not None and name in config:
            return config[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    @property
    def num_uniform_tokens(self) -> int:
        """Size of the uniform part's support: ``N`` (uniform) or ``K = vocab_size − 1`` (hybrid)."""
        if self.forward_process == "hybrid" or self.mask_token_id is not None:
            return self.vocab_size - 1
        return self.vocab_size

    # -----------------------------------------------------------------------------------------
    # Schedule
    # -----------------------------------------------------------------------------------------

    def alpha(self, t):
        """α(t): the probability that a token is still clean at time ``t`` (float or tensor)."""
        return ddiff.alpha_schedule(t, self.alpha_schedule, self.eps, sigma_min=self.sigma_min,
                                    sigma_max=self.sigma_max)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """``timesteps``: ``num_inference_steps + 1`` times from 1 down to 0; ``alphas``: α at each.

        Step ``k`` goes from ``timesteps[k]`` to ``timesteps[k + 1]``. The last α is set to 1
        (the clean data) whatever the schedule's α(0) (``1 − eps`` for linear / cosine), so the
        last step reveals every remaining mask, as MDLM's final denoising step does.
        """
        n = _int("num_inference_steps", num_inference_steps, 1)
        self.num_inference_steps = n
        self.timesteps = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64, device=device)
        alphas = self.alpha(self.timesteps)
        alphas[-1] = 1.0
        self.alphas = alphas

    # -----------------------------------------------------------------------------------------
    # Forward process
    # -----------------------------------------------------------------------------------------

    def _uniform_tokens(self, shape, generator, device) -> Tensor:
        n = self.num_uniform_tokens
        tokens = torch.randint(0, n, shape, generator=generator, device=device)
        if self.forward_process == "hybrid":  # skip the mask id: [0, K) -> non-mask ids
            tokens = tokens + (tokens >= self.mask_token_id).long()
        return tokens

    def sample_prior(self, shape, *, generator: Optional[torch.Generator] = None, device=None) -> Tensor:
        """Draw ``x_1 ~ π``: all masks (absorbing), uniform ids (uniform), or a λ-mixture (hybrid)."""
        shape = tuple(shape)
        if device is None and generator is not None:
            device = generator.device
        if self.forward_process == "absorbing":
            return torch.full(shape, self.mask_token_id, dtype=torch.long, device=device)
        tokens = self._uniform_tokens(shape, generator, device)
        if self.forward_process == "uniform":
            return tokens
        to_mask = torch.rand(shape, generator=generator, device=device) < self.mask_fraction
        return torch.where(to_mask, torch.full_like(tokens, self.mask_token_id), tokens)

    def add_noise(self, x0: Tensor, t, *, generator: Optional[torch.Generator] = None) -> Tensor:
        """Draw ``x_t ~ q(x_t | x_0)``: keep each token with probability α(t), else draw it from π.

        ``t``: a float, a ``[B]`` tensor (one time per sequence) or a tensor shaped like ``x0``.
        """
        alpha = self.alpha(t) if not isinstance(t, torch.Tensor) else self.alpha(t.to(x0.device))
        alpha = torch.as_tensor(alpha, dtype=torch.float32, device=x0.device)
        if alpha.dim() == 1 and x0.dim() == 2 and alpha.shape[0] == x0.shape[0]:
            alpha = alpha[:, None]
        keep = torch.rand(x0.shape, generator=generator, device=x0.device) < alpha
        return torch.where(keep, x0, self.sample_prior(x0.shape, generator=generator, device=x0.device))

    # -----------------------------------------------------------------------------------------
    # Reverse steps
    # -----------------------------------------------------------------------------------------

    def step(self, logits: Tensor, x_t: Tensor, alpha_t, alpha_s, *, temperature: float = 1.0,
             top_p: Optional[float] = None, top_p_mode: str = "inclusive", seed: int = 0, offset: int = 0,
             backend: str = "auto") -> Tensor:
        """One reverse step ``x_t -> x_s`` (``α_t <= α_s``) from the model's logits ``[..., V]``.

        ``temperature`` and ``top_p`` shape x̂_0 (for "uniform" the logits are divided by the
        temperature and filtered with :func:`ddiff.filter_logits` before :func:`ddiff.udlm_step`,
        which takes neither). ``top_p_mode``: ``"inclusive"`` (transformers: the token that
        crosses ``top_p`` is kept) or ``"bd3lm"`` (BD3LM's nucleus: a token is kept when the
        cumulative probability including its own is at most ``top_p``, and the top one always).
        ``temperature = 0`` (greedy) is only defined for "absorbing".

        Logit columns past ``vocab_size`` (padding of the model's head) are never sampled: the
        step returns ids in ``[0, vocab_size)`` only. A position whose logits row is invalid
        (NaN / +inf, or entirely -inf after the filters) comes back as ``-1`` from the uniform
        and hybrid steps (as from :func:`ddiff.sample`) and stays the mask from the absorbing one
        (as from :func:`ddiff.mdlm_step`) when the ops' value checks are off; with them on the
        ops raise.
        """
        alpha_t, alpha_s = _as_float(alpha_t), _as_float(alpha_s)
        logits = self._process_columns(logits)
        if self.forward_process == "absorbing":
            return ddiff.mdlm_step(logits, x_t, self.mask_token_id, alpha_t, alpha_s, temperature=temperature,
                                   top_p=top_p, top_p_mode=top_p_mode, seed=seed, offset=offset, backend=backend)
        if not temperature > 0:
            raise ValueError(f"the {self.forward_process} process needs temperature > 0, got {temperature}.")
        if self.forward_process == "uniform":
            z = logits[..., : self.num_uniform_tokens]
            if temperature != 1.0:
                z = z.float() / temperature
            if top_p is not None and top_p < 1.0:
                z = ddiff.filter_logits(z, top_p=top_p, top_p_mode=top_p_mode, backend=backend)
            return ddiff.udlm_step(z, x_t, alpha_t, alpha_s, seed=seed, offset=offset, backend=backend)
        return self._hybrid_step(logits, x_t, alpha_t, alpha_s, temperature, top_p, top_p_mode, seed, offset,
                                 backend)

    def _process_columns(self, logits: Tensor) -> Tensor:
        """The logits' first ``vocab_size`` columns (a view; the model's head may have more)."""
        return logits[..., : self.vocab_size] if logits.shape[-1] > self.vocab_size else logits

    def hybrid_posterior_weights(self, p_xt: Tensor, is_mask: Tensor, alpha_t, alpha_s) -> Tensor:
        """Unnormalised weights ``[..., 4]`` of (draw from x̂_0, uniform non-mask, the mask, keep x_t).

        ``p_xt``: x̂_0 of the current token (ignored where ``is_mask``). float64. See the module
        docstring for the table; rows where ``x_t`` is not the mask are divided by ``c``.
        """
        lam = self.mask_fraction
        k = self.vocab_size - 1
        a_t = torch.as_tensor(alpha_t, dtype=torch.float64, device=p_xt.device)
        a_s = torch.as_tensor(alpha_s, dtype=torch.float64, device=p_xt.device)
        a_ts = torch.where(a_s > 0, a_t / torch.where(a_s > 0, a_s, torch.ones_like(a_s)), torch.zeros_like(a_s))
        p = p_xt.double()
        w_model = (a_s - a_t).expand_as(p)
        w_unif = ((1 - a_ts) * (1 - a_s) * (1 - lam)).expand_as(p)
        w_mask_real = ((1 - a_ts) * (1 - a_s) * lam).expand_as(p)
        w_stay = ((a_ts + (1 - a_ts) * lam) * (1 - a_s)).expand_as(p)
        c = (1 - lam) / k
        if c > 0:
            w_keep = a_t * p / c + a_ts - a_t
        else:  # λ = 1: a real token never comes from noise, so x_0 = x_t and it is kept
            w_model, w_unif, w_mask_real = (torch.zeros_like(p),) * 3
            w_keep = torch.ones_like(p)
        w_mask = torch.where(is_mask, w_stay, w_mask_real)
        w_model = torch.where(is_mask, (a_s - a_t).expand_as(p), w_model)
        w_unif = torch.where(is_mask, ((1 - a_ts) * (1 - a_s) * (1 - lam)).expand_as(p), w_unif)
        w_keep = torch.where(is_mask, torch.zeros_like(p), w_keep)
        return torch.stack([w_model, w_unif, w_mask, w_keep], dim=-1).clamp_min(0.0)

    def _hybrid_step(self, logits, x_t, alpha_t, alpha_s, temperature, top_p, top_p_mode, seed, offset, backend):
        if offset >= AUX_OFFSET:
            raise ValueError(f"`offset` must be < 2^48 for the hybrid step, got {offset}.")
        m, v = self.mask_token_id, logits.shape[-1]
        rows2d = logits.reshape(-1, v)
        x = x_t.reshape(-1)
        is_mask = x == m
        if self.mask_fraction == 1.0:  # λ = 1: exactly absorbing (and no keep weight to compute)
            p_xt = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        else:
            z = rows2d.float() / temperature
            z = z.index_fill(-1, torch.tensor([m], device=z.device), float("-inf"))
            p_xt = torch.exp(z.gather(-1, x[:, None].clamp(0, v - 1)).squeeze(-1) - torch.logsumexp(z, -1))
            del z
        w = self.hybrid_posterior_weights(p_xt, is_mask, alpha_t, alpha_s)
        part = ddiff.sample(w.log().float(), seed=seed, offset=offset + _AUX_HYBRID_PART * AUX_OFFSET,
                            backend=backend)
        tokens, _ = ddiff.predict_tokens(rows2d, mask=part == 0, temperature=temperature, top_p=top_p,
                                         top_p_mode=top_p_mode, confidence_from="raw", suppress_tokens=[m],
                                         seed=seed, offset=offset, backend=backend)
        out = torch.where(part == 0, tokens, x)
        out = torch.where(part == 2, torch.full_like(x, m), out)
        uniform_rows = torch.nonzero(part == 1).squeeze(-1)
        if uniform_rows.numel():
            k = self.vocab_size - 1
            flat = torch.zeros(1, k, device=logits.device).expand(uniform_rows.numel(), k)
            j = ddiff.sample(flat, seed=seed, offset=offset + _AUX_UNIFORM_TOKEN * AUX_OFFSET, backend=backend)
            out[uniform_rows] = j + (j >= m).long()
        # an invalid logits row gives NaN weights (part -1) or an invalid x̂_0 draw (token -1):
        # report -1 there, as the ops do, never a token picked from garbage
        out = torch.where(part < 0, torch.full_like(out, -1), out)
        return out.view(x_t.shape)

    # -----------------------------------------------------------------------------------------
    # First-hitting sampler (absorbing only)
    # -----------------------------------------------------------------------------------------

    def first_hitting_step(self, logits: Tensor, x_t: Tensor, *, temperature: float = 1.0,
                           top_p: Optional[float] = None, top_p_mode: str = "inclusive", seed: int = 0,
                           offset: int = 0, backend: str = "auto", can_change: Optional[Tensor] = None) -> Tensor:
        """Reveal exactly one masked position per row (the first-hitting sampler, absorbing only).

        Among the masked positions of each row ``[B, W]`` (restricted to ``can_change``) one is
        chosen uniformly (``ddiff.sample`` over equal logits) and revealed with a token drawn
        from softmax(logits / T) with top-p (``top_p_mode`` as in :meth:`step`), through
        :func:`ddiff.mdlm_step` with per-position
        α (α_t = 0 everywhere, α_s = 1 at the chosen position only, so the reveal probability is
        exactly 1 there and 0 elsewhere). Rows with no masked position are copied.
        """
        if self.forward_process != "absorbing":
            raise ValueError("the first-hitting sampler is defined for the absorbing process only.")
        if offset >= AUX_OFFSET:
            raise ValueError(f"`offset` must be < 2^48, got {offset}.")
        logits = self._process_columns(logits)
        masked = x_t == self.mask_token_id
        if can_change is not None:
            masked = masked & can_change
        choice = torch.zeros(masked.shape, dtype=torch.float32, device=x_t.device).masked_fill(~masked, float("-inf"))
        choice[:, 0] = torch.where(masked.any(-1), choice[:, 0], torch.zeros_like(choice[:, 0]))
        pick = ddiff.sample(choice, seed=seed, offset=offset + _AUX_POSITION * AUX_OFFSET, backend=backend)
        alpha_s = torch.nn.functional.one_hot(pick, masked.shape[-1]).bool() & masked
        alpha_s = alpha_s.to(torch.float32)
        return ddiff.mdlm_step(logits, x_t, self.mask_token_id, torch.zeros_like(alpha_s), alpha_s,
                               temperature=temperature, top_p=top_p, top_p_mode=top_p_mode, seed=seed,
                               offset=offset, backend=backend)

    def first_hitting_time(self, t: Tensor, num_masked: Tensor, *, seed: int = 0, offset: int = 0) -> Tensor:
        """The next reveal time ``t · u^(1/n)`` of the first-hitting sampler (Zheng et al., 2024,
        "Masked diffusion models are secretly time-agnostic masked models and exploit inaccurate
        categorical sampling", as BD3LM's ``_semi_ar_sampler``): with ``n`` masks left at time
        ``t`` under the log-linear schedule, each mask's reveal time is uniform on ``[0, t]``, so
        the latest of them is ``t · u^(1/n)``. ``u`` comes from ddiff's counter-based noise, one
        per row. Rows with ``n = 0`` keep ``t``. A time-agnostic denoiser never reads this time;
        it is reported to callbacks.
        """
        from ddiff.reference.decoding import row_uniform
        from ddiff.reference.rng import STREAM_POSTERIOR

        from ddiff._checks import seed_int64

        seeds = torch.full(num_masked.shape, seed_int64("seed", seed), dtype=torch.int64, device=num_masked.device)
        u = row_uniform(seeds, offset + _AUX_TIME * AUX_OFFSET, STREAM_POSTERIOR).double()
        n = num_masked.double()
        factor = torch.where(n > 0, u ** (1.0 / n.clamp_min(1.0)), torch.ones_like(u))
        return t.double() * factor


def _as_float(alpha):
    if isinstance(alpha, torch.Tensor) and alpha.dim() == 0:
        return float(alpha)
    return alpha
