"""Masked-diffusion noise schedules α(t)."""

from __future__ import annotations

import math
from typing import Union

import torch

from ddiff._checks import check_choice, eager, is_real

__all__ = ["ALPHA_SCHEDULES", "alpha_schedule"]

ALPHA_SCHEDULES = ("log_linear", "linear", "cosine", "geometric")


def alpha_schedule(
    t: Union[float, torch.Tensor],
    kind: str = "log_linear",
    eps: float = 1e-3,
    *,
    sigma_min: float = 1e-4,
    sigma_max: float = 20.0,
) -> Union[float, torch.Tensor]:
    r"""The probability α(t) that a token is still clean at diffusion time t ∈ [0, 1].

    A token is masked (or, for uniform diffusion, replaced) with probability 1 - α(t).
    The formulas are those of diffusers' ``TokenDiffusionScheduler._alpha_t`` (the
    discrete token diffusion scheduler, ``scheduling_token_diffusion.py``), with the
    same defaults (``eps = 1e-3``, ``sigma_min = 1e-4``, ``sigma_max = 20``):

    * ``"log_linear"``: α(t) = 1 - (1 - eps)·t                      (α(0) = 1, α(1) = eps)
    * ``"linear"``:     α(t) = (1 - 2·eps)·(1 - t) + eps           (α(0) = 1 - eps, α(1) = eps)
    * ``"cosine"``:     α(t) = (1 - 2·eps)·(1 - cos(π/2·(1 - t))) + eps
      (α(0) = 1 - eps, α(1) = eps)
    * ``"geometric"``:  α(t) = exp(-σ_min^(1-t)·σ_max^t)            (α(0) = e^-σ_min, α(1) = e^-σ_max);
      ``eps`` is not used, as in diffusers.

    All four decrease monotonically in t. The log-linear one is MDLM's log-linear noise
    (total noise σ(t) = -log(1 - (1 - eps)·t)).

    Args:
        t: a Python float, or a tensor of any shape, with values in [0, 1]. A tensor
            input is checked with one reduction (a host sync on CUDA, skipped while
            ``torch.compile`` traces).
        kind: one of ``"log_linear"``, ``"linear"``, ``"cosine"``, ``"geometric"``.
        eps: in (0, 1).
        sigma_min, sigma_max: the geometric schedule's noise range, 0 < sigma_min < sigma_max.

    Returns:
        A Python float for a float ``t``; otherwise a tensor shaped like ``t`` (floating
        dtype: ``t``'s own, or the default dtype for an integer/bool ``t``).

    Example::

        >>> alpha_schedule(0.5)
        0.5005
        >>> alpha_schedule(torch.tensor([0.0, 1.0]), "linear")
        tensor([0.9990, 0.0010])
    """
    check_choice("kind", kind, ALPHA_SCHEDULES)
    if not is_real(eps) or not 0.0 < eps < 1.0:
        raise ValueError(f"`eps` must be a float in (0, 1), got {eps!r}.")
    if kind == "geometric" and not (0.0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < `sigma_min` < `sigma_max`, got sigma_min={sigma_min}, sigma_max={sigma_max}.")

    if isinstance(t, torch.Tensor):
        if t.is_complex():
            raise TypeError(f"`t` must be a real tensor, got {t.dtype}.")
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        if eager() and t.numel() > 0:  # a host sync: skipped under torch.compile and sync_checks(False)
            if not bool(((t >= 0) & (t <= 1)).all()):
                raise ValueError("`t` must lie in [0, 1] (NaN is not allowed).")
        if kind == "log_linear":
            return 1.0 - (1.0 - eps) * t
        if kind == "linear":
            return (1.0 - 2.0 * eps) * (1.0 - t) + eps
        if kind == "cosine":
            return (1.0 - 2.0 * eps) * (1.0 - torch.cos((math.pi / 2.0) * (1.0 - t))) + eps
        return torch.exp(-(sigma_min ** (1.0 - t)) * (sigma_max**t))

    if not is_real(t):
        raise TypeError(f"`t` must be a float or a tensor, got {type(t).__name__}.")
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"`t` must lie in [0, 1], got {t}.")
    if kind == "log_linear":
        return 1.0 - (1.0 - eps) * t
    if kind == "linear":
        return (1.0 - 2.0 * eps) * (1.0 - t) + eps
    if kind == "cosine":
        return (1.0 - 2.0 * eps) * (1.0 - math.cos(math.pi / 2.0 * (1.0 - t))) + eps
    return math.exp(-(sigma_min ** (1.0 - t)) * (sigma_max**t))
