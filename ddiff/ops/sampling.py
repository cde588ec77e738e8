"""Placeholder: being written."""
def filter_logits(*args, **kwargs):
    raise NotImplementedError


def sample(*args, **kwargs):
    raise NotImplementedError
