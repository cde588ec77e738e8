"""Placeholder: being written."""
def alpha_schedule(*args, **kwargs):
    raise NotImplementedError
