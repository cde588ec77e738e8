"""Training losses and recipes for discrete diffusion models.

* :mod:`ddiff.training.token_diffusion`: MDLM / BD3LM (absorbing) and UDLM (uniform) losses, the
  BD3LM attention mask, noising helpers and the synthetic languages the tests train on.
* :mod:`ddiff.training.dflash`: the DFlash draft loss (:func:`dflash_loss`), anchor sampling and
  the ``dflash`` recipe.
* :mod:`ddiff.training.loop`: the accelerate training loop behind ``python -m ddiff.train``, with
  one :class:`~ddiff.training.loop.Recipe` per objective.
"""

from ddiff.training.dflash import dflash_loss  # noqa: F401
from ddiff.training.token_diffusion import (  # noqa: F401
    BlockDiffusionMask,
    LANGUAGES,
    LossOutput,
    alpha_derivative,
    block_diffusion_mask,
    is_valid,
    language_tokenizer,
    mdlm_loss,
    noise_absorbing,
    noise_uniform,
    sample_language,
    sample_times,
    udlm_integrand,
    udlm_loss,
    uniform_support,
)

__all__ = [
    "BlockDiffusionMask",
    "LANGUAGES",
    "LossOutput",
    "alpha_derivative",
    "block_diffusion_mask",
    "dflash_loss",
    "is_valid",
    "language_tokenizer",
    "mdlm_loss",
    "noise_absorbing",
    "noise_uniform",
    "sample_language",
    "sample_times",
    "udlm_integrand",
    "udlm_loss",
    "uniform_support",
]
