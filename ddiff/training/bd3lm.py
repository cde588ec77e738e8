r"""BD3LM training (Arriola et al. 2025, "Block Diffusion"): the block-causal NELBO on ``x_t ⊕ x_0``.

One diffusion time per block; the denoiser sees the noisy sequence and the clean one side by side
(``2L`` positions, position ids ``0..L-1`` twice) under :func:`~ddiff.training.block_diffusion_mask`:
a noisy block attends to itself and to the clean blocks before it, the clean half is
block-causal. The loss is MDLM's, ``−α'(t)/(1 − α(t)) · (−log x̂_0(x_0))`` at the masked noisy
positions (SUBS), averaged over ``B · L``; :func:`bd3lm_loss` with ``attention="dense"`` is
exactly :func:`~ddiff.training.mdlm_loss` with ``block_size``.

``attention="flex"`` builds the same mask as a FlexAttention ``BlockMask`` from its ``mask_mod``
(tiles that the mask empties are skipped; the dense ``[2L, 2L]`` mask is never materialised) and
needs a model loaded with ``attn_implementation="flex_attention"``. ``"auto"`` picks flex for
CUDA tensors when FlexAttention imports (it has no CPU backward) and the dense SDPA mask
otherwise.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ddiff.denoiser import denoiser_logits, logits_of, tiny_denoiser
from ddiff.training.loop import Recipe, TrainingSetup
from ddiff.training.token_diffusion import (_absorbing_loss, _alpha, _token_times, block_diffusion_mask,
                                            noise_absorbing, sample_times)
from ddiff.training.token_diffusion_recipes import add_denoiser_arguments, saver

Tensor = torch.Tensor

__all__ = ["BD3LM", "BD3LM_ATTENTION", "bd3lm_loss", "flex_attention_available", "resolve_bd3lm_attention"]

BD3LM_ATTENTION = ("auto", "flex", "dense")


def flex_attention_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_bd3lm_attention(attention: str, device) -> str:
    """``"flex"`` or ``"dense"`` for ``attention`` in :data:`BD3LM_ATTENTION` on ``device``."""
    if attention not in BD3LM_ATTENTION:
        raise ValueError(f"`attention` must be one of {BD3LM_ATTENTION}, got {attention!r}.")
    if attention == "auto":
        return "flex" if torch.device(device).type == "cuda" and flex_attention_available() else "dense"
    if attention == "flex" and not flex_attention_available():
        raise RuntimeError("attention='flex' needs torch.nn.attention.flex_attention (torch >= 2.5).")
    return attention


@functools.lru_cache(maxsize=16)
def _flex_block_mask(seq_len: int, block_size: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = block_diffusion_mask(seq_len, block_size, device=device).mask_mod
    return create_block_mask(mask_mod, None, None, 2 * seq_len, 2 * seq_len, device=device)


def bd3lm_loss(model, x0: Tensor, t: Optional[Tensor] = None, *, mask_token_id: int, block_size: int,
               attention: str = "auto", alpha_schedule: str = "log_linear", eps: float = 1e-3,
               sigma_min: float = 1e-4, sigma_max: float = 20.0, t_min: float = 1e-3, antithetic: bool = True,
               generator: Optional[torch.Generator] = None, return_output: bool = False):
    r"""BD3LM's NELBO (module docstring), nats per token over ``B · L``.

    Args:
        model: a block-causal denoiser (``config.ddiff_attention = "block_causal"``); for
            ``attention="flex"`` loaded with ``attn_implementation="flex_attention"``.
        x0: int64 ``[B, L]`` clean tokens (never the mask id).
        t: ``[B]`` or ``[B, n_blocks]`` times; drawn per block by :func:`~ddiff.training.sample_times`
            if None.
        mask_token_id, block_size: the mask id and the BD3LM block size.
        attention: ``"auto"``, ``"flex"`` (FlexAttention ``BlockMask``) or ``"dense"`` (a 4-D bool
            mask, SDPA / eager).
        return_output: return a :class:`~ddiff.training.LossOutput` instead of the scalar.

    Example::

        >>> loss = bd3lm_loss(model, x0, mask_token_id=10, block_size=4)
    """
    batch, seq_len = x0.shape
    device = x0.device
    kind = resolve_bd3lm_attention(attention, device)
    if t is None:
        t = sample_times((batch, -(-seq_len // block_size)), t_min=t_min, antithetic=antithetic,
                         generator=generator, device=device)
    t_tok = _token_times(torch.as_tensor(t, device=device, dtype=torch.float32), batch, seq_len, block_size)
    alpha = _alpha(t_tok, alpha_schedule, eps, sigma_min, sigma_max)
    x_t = noise_absorbing(x0, alpha, mask_token_id, generator=generator)
    both = torch.cat([x_t, x0], dim=1)
    positions = torch.arange(seq_len, device=device).repeat(2)[None].expand(batch, 2 * seq_len)
    if kind == "flex":
        mask = _flex_block_mask(seq_len, block_size, str(device))
        logits = logits_of(model(input_ids=both, attention_mask=mask, position_ids=positions, use_cache=False))
    else:
        mask = block_diffusion_mask(seq_len, block_size, device=device).dense
        logits = denoiser_logits(model, both, attention_mask=mask, position_ids=positions)
    logits = logits[:, :seq_len]
    return _absorbing_loss(logits, x0, x_t, t_tok, alpha, mask_token_id, alpha_schedule, eps, sigma_min, sigma_max,
                           return_output)


# ---------------------------------------------------------------------------------------------
# ``python -m ddiff.train bd3lm``
# ---------------------------------------------------------------------------------------------


def _bd3lm_arguments(parser) -> None:
    add_denoiser_arguments(parser)
    parser.add_argument("--block_size", type=int, default=4, help="BD3LM block size")
    parser.add_argument("--attention", default="auto", choices=BD3LM_ATTENTION,
                        help="flex: FlexAttention BlockMask; dense: 4-D bool mask (SDPA); auto: flex on CUDA")


def _bd3lm_setup(args, accelerator) -> TrainingSetup:
    from ddiff.pipelines.token_diffusion_scheduler import TokenDiffusionScheduler
    from ddiff.training.data import build_model, prepare_data

    data = prepare_data(args, accelerator)
    vocab_size, mask_id = data.vocab_size, data.mask_token_id
    kind = resolve_bd3lm_attention(args.attention, accelerator.device)
    # config.json does not record the attention implementation: the checkpoint loads with the
    # default one, which TokenDiffusionPipeline's 4-D masks need.
    extra = {"attn_implementation": "flex_attention"} if kind == "flex" else {}
    model = build_model(args, data, lambda: tiny_denoiser(
        vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
        intermediate_size=args.intermediate_size, max_positions=max(64, 2 * args.seq_len), attention="block_causal",
        block_size=args.block_size, **extra), attention="block_causal", block_size=args.block_size, **extra)
    scheduler = TokenDiffusionScheduler(vocab_size=vocab_size, mask_token_id=mask_id, forward_process="absorbing",
                                        alpha_schedule=args.alpha_schedule, eps=args.eps)
    gen = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index + 1)
    kwargs = dict(mask_token_id=mask_id, block_size=args.block_size, attention=kind,
                  alpha_schedule=args.alpha_schedule, eps=args.eps, t_min=args.t_min)
    return TrainingSetup(model=model, next_batch=data.next_batch,
                         loss=lambda m, x0: bd3lm_loss(m, x0, generator=gen, **kwargs),
                         save=saver(data.tokenizer, scheduler), eval_batches=data.eval_batches,
                         eval_loss=lambda m, x0: bd3lm_loss(m, x0, **kwargs), generators={"noise": gen})


BD3LM = Recipe("bd3lm", "block diffusion (BD3LM): x_t ⊕ x_0 under the block-diffusion mask, FlexAttention on CUDA",
               _bd3lm_arguments, _bd3lm_setup)
