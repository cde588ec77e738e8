"""ddiff: fused Triton kernels for discrete diffusion language models."""

from ddiff import ops
from ddiff._params import sync_checks
from ddiff.ops import *  # noqa: F401,F403
from ddiff.ops import __all__ as _ops_all

__version__ = "0.1.0"
__all__ = ["ops", "sync_checks", *_ops_all]
