"""ddiff: fused Triton kernels for discrete diffusion language models."""


def _locate_kernels() -> None:
    """Make ``ddiff.kernels`` resolve to the repository's top-level ``kernels/`` folder.

    ``kernels/`` has no ``__init__.py`` on purpose: a folder without one is only a namespace
    portion, so it always loses to an installed regular package of the same name (Hugging Face's
    ``kernels``, which transformers imports) even with the repository root first on ``sys.path``.
    An installed wheel ships the folder as ``ddiff/kernels/`` and the import system finds it on its
    own; in a source checkout or an editable install (whose finder maps only packages that have an
    ``__init__.py``) the folder sits beside ``ddiff/``, so the subpackage is declared here.
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys

    if "ddiff.kernels" in sys.modules or importlib.machinery.PathFinder.find_spec("kernels", __path__):
        return
    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    if not os.path.isdir(source):
        return  # a broken install: `import ddiff.kernels` reports it
    spec = importlib.machinery.ModuleSpec("ddiff.kernels", None, is_package=True)
    spec.submodule_search_locations = [source]
    module = importlib.util.module_from_spec(spec)
    sys.modules["ddiff.kernels"] = module
    setattr(sys.modules[__name__], "kernels", module)  # as the import system does for a found subpackage


_locate_kernels()

from ddiff import ops  # noqa: E402
from ddiff._params import sync_checks  # noqa: E402
from ddiff.ops import *  # noqa: E402,F401,F403
from ddiff.ops import __all__ as _ops_all  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "sync_checks", *_ops_all]
