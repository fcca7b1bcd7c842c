"""The CUDA module on machines without a GPU: what the build reports, the import, the dispatch, the errors.

These run everywhere. Set PYCURV_EXPECT_CUDA=1 (or 0) to also require that the
installed build has (or has not) the CUDA module, e.g. after
``pip install . -Ccmake.define.PYCURV_CUDA=ON`` (or ``=OFF``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import pycurv
from pycurv import _gpu
from test_cli_stability import _console_script

try:
    from pycurv import _cuda
except ImportError:  # pragma: no cover - depends on the build
    _cuda = None

HAS_DEVICE = bool(_cuda is not None and _cuda.devices())


class FakeCudaArray:
    """What a CUDA array from some library looks like from outside: DLPack device and the array interface."""

    def __init__(self, shape, device=0, kind=2):
        self.shape = shape
        self._device = (kind, device)
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f8", "data": (0x7F0000000000, False),
                                         "version": 3, "strides": None}

    def __dlpack_device__(self):
        return self._device


@pytest.fixture
def without_cuda_module(monkeypatch):
    """As in a CPU-only build: importing pycurv._cuda fails."""
    monkeypatch.setitem(sys.modules, "pycurv._cuda", None)
    monkeypatch.delattr(pycurv, "_cuda", raising=False)


@pytest.fixture
def cuda_module_without_devices(monkeypatch):
    """As on a machine with the CUDA module but no visible GPU (or no driver)."""
    fake = types.ModuleType("pycurv._cuda")
    fake.devices = lambda: []
    fake.device_error = lambda: "CUDA driver version is insufficient for CUDA runtime version"
    monkeypatch.setitem(sys.modules, "pycurv._cuda", fake)
    monkeypatch.setattr(pycurv, "_cuda", fake, raising=False)


# ---- what the build says ----------------------------------------------------------------


def test_info_reports_cuda_build(tmp_path):
    proc = subprocess.run([str(_console_script()), "info", "--json"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert isinstance(info["cuda_compiled"], bool) and isinstance(info["cuda_devices"], list)
    assert info["cuda_compiled"] == (_cuda is not None)
    expect = os.environ.get("PYCURV_EXPECT_CUDA")
    if expect is not None:
        assert info["cuda_compiled"] == (expect == "1"), info
    if info["cuda_compiled"]:
        build = info["cuda_build"]
        assert build["architectures"] in ("80 90", "emulated"), build  # explicit architectures, never native
        if not info["cuda_devices"]:
            assert info["cuda_error"]  # why no device is visible, for bug reports


def test_import_pycurv_loads_neither_the_cuda_module_nor_a_framework(tmp_path):
    code = ("import sys, numpy as np, pycurv; "
            "pycurv.lanczos(np.diag([1.0, 2.0, 3.0]), 1, seed=0); "
            "pycurv._gpu.array_device(np.ones(3)); pycurv._gpu.array_device(object()); "
            "print([m for m in ('pycurv._cuda', 'torch', 'cupy', 'jax') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.skipif(_cuda is None, reason="pycurv was built without CUDA")
def test_cuda_module_imports_and_lists_devices_without_raising():
    devices = _cuda.devices()
    assert isinstance(devices, list)
    if not devices:
        assert isinstance(_cuda.device_error(), str) and _cuda.device_error()
    assert issubclass(_cuda.NonFiniteError, pycurv._core.NonFiniteError)
    assert _cuda.Request is pycurv._core.Request


# ---- the clear errors ----------------------------------------------------------------------


def test_cpu_only_build_says_how_to_get_cuda(without_cuda_module):
    op = pycurv.FunctionOperator(lambda x: x, 10, device="cuda:0")
    msg = (r"pycurv was built without CUDA support, so it cannot run on cuda:0: reinstall with "
           r"pip install \. -Ccmake\.define\.PYCURV_CUDA=ON on a machine with the CUDA toolkit, or move the operator "
           r"to the CPU")
    with pytest.raises(pycurv.CudaUnavailableError, match=msg):
        pycurv.lanczos(op, 1)
    with pytest.raises(pycurv.CudaUnavailableError, match="built without CUDA support, so it cannot run on cuda:1"):
        pycurv.lanczos(FakeCudaArray((4, 4), device=1))
    # CPU work is unaffected
    assert pycurv.sharpness(np.diag([1.0, -3.0, 2.0]), seed=0) == pytest.approx(2.0)


def test_no_visible_device_is_named(cuda_module_without_devices):
    op = pycurv.FunctionOperator(lambda x: x, 10, device="cuda")
    with pytest.raises(pycurv.CudaUnavailableError,
                       match=r"CUDA module is built, but no CUDA device is visible \(CUDA driver version is "
                             r"insufficient for CUDA runtime version\), so it cannot run on cuda:0"):
        pycurv.lanczos(op, 1)


@pytest.mark.skipif(_cuda is None or HAS_DEVICE, reason="needs the CUDA module on a machine without a GPU")
def test_real_module_without_a_device(tmp_path):
    with pytest.raises(pycurv.CudaUnavailableError, match="no CUDA device is visible"):
        pycurv.lanczos(pycurv.FunctionOperator(lambda x: x, 10, device="cuda:0"), 1)
    with pytest.raises(pycurv.CudaUnavailableError, match="no CUDA device is visible"):
        pycurv.lanczos(FakeCudaArray((4, 4)))


def test_gpu_array_from_a_cpu_operator_is_named():
    fake = FakeCudaArray((5,))
    with pytest.raises(TypeError, match=r"matvec call 1 returned an array that lives on cuda:0, but the operator runs "
                                        r"on the CPU: return a NumPy array, or declare the operator on the GPU"):
        pycurv.lanczos(lambda x: fake, n=5, seed=0)
    with pytest.raises(TypeError, match="v0 lives on cuda:0, but the operator runs on the CPU"):
        pycurv.lanczos(np.eye(5), v0=fake)


def test_host_basis_is_a_flag():
    with pytest.raises(TypeError, match="host_basis must be True or False"):
        pycurv.lanczos(np.eye(3), host_basis="yes")
    assert pycurv.lanczos(np.diag([1.0, 2.0, 3.0]), 1, host_basis=True, seed=0).eigenvalues[0] == pytest.approx(3.0)


# ---- how an operator says where its vectors live --------------------------------------------


def test_function_operator_device_and_framework():
    f = pycurv.FunctionOperator(lambda x: x, 4, device="cuda:1", framework="torch")
    assert f.device == "cuda:1" and f.framework == "torch"
    assert pycurv.FunctionOperator(lambda x: x, 4, device="gpu:2").device == "cuda:2"
    assert pycurv.FunctionOperator(lambda x: x, 4).device == "cpu"
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda:N'"):
        pycurv.FunctionOperator(lambda x: x, 4, device="tpu:0")
    with pytest.raises(ValueError, match=r"device must be 'cpu' or 'cuda:N' with N a device index, got device='cuda:x'"):
        pycurv.FunctionOperator(lambda x: x, 4, device="cuda:x")
    with pytest.raises(ValueError, match="framework must be 'torch', 'cupy', 'jax' or None"):
        pycurv.FunctionOperator(lambda x: x, 4, device="cuda:0", framework="tensorflow")
    with pytest.raises(ValueError, match="framework= applies to operators on a GPU"):
        pycurv.FunctionOperator(lambda x: x, 4, framework="torch")


def test_duck_operators_carry_their_device():
    class Duck:
        shape = (6, 6)
        device = "cuda:0"
        framework = "cupy"

        def matvec(self, x):
            return x

    op = pycurv.as_operator(Duck())
    assert op.device == "cuda:0" and op.framework == "cupy"

    class CpuDuck(Duck):
        device = "cpu"

    assert pycurv.as_operator(CpuDuck()).device == "cpu"


@pytest.mark.parametrize("obj,expected", [
    (np.ones(3), None),
    ([1.0, 2.0], None),
    (FakeCudaArray((3,), device=0), "cuda:0"),
    (FakeCudaArray((3,), device=3), "cuda:3"),
    (FakeCudaArray((3,), device=1, kind=13), "cuda:1"),  # CUDA managed memory
    (FakeCudaArray((3,), kind=1), None),  # a CPU array with the interfaces
    (types.SimpleNamespace(__cuda_array_interface__={}), "cuda:0"),
    (object(), None),
])
def test_array_device(obj, expected):
    assert _gpu.array_device(obj) == expected


def test_device_names():
    assert _gpu.normalize_device("cuda") == "cuda:0"
    assert _gpu.normalize_device("GPU:3") == "cuda:3"
    assert _gpu.normalize_device("cpu") == "cpu"
    assert _gpu.is_gpu("cuda:1") and _gpu.is_gpu("cuda") and _gpu.is_gpu("gpu:0")
    assert not _gpu.is_gpu("cpu") and not _gpu.is_gpu("cpu:0") and not _gpu.is_gpu(None)

    class TorchDeviceLike:
        def __str__(self):
            return "cuda:2"

    assert _gpu.normalize_device(TorchDeviceLike()) == "cuda:2"
