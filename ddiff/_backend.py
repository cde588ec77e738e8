"""Backend resolution shared by every op: ``"torch"`` | ``"triton"`` | ``"auto"``."""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when triton imports (it does not on every platform)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tensor_kind(value) -> str:
    """``"functional"``, ``"fake"`` (fake or meta) or ``"real"`` for a tensor; ``""`` otherwise."""
    if not isinstance(value, torch.Tensor):
        return ""
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    if isinstance(value, FunctionalTensor):
        return "functional"
    return "fake" if value.device.type == "meta" or is_fake(value) else "real"


class _InterpretedLaunch:
    """``kernel[grid](*args)`` for the Triton interpreter, which cannot take ``wrap_triton``.

    While a ``triton_op`` runs on fake tensors (its fake kernel: shape propagation in
    ``torch.library.opcheck`` or ``torch.compile``) there is no data to compute on, so the
    launch is skipped and the outputs the launcher allocated carry the shapes. AOTDispatcher
    (functional tensors) would record a graph without the kernel, so that raises instead.
    """

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            kinds = {_tensor_kind(a) for a in (*args, *kwargs.values())}
            if "functional" in kinds:
                raise RuntimeError(
                    "Triton kernels under TRITON_INTERPRET=1 cannot be traced into a graph (AOTDispatcher / "
                    "torch.compile); call the op eagerly, or use backend='torch'."
                )
            if "fake" in kinds:
                return None
            return launch(*args, **kwargs)

        return run


def launch_wrapper():
    """How a ``triton_op`` launches a kernel: through ``torch.library.wrap_triton``, so
    ``torch.compile`` can trace the launch; under the interpreter (which has no compiled
    kernel to wrap) through :class:`_InterpretedLaunch`."""
    if triton_interpreting():
        return _InterpretedLaunch
    from torch.library import wrap_triton

    return wrap_triton


def resolve_backend(backend: str, tensor: torch.Tensor, *, extra=()) -> str:
    """Pick the implementation for ``tensor``'s device.

    ``"auto"`` is triton for CUDA tensors when triton imports, torch otherwise.
    ``"triton"`` needs a CUDA tensor, or a CPU tensor with ``TRITON_INTERPRET=1``.
    ``extra`` lists further accepted backend names (e.g. ``"flex"`` for attention).
    """
    allowed = BACKENDS + tuple(extra)
    if not isinstance(backend, str) or backend not in allowed:
        raise ValueError(f"`backend` must be one of {allowed}, got {backend!r}.")
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was requested but triton does not import on this machine.")
        if not tensor.is_cuda and not (tensor.device.type == "cpu" and triton_interpreting()):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got a tensor on {tensor.device}); "
                "for CPU tensors set TRITON_INTERPRET=1 before importing ddiff, or use backend='torch'."
            )
    return backend
