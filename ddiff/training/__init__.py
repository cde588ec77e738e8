"""Training losses and recipes for discrete diffusion models.

* :mod:`ddiff.training.token_diffusion`: MDLM / BD3LM (absorbing) and UDLM (uniform) losses, the
  BD3LM attention mask, noising helpers and the synthetic languages the tests train on.
* :mod:`ddiff.training.hybrid`: the hybrid (mask + uniform) process's NELBO (:func:`hybrid_loss`) and
  the ``hybrid`` recipe.
* :mod:`ddiff.training.bd3lm`: BD3LM's loss on ``x_t ⊕ x_0`` with FlexAttention (:func:`bd3lm_loss`)
  and the ``bd3lm`` recipe.
* :mod:`ddiff.training.block_refinement`: block refinement of a causal LM with the CAP confidence
  loss (:func:`block_refinement_loss`) and the ``block_refinement`` recipe.
* :mod:`ddiff.training.dflash`: the DFlash draft loss (:func:`dflash_loss`), anchor sampling and
  the ``dflash`` recipe.
* :mod:`ddiff.training.loop`: the accelerate training loop behind ``python -m ddiff.train``, with
  one :class:`~ddiff.training.loop.Recipe` per objective.
* :mod:`ddiff.training.data`: ``--data`` / ``--tokenizer`` / ``--model`` of the token recipes
  (your text, packed or truncated, a held-out split; your transformers model made a denoiser).
"""

from ddiff.training.bd3lm import bd3lm_loss  # noqa: F401
from ddiff.training.block_refinement import (  # noqa: F401
    block_refinement_loss,
    block_refinement_masks,
    confidence_aware_loss,
)
from ddiff.training.dflash import dflash_loss  # noqa: F401
from ddiff.training.hybrid import hybrid_integrand, hybrid_loss  # noqa: F401
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
    "bd3lm_loss",
    "block_diffusion_mask",
    "block_refinement_loss",
    "block_refinement_masks",
    "confidence_aware_loss",
    "dflash_loss",
    "hybrid_integrand",
    "hybrid_loss",
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
