"""Placeholder: being written."""
def anchor_attention(*args, **kwargs):
    raise NotImplementedError


def anchor_mask_mod(*args, **kwargs):
    raise NotImplementedError
