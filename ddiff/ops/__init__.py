"""ddiff's drop-in ops. Every op takes ``backend="auto" | "torch" | "triton"``."""

from ddiff.ops.attention import anchor_attention, anchor_mask_mod
from ddiff.ops.sampling import filter_logits, sample
from ddiff.ops.schedules import alpha_schedule
from ddiff.ops.selection import num_transfer_tokens, select_edits, select_transfer

__all__ = [
    "alpha_schedule",
    "anchor_attention",
    "anchor_mask_mod",
    "filter_logits",
    "num_transfer_tokens",
    "sample",
    "select_edits",
    "select_transfer",
]
