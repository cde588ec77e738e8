"""The torch backend's fast path (CPU, MPS): the same integers and tokens as ``ddiff.reference``.

``ddiff/reference/`` is the readable definition of every op; this package computes the same
results with fewer passes over ``[rows, V]``: one log-sum-exp pass, filter thresholds from
``torch.topk`` instead of a full sort, Philox only for the ``V / 1024`` tile draws and the
winning tile, and no float64 on the ``[rows, V]`` path. ``tests/test_torch_fast.py`` checks it
against the reference bit for bit on tokens.
"""
