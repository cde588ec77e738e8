"""ddiff's drop-in ops. Every op takes ``backend="auto" | "torch" | "triton"``."""

from ddiff.ops.attention import anchor_attention, anchor_mask_mod
from ddiff.ops.decoding import mdlm_step, predict_tokens, udlm_step
from ddiff.ops.noise import renoise_uniform
from ddiff.ops.sampling import filter_logits, sample
from ddiff.ops.schedules import alpha_schedule
from ddiff.ops.selection import num_transfer_tokens, select_edits, select_transfer

__all__ = [
    "alpha_schedule",
    "anchor_attention",
    "anchor_mask_mod",
    "filter_logits",
    "mdlm_step",
    "num_transfer_tokens",
    "predict_tokens",
    "renoise_uniform",
    "sample",
    "select_edits",
    "select_transfer",
    "udlm_step",
]
