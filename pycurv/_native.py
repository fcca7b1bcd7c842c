"""The one place that imports the compiled core."""

from __future__ import annotations

try:
    from . import _core as core
except ImportError as exc:  # pragma: no cover - only in a source tree without a build
    raise ImportError(
        "pycurv's compiled core (pycurv._core) is missing: install the package with "
        "`pip install .` from the repository root rather than importing the source tree"
    ) from exc

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
