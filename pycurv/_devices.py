"""Where an array or operator lives: device names and the device of an array.

Below both the argument checks (:mod:`pycurv._checks`) and the CUDA runner
(:mod:`pycurv._gpu`); imports no framework: an array can only be a torch tensor
if torch is in ``sys.modules``.
"""

from __future__ import annotations

import sys
from typing import Optional

import numpy as np

__all__ = ["normalize_device", "is_gpu", "device_index", "array_device", "jax_device_name", "jax_local_device"]


def normalize_device(device) -> str:
    """``"cpu"``, or ``"cuda:N"`` for a CUDA device (``"cuda"`` is ``"cuda:0"``; JAX's ``"gpu:N"`` is ``"cuda:N"``)."""
    name = str(device).strip().lower()
    for prefix in ("cuda", "gpu"):
        if name == prefix:
            return "cuda:0"
        if name.startswith(prefix + ":"):
            index = name[len(prefix) + 1:]
            if not index.isdigit():
                raise ValueError(f"device must be 'cpu' or 'cuda:N' with N a device index, got device={device!r}")
            return f"cuda:{int(index)}"
    return name


def is_gpu(device) -> bool:
    """True for a CUDA device name (``cuda``, ``cuda:N``, ``gpu:N``, or a ``torch.device`` of type cuda)."""
    return device is not None and normalize_device(device).startswith("cuda:")


def device_index(device) -> int:
    return int(normalize_device(device).split(":")[1])


def array_device(x) -> Optional[str]:
    """``"cuda:N"`` if ``x`` is an array in CUDA device memory, else None; never imports a framework."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return f"cuda:{x.device.index or 0}" if x.device.type == "cuda" else None
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return f"cuda:{x.device.id}"
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, getattr(jax, "Array", ())):
        dev = _jax_device(x)
        return jax_device_name(dev) if dev is not None and dev.platform == "gpu" else None
    if isinstance(x, (np.ndarray, np.generic, list, tuple, int, float)):
        return None
    dlpack_device = getattr(x, "__dlpack_device__", None)
    if callable(dlpack_device):
        try:
            kind, index = dlpack_device()
        except Exception:  # noqa: BLE001 - not a usable DLPack exporter: not a device array either
            kind, index = None, None
        if kind is not None:
            return f"cuda:{int(index)}" if int(kind) in (2, 13) else None  # kDLCUDA, kDLCUDAManaged
    if hasattr(x, "__cuda_array_interface__"):
        return "cuda:0"  # the interface does not name the device; the CUDA module checks the pointer
    return None


def jax_device_name(dev) -> str:
    """pycurv's name of a JAX device: ``"cuda:N"`` with N the CUDA index in this process.

    ``Device.id`` is numbered across all processes of a multi-process JAX run
    (process k's first GPU may be id 8 k), so it is not a CUDA device index;
    ``local_hardware_id`` is, where the platform has one.
    """
    if dev.platform != "gpu":
        return f"{dev.platform}:{dev.id}"
    local = getattr(dev, "local_hardware_id", None)
    return f"cuda:{dev.id if local is None else int(local)}"


def jax_local_device(devices):
    """The first of ``devices`` (e.g. ``mesh.devices.flat``) that this process can address."""
    devices = list(devices)
    for dev in devices:
        if getattr(dev, "process_index", 0) == _jax_process_index():
            return dev
    raise ValueError(f"none of the {len(devices)} devices of the mesh belongs to this process "
                     f"(process {_jax_process_index()}); build the mesh from devices this process can address")


def _jax_process_index() -> int:
    jax = sys.modules.get("jax")
    return int(jax.process_index()) if jax is not None else 0


def _jax_device(x):
    try:
        return next(iter(x.devices()))
    except Exception:  # noqa: BLE001 - abstract tracers have no device
        return None
