"""``pycurv info``: versions, build flags and CUDA availability, for bug reports."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

from ._common import emit_json

_OPTIONAL = ("numpy", "scipy", "torch", "jax", "jaxlib", "cupy", "matplotlib")


def register(sub):
    p = sub.add_parser("info", help="versions, build flags and CUDA availability",
                       description="Versions of pycurv, Python and the optional packages, the compiled core's "
                                   "build flags (OpenMP, compiler) and CUDA availability: paste it into bug "
                                   "reports.")
    p.add_argument("--json", action="store_true", help="strict JSON on stdout")
    p.set_defaults(func=run)


def _version(dist: str):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        if dist == "cupy":
            for name in ("cupy-cuda12x", "cupy-cuda13x", "cupy-cuda11x"):
                try:
                    return metadata.version(name)
                except metadata.PackageNotFoundError:
                    pass
        return None


def collect() -> dict:
    from .. import __version__
    from .._native import build_info

    info = {
        "pycurv": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "build": build_info(),
        "packages": {name: _version(name) for name in _OPTIONAL},
    }
    info.update(cuda_status())
    return info


def cuda_status() -> dict:
    """cuda_compiled: the CUDA module was built; cuda_devices: GPUs it can see.

    With the module: cuda_build (runtime, driver, architectures, whether it is
    the CPU emulation) and, when no device is visible, cuda_error (why).
    """
    try:
        from .. import _cuda  # noqa: F401
    except ImportError:
        return {"cuda_compiled": False, "cuda_devices": []}
    try:
        status = {"cuda_compiled": True, "cuda_devices": list(_cuda.devices()), "cuda_build": dict(_cuda.build_info())}
        status["cuda_build"]["driver_floor"] = driver_floor(status["cuda_build"])
        if not status["cuda_devices"]:
            status["cuda_error"] = _cuda.device_error()
        return status
    except Exception as exc:  # noqa: BLE001 - a driver problem is reported, not raised
        return {"cuda_compiled": True, "cuda_devices": [], "cuda_error": str(exc)}


# The oldest driver branch each CUDA runtime major version runs on (the runtime is
# linked statically, so the driver is all the module needs at run time).
_DRIVER_FLOORS = {12: "R525", 13: "R580"}


def driver_floor(build: dict):
    """The driver branch the module's CUDA runtime needs ("R580" for CUDA 13), or None (emulated, unknown)."""
    if build.get("emulated"):
        return None
    try:
        major = int(str(build.get("cuda_runtime", "")).split(".")[0])
    except ValueError:
        return None
    return _DRIVER_FLOORS.get(major)


def run(args) -> int:
    info = collect()
    if args.json:
        emit_json(info)
        return 0
    w = sys.stdout.write
    w(f"pycurv {info['pycurv']}  (Python {info['python']}, {info['platform']})\n")
    b = info["build"]
    w(f"  core: {b['compiler']}, OpenMP {'on' if b['openmp'] else 'off'} ({b['max_threads']} threads)\n")
    devs = info["cuda_devices"]
    cb = info.get("cuda_build", {})
    built = "not compiled"
    if info["cuda_compiled"]:
        built = ("compiled (CPU emulation)" if cb.get("emulated") else
                 f"compiled (runtime {cb.get('cuda_runtime', '?')}, needs driver {cb.get('driver_floor') or '?'} or "
                 f"newer; architectures {cb.get('architectures', '?')}, driver {cb.get('cuda_driver', '?')})")
    names = ", ".join(d["name"] if isinstance(d, dict) else str(d) for d in devs)
    why = f" ({info['cuda_error']})" if info.get("cuda_error") else ""
    w(f"  CUDA: {built}; devices: {names or 'none'}{why}\n")
    for name, ver in info["packages"].items():
        w(f"  {name:<11s}{ver or '-'}\n")
    return 0
