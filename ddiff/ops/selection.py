"""Placeholder: being written."""
def num_transfer_tokens(*args, **kwargs):
    raise NotImplementedError


def select_edits(*args, **kwargs):
    raise NotImplementedError


def select_transfer(*args, **kwargs):
    raise NotImplementedError
