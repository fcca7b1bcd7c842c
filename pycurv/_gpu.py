"""Running the Lanczos solver on a CUDA device.

Where the vectors live decides where the solver runs: an operator whose
``device`` is a CUDA device (``"cuda:0"``; JAX says ``"gpu:0"``) is solved by
the CUDA module ``pycurv._cuda``, which keeps the float64 Krylov basis in device
memory and hands each basis vector to the operator as a zero-copy array of the
operator's ``framework`` (``"torch"``, ``"cupy"``, ``"jax"``, or None for the
module's own :class:`DeviceArray`, which any of them can read through DLPack).

Nothing here imports a framework that is not imported already: an array can
only be a torch tensor if torch is in ``sys.modules``. A framework is imported
only when an operator names it.
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional

import numpy as np

from . import _checks
from ._devices import array_device, device_index, is_gpu, normalize_device  # noqa: F401 (re-exported)
from ._optional import require
from .errors import CudaUnavailableError, HostBasisWarning

__all__ = ["is_gpu", "normalize_device", "array_device", "cuda_module", "Framework", "framework", "DeviceRun",
           "HostBasisRun", "device_run", "check_v0"]

_FLOAT_NAMES = ("float64", "float32", "float16", "bfloat16")
DRIVER_FLOOR = ("a build against the CUDA 13 toolkit needs driver R580 or newer, one against CUDA 12 needs R525 "
                "or newer; `pycurv info` shows both versions")
_REINSTALL = ("reinstall with pip install . -Ccmake.define.PYCURV_CUDA=ON on a machine with the CUDA toolkit, "
              "or move the operator to the CPU")


def cuda_module(device: str):
    """``pycurv._cuda`` ready to run on ``device``, or :class:`CudaUnavailableError` saying why not."""
    module, why = _usable_module(device)
    if module is None:
        cause, remedy = why
        raise CudaUnavailableError(f"{cause}, so it cannot run on {normalize_device(device)}: {remedy}")
    return module


def _usable_module(device: str):
    """(``pycurv._cuda``, None) when it can hold the basis on ``device``, else (None, (cause, remedy)).

    A device index beyond those the module sees is the caller's mistake, not a
    missing module: that raises.
    """
    device = normalize_device(device)
    try:
        from . import _cuda
    except ImportError:
        return None, ("pycurv was built without CUDA support", _REINSTALL)
    devices = _cuda.devices()
    if not devices:
        reason = _cuda.device_error() or "no device found"
        return None, (f"pycurv's CUDA module is built, but no CUDA device is visible ({reason})",
                      f"check the NVIDIA driver ({DRIVER_FLOOR}) and CUDA_VISIBLE_DEVICES, or move the operator to "
                      "the CPU")
    index = device_index(device)
    if index >= len(devices):
        raise CudaUnavailableError(
            f"{device} does not exist: {len(devices)} CUDA device(s) are visible "
            f"({', '.join(d['name'] for d in devices)})")
    return _cuda, None


# ---- frameworks ----------------------------------------------------------------------


class Framework:
    """How the solver exchanges vectors with one array library on the GPU.

    ``wrap`` turns the CUDA module's DeviceArray into the library's array without
    a copy (DLPack); ``stream`` is the library's current stream, the one the
    solver's kernels are queued on; ``astype`` casts on the device;
    ``eigenvectors`` is how the result's vectors are returned. Without a
    library (None) the matvec receives the DeviceArray itself and the
    eigenvectors come back as a NumPy array.
    """

    name: Optional[str] = None

    def wrap(self, arr):
        return arr

    def eigenvectors(self, arr):
        return arr.numpy() if self.name is None else self.wrap(arr)

    def stream(self, index: int):
        """(handle, owner): the current stream's raw handle (0: the legacy default stream) and the object that
        keeps it alive, which the solver's state holds until its basis and its eigenvectors are gone."""
        return 0, None

    def astype(self, x, dtype: str):
        if dtype != "float64":
            raise TypeError(f"pycurv DeviceArray holds float64 only; cannot cast to {dtype}")
        return x

    def namespace(self):  # pragma: no cover - only for the frameworks
        raise NotImplementedError

    def to_device(self, x: np.ndarray, device: str):
        """A copy of the host float64 vector ``x`` on ``device`` (the basis in host memory)."""
        raise CudaUnavailableError(
            f"the operator on {device} has framework=None, so its matvec expects pycurv's DeviceArray, which "
            "needs a usable CUDA module; pass framework='torch', 'cupy' or 'jax' (the library the matvec computes "
            "with) so that pycurv can copy its vectors to the device with that library")


class _Torch(Framework):
    name = "torch"

    def __init__(self):
        self.torch = require("torch", "a torch operator on a CUDA device")

    def wrap(self, arr):
        return self.torch.from_dlpack(arr)

    def stream(self, index):
        stream = self.torch.cuda.current_stream(index)
        return int(stream.cuda_stream), stream

    def astype(self, x, dtype):
        return x.to(getattr(self.torch, dtype))

    def namespace(self):
        return self.torch

    def to_device(self, x, device):
        return self.torch.tensor(x, dtype=self.torch.float64, device=device)


class _CuPy(Framework):
    name = "cupy"

    def __init__(self):
        self.cupy = require("cupy", "a CuPy operator")

    def wrap(self, arr):
        return self.cupy.from_dlpack(arr)

    def stream(self, index):
        with self.cupy.cuda.Device(index):
            stream = self.cupy.cuda.get_current_stream()
        return int(stream.ptr), stream

    def astype(self, x, dtype):
        return x.astype(dtype, copy=False)

    def namespace(self):
        return self.cupy

    def to_device(self, x, device):
        with self.cupy.cuda.Device(device_index(device)):
            return self.cupy.array(x, dtype=self.cupy.float64)


class _Jax(Framework):
    name = "jax"

    def __init__(self):
        self.jax = require("jax", "a JAX operator on a GPU")
        self.jnp = require("jax.numpy", "a JAX operator on a GPU")
        self.dlpack = require("jax.dlpack", "a JAX operator on a GPU")

    def wrap(self, arr):
        # JAX has no public stream: the legacy default stream is the solver's,
        # and DLPack's stream argument orders JAX's work against it both ways.
        return self.dlpack.from_dlpack(arr)

    def astype(self, x, dtype):
        return x.astype(dtype)

    def namespace(self):
        return self.jnp

    def to_device(self, x, device):
        from ._devices import jax_device_name

        for dev in self.jax.local_devices():
            if jax_device_name(dev) == device:
                return self.jax.device_put(np.array(x), dev)
        raise ValueError(f"JAX has no local device {device}; its local devices are "
                         f"{', '.join(jax_device_name(d) for d in self.jax.local_devices())}")


_FRAMEWORKS = {"torch": _Torch, "cupy": _CuPy, "jax": _Jax}


def check_framework(name) -> Optional[str]:
    if name is not None and name not in _FRAMEWORKS:
        raise ValueError(f"framework must be 'torch', 'cupy', 'jax' or None (the matvec receives pycurv's "
                         f"DeviceArray), got framework={name!r}")
    return name


def framework(name: Optional[str]) -> Framework:
    return _FRAMEWORKS[name]() if name is not None else Framework()


def array_framework(x) -> Optional[str]:
    """The library an array belongs to ("torch", "cupy", "jax"), judged from loaded modules only."""
    for name, cls in (("torch", "Tensor"), ("cupy", "ndarray"), ("jax", "Array")):
        mod = sys.modules.get(name)
        if mod is not None and isinstance(x, getattr(mod, cls, ())):
            return name
    return None


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "").replace("dtype(", "").strip("')\"")


def to_numpy(y) -> np.ndarray:
    """A host float64 copy of a device array (for error messages)."""
    fw = array_framework(y)
    if fw == "torch":
        return y.detach().to("cpu").double().numpy()
    if fw == "cupy":
        return np.asarray(y.get(), dtype=np.float64)
    if hasattr(y, "numpy") and not isinstance(y, np.ndarray):
        return np.asarray(y.numpy(), dtype=np.float64)
    return np.asarray(y, dtype=np.float64)


# ---- one run ---------------------------------------------------------------------------


class DeviceRun:
    """What :func:`pycurv.lanczos` needs to drive a CUDA state for one operator."""

    def __init__(self, op, *, host_basis: bool):
        self.op = op
        self.device = normalize_device(op.device)
        self.cuda = cuda_module(self.device)
        self.index = device_index(self.device)
        self.framework = framework(check_framework(getattr(op, "framework", None)))
        self.host_basis = bool(host_basis)
        self.matvec = self._matvec()

    def state(self, **options):
        handle, owner = self.framework.stream(self.index)
        return self.cuda.LanczosState(**options, device=self.index, stream=handle, host_basis=self.host_basis,
                                      stream_owner=owner)

    def _matvec(self):
        op, fw = self.op, self.framework
        hvp = getattr(op, "hvp", None)
        dtype = getattr(op, "dtype", None)
        if callable(hvp) and fw.name in ("torch", "jax") and isinstance(dtype, str) and dtype in _FLOAT_NAMES:
            # The adapters' Hessian operators: their matvec speaks NumPy (a host
            # copy each way); on the device their hvp takes the framework's
            # array in the HVP's dtype, and the first product is checked for
            # determinism as matvec would.
            def mv(x):
                v = fw.astype(fw.wrap(x), dtype)
                y = hvp(v)
                if getattr(op, "_probe_pending", False):
                    op._probe_pending = False
                    op._compare(y, hvp(v))
                return y

            return mv
        return lambda x: op.matvec(fw.wrap(x))

    def check_output(self, y, n: int, count: int):
        """What a GPU matvec returned: a device array on the operator's device, or a host array (copied up)."""
        dev = array_device(y)
        if dev is None:
            return _checks.matvec_output(y, n, count)
        if dev != self.device and array_framework(y) is not None:  # a bare exporter's device is checked by the module
            raise ValueError(f"matvec call {count} returned an array on {dev}, but the operator's vectors live on "
                             f"{self.device}; compute the product on {self.device}")
        shape = getattr(y, "shape", None)
        if shape is None:  # a bare exporter: the interface says the shape (DLPack is checked by the module)
            cai = getattr(y, "__cuda_array_interface__", None)
            shape = cai.get("shape") if isinstance(cai, dict) else None
        if shape is not None and tuple(shape) not in ((n,), (n, 1)):
            raise ValueError(f"matvec call {count} returned shape {tuple(shape)}; expected ({n},), the shape of its "
                             "input")
        dtype = getattr(y, "dtype", None)
        if dtype is not None and dtype_name(dtype) not in _FLOAT_NAMES:
            name = dtype_name(dtype)
            if "complex" in name:
                raise TypeError(f"matvec call {count} returned complex values (dtype {name}); A must be real symmetric")
            raise TypeError(f"matvec call {count} returned dtype {name}; expected float64, float32, float16 or "
                            "bfloat16")
        return y

    def timing(self, state, timing: dict) -> dict:
        """Matvec time measured on the device (events around each product), the rest is the core's."""
        t_mv = float(state.matvec_seconds)
        return {"matvec": t_mv, "core": max(0.0, timing["total"] - t_mv), "total": timing["total"]}

    def eigenvectors(self, arr):
        return self.framework.eigenvectors(arr)


def device_run(op, *, host_basis: bool):
    """How to solve an operator on a GPU: :class:`DeviceRun` where ``pycurv._cuda`` can, else :class:`HostBasisRun`."""
    module, why = _usable_module(op.device)
    if module is not None:
        return DeviceRun(op, host_basis=host_basis)
    return HostBasisRun(op, why)


# The bus the fallback's copies cross, at its nominal rate: PCIe 4.0 x16, about
# 32 GB/s each way (H100 and H200 PCIe cards have PCIe 5.0, 64 GB/s; SXM boards
# reach the host over PCIe too). What the warning quotes per product.
NOMINAL_BUS_BYTES_PER_S = 32e9
_warned_host_basis = False


class HostBasisRun:
    """An operator on a GPU solved by the CPU core: the basis in host memory, one vector each way per product.

    What scipy's ``eigsh`` with host copies does: each Lanczos vector is copied
    to the operator's device (float64), the product is computed there, and the
    result is copied back. The same arithmetic as the CPU backend, so the same
    results as for the operator on the CPU; it warns once per process
    (:class:`HostBasisWarning`) with the cost and how to get the device basis.
    """

    def __init__(self, op, why):
        self.op = op
        self.device = normalize_device(op.device)
        self.why = why
        name = check_framework(getattr(op, "framework", None))
        self.framework = framework(name)
        self.matvec = self._matvec()
        self._warn(int(op.shape[0]))

    def _matvec(self):
        op, fw, device = self.op, self.framework, self.device
        hvp = getattr(op, "hvp", None)
        if callable(hvp) and callable(getattr(op, "_from_numpy", None)):
            return op.matvec  # the adapters' matvec speaks NumPy: one copy each way, on the model's device
        if fw.name is None:
            fw.to_device(None, device)  # raises: framework=None needs pycurv's DeviceArray

        def mv(x):
            y = op.matvec(fw.to_device(x, device))
            return y if isinstance(y, np.ndarray) else _host_copy(y)

        return mv

    def _warn(self, n: int):
        global _warned_host_basis
        if _warned_host_basis:
            return
        _warned_host_basis = True
        per_product = 2 * 8 * n
        seconds = per_product / NOMINAL_BUS_BYTES_PER_S
        warnings.warn(
            f"{self.why[0]}, so it cannot keep the basis on {self.device}; the Lanczos basis is kept in host "
            f"memory instead: each product copies one float64 vector to {self.device} and one back ({per_product} "
            f"bytes per product at n={n}, about {_duration(seconds)} at a nominal {NOMINAL_BUS_BYTES_PER_S / 1e9:.0f} GB/s host-device bandwidth), "
            "and the orthogonalisation runs on the CPU; the results are the CPU backend's. For the basis in device "
            f"memory: {_how_to_get_device_basis(self.why)}",
            HostBasisWarning, stacklevel=4)

    def host_v0(self, v0, n: int):
        return None if v0 is None else _checks.check_v0(to_numpy(v0) if array_device(v0) else v0, n)

    def eigenvectors(self, arr):
        """The Ritz vectors as the operator's framework sees them: on its device (NumPy without a framework)."""
        arr = np.asarray(arr)
        if self.framework.name is None:
            return arr
        return self.framework.to_device(np.ascontiguousarray(arr), self.device)


def _host_copy(y) -> np.ndarray:
    """A product computed on the device, on the host in its own precision (so the solver learns its roundoff);
    bfloat16, which NumPy lacks, as float32."""
    fw = array_framework(y)
    if fw == "torch":
        t = y.detach().to("cpu")
        return (t.float() if t.dtype == sys.modules["torch"].bfloat16 else t).numpy()
    y = y.get() if fw == "cupy" else np.asarray(y.numpy() if hasattr(y, "numpy") and fw is None else y)
    return y.astype(np.float32) if y.dtype.kind not in "fiu" else y


def _duration(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def _how_to_get_device_basis(why) -> str:
    if "built without CUDA" in why[0]:
        return (f"reinstall pycurv with its CUDA module where the CUDA toolkit is, pip install . "
                f"-Ccmake.define.PYCURV_CUDA=ON ({DRIVER_FLOOR})")
    return (f"make the device visible to pycurv's CUDA module ({DRIVER_FLOOR}), or rebuild pycurv against the CUDA "
            "toolkit the installed driver supports")


def check_v0(v0, n: int):
    """v0 for a GPU operator: a device array of shape (n,) or (n, 1), or anything check_v0 accepts on the host."""
    if array_device(v0) is None:
        return _checks.check_v0(v0, n)
    shape = tuple(getattr(v0, "shape", ()))
    if shape not in ((n,), (n, 1)):
        raise ValueError(f"v0 must have shape ({n},) to match A, got shape {shape}")
    return v0
