"""The one place that imports the compiled core."""

from __future__ import annotations


def _missing_core_message() -> str:
    """Why ``pycurv._core`` cannot be imported: usually a source folder shadowing the installed package."""
    import os
    from importlib import metadata

    here = os.path.dirname(os.path.realpath(__file__))
    installed = None
    try:
        dist = metadata.distribution("pycurv")
        init = os.path.realpath(str(dist.locate_file("pycurv/__init__.py")))
        if os.path.isfile(init) and os.path.dirname(init) != here:
            installed = os.path.dirname(init)
    except metadata.PackageNotFoundError:
        pass
    if installed is not None:
        return (f"pycurv is installed (in {installed}), but Python imported the source folder {here} instead, "
                "which has no compiled core: the current directory (or PYTHONPATH) puts the repository's pycurv/ "
                "ahead of the installed one. Change to another directory (e.g. cd ..) and run again")
    return ("pycurv's compiled core (pycurv._core) is missing: install the package with "
            "`pip install .` from the repository root, then import it from another directory")


try:
    from . import _core as core
except ImportError as exc:  # only in a source tree without a build
    raise ImportError(_missing_core_message()) from exc

MATVEC = int(core.Request.MATVEC.value)
REDUCE = int(core.Request.REDUCE.value)
STEP = int(core.Request.STEP.value)
DONE = int(core.Request.DONE.value)

WHICH_CODE = {"LA": 0, "SA": 1, "BE": 2}
STATUS = {1: "converged", 2: "max_matvecs", 3: "noise_floor", 4: "stopped"}


def build_info() -> dict:
    """Build flags of the compiled core (OpenMP, compiler)."""
    return dict(core.build_info())


def set_num_threads(n: int) -> None:
    """Number of threads the CPU kernels use (OpenMP)."""
    core.set_num_threads(n)
