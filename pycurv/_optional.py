"""Lazy imports of optional dependencies, with one sentence on how to get them."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

_EXTRA = {
    "scipy": "scipy",
    "torch": "torch",
    "jax": "jax",
    "matplotlib": "plot",
    "cupy": "cuda",
}


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` or raise MissingDependencyError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = _EXTRA.get(top, top)
        raise MissingDependencyError(
            f"{feature} needs {top}, which is not installed: pip install 'pycurv[{extra}]'"
        ) from exc


def loaded(module: str) -> ModuleType | None:
    """The module if it is already imported (never imports it), else None."""
    import sys

    return sys.modules.get(module)
