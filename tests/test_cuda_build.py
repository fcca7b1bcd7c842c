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
import warnings

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


@pytest.fixture(autouse=True)
def fresh_host_basis_warning(monkeypatch):
    """The host-basis fallback warns once per process: every test starts before that warning."""
    monkeypatch.setattr(_gpu, "_warned_host_basis", False)


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
        expected_floor = None if build["emulated"] else {"12": "R525", "13": "R580"}[build["cuda_runtime"].split(".")[0]]
        assert build["driver_floor"] == expected_floor, build
        text = subprocess.run([str(_console_script()), "info"], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path).stdout
        if not build["emulated"]:
            assert f"needs driver {expected_floor} or newer" in text, text
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


def test_cpu_only_build_names_the_framework_a_device_array_operator_needs(without_cuda_module):
    """framework=None: the matvec takes pycurv's DeviceArray, which only the CUDA module can make."""
    op = pycurv.FunctionOperator(lambda x: x, 10, device="cuda:0")
    with pytest.raises(pycurv.CudaUnavailableError,
                       match=r"the operator on cuda:0 has framework=None, so its matvec expects pycurv's DeviceArray, "
                             r"which needs a usable CUDA module; pass framework='torch', 'cupy' or 'jax'"):
        pycurv.lanczos(op, 1)
    with pytest.raises(TypeError, match="is a CUDA array of type FakeCudaArray, which pycurv cannot multiply"):
        pycurv.lanczos(FakeCudaArray((4, 4), device=1))
    # CPU work is unaffected
    assert pycurv.sharpness(np.diag([1.0, -3.0, 2.0]), seed=0) == pytest.approx(2.0)


def test_device_index_beyond_the_visible_devices_is_an_error():
    fake = types.ModuleType("pycurv._cuda")
    fake.devices = lambda: [{"index": 0, "name": "Fake H200"}]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "pycurv._cuda", fake)
        mp.setattr(pycurv, "_cuda", fake, raising=False)
        with pytest.raises(pycurv.CudaUnavailableError, match=r"cuda:3 does not exist: 1 CUDA device\(s\) are visible "
                                                              r"\(Fake H200\)"):
            pycurv.lanczos(pycurv.FunctionOperator(lambda x: x, 10, device="cuda:3", framework="torch"), 1)


def test_no_visible_device_is_named(cuda_module_without_devices):
    op = pycurv.FunctionOperator(lambda x: x, 10, device="cuda")
    with pytest.raises(pycurv.CudaUnavailableError, match=r"framework=None, so its matvec expects pycurv's DeviceArray"):
        pycurv.lanczos(op, 1)
    with pytest.raises(pycurv.CudaUnavailableError,
                       match=r"CUDA module is built, but no CUDA device is visible \(CUDA driver version is "
                             r"insufficient for CUDA runtime version\), so it cannot run on cuda:0: check the NVIDIA "
                             r"driver \(a build against the CUDA 13 toolkit needs driver R580 or newer"):
        _gpu.cuda_module("cuda:0")


@pytest.mark.skipif(_cuda is None or HAS_DEVICE, reason="needs the CUDA module on a machine without a GPU")
def test_real_module_without_a_device(tmp_path):
    with pytest.raises(pycurv.CudaUnavailableError, match="no CUDA device is visible"):
        _gpu.cuda_module("cuda:0")
    with pytest.raises(pycurv.CudaUnavailableError, match="framework=None"):
        pycurv.lanczos(pycurv.FunctionOperator(lambda x: x, 10, device="cuda:0"), 1)


# ---- every build runs a GPU operator: the basis in host memory ------------------------------


@pytest.fixture
def torch_on_cpu_as_cuda(monkeypatch):
    """torch's copies to "cuda:N" land on the CPU: an operator that reports a GPU device, on a machine without one."""
    torch = pytest.importorskip("torch")
    copies = []

    def to_device(self, x, device):
        assert device.startswith("cuda:")
        copies.append(device)
        return torch.tensor(x, dtype=torch.float64)

    monkeypatch.setattr(_gpu._Torch, "to_device", to_device)
    return torch, copies


def _torch_matrix_problem(torch, n=300):
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = (q * np.r_[np.linspace(-1.0, 1.0, n - 3), 1.5, 2.0, -4.0]) @ q.T
    return a, torch.tensor(a)


@pytest.mark.parametrize("cause", ["without_cuda_module", "cuda_module_without_devices"])
def test_gpu_operator_without_a_usable_cuda_module_runs_with_a_host_basis(cause, request, torch_on_cpu_as_cuda):
    """Warns once, naming the cost per product and the way to the device basis; the CPU backend's answers."""
    request.getfixturevalue(cause)
    torch, copies = torch_on_cpu_as_cuda
    a, At = _torch_matrix_problem(torch)
    n = a.shape[0]
    op = pycurv.FunctionOperator(lambda x: At @ x, n, device="cuda:0", framework="torch", dtype="float64")
    why = (r"pycurv was built without CUDA support" if cause == "without_cuda_module" else
           r"pycurv's CUDA module is built, but no CUDA device is visible \(CUDA driver version is insufficient for "
           r"CUDA runtime version\)")
    how = (r"reinstall pycurv with its CUDA module where the CUDA toolkit is, pip install \. "
           r"-Ccmake\.define\.PYCURV_CUDA=ON \(a build against the CUDA 13 toolkit needs driver R580 or newer"
           if cause == "without_cuda_module" else
           r"make the device visible to pycurv's CUDA module \(a build against the CUDA 13 toolkit needs driver R580")
    with pytest.warns(pycurv.HostBasisWarning,
                      match=why + r", so it cannot keep the basis on cuda:0; the Lanczos basis is kept in host memory "
                      r"instead: each product copies one float64 vector to cuda:0 and one back \(4800 bytes per "
                      r"product at n=300, about 0\.15 us at a nominal 32 GB/s host-device bandwidth\), and the "
                      r"orthogonalisation runs on the CPU; the results are the CPU backend's\. For the basis in device "
                      r"memory: " + how):
        gpu = pycurv.lanczos(op, 3, which="BE", tol=1e-10, seed=5)
    cpu = pycurv.lanczos(lambda x: (At @ torch.from_numpy(np.array(x))).numpy(), 3, n=n, which="BE", tol=1e-10, seed=5)
    assert gpu.converged and len(copies) == gpu.n_matvecs + 1  # one copy up per product, one for the eigenvectors
    assert np.array_equal(gpu.eigenvalues, cpu.eigenvalues) and gpu.n_matvecs == cpu.n_matvecs
    assert isinstance(gpu.eigenvectors, torch.Tensor)
    assert np.array_equal(gpu.eigenvectors.numpy(), cpu.eigenvectors)
    np.testing.assert_allclose(np.sort(gpu.eigenvalues), [-4.0, 1.5, 2.0], rtol=0, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        again = pycurv.lanczos(op, 1, tol=1e-10, seed=5)
    assert again.eigenvalues[0] == pytest.approx(2.0, rel=1e-10)


def test_host_basis_copies_products_back_in_their_own_precision(without_cuda_module, torch_on_cpu_as_cuda):
    """A float32 product comes back as 4 bytes an entry (and the solver learns float32 from it), as on the CPU."""
    torch, _ = torch_on_cpu_as_cuda
    a, At = _torch_matrix_problem(torch)
    A32 = At.float()
    seen = []
    host_copy = _gpu._host_copy

    def spy(y):
        seen.append(host_copy(y).dtype)
        return host_copy(y)

    op = pycurv.FunctionOperator(lambda x: A32 @ x.float(), a.shape[0], device="cuda:0", framework="torch")
    kw = dict(tol=1e-5, seed=2)
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(_gpu, "_host_copy", spy)
        warnings.simplefilter("ignore", pycurv.HostBasisWarning)
        gpu = pycurv.lanczos(op, 1, **kw)
    cpu = pycurv.lanczos(lambda x: (A32 @ torch.from_numpy(np.array(x)).float()).numpy(), 1, n=a.shape[0], **kw)
    assert set(seen) == {np.dtype(np.float32)} and len(seen) == gpu.n_matvecs
    assert np.array_equal(gpu.eigenvalues, cpu.eigenvalues) and gpu.n_matvecs == cpu.n_matvecs
    assert _gpu._host_copy(torch.ones(3, dtype=torch.bfloat16)).dtype == np.float32  # NumPy has no bfloat16


def test_torch_adapter_reporting_a_gpu_runs_with_a_host_basis(cuda_module_without_devices, torch_on_cpu_as_cuda):
    """The torch adapter on a GPU model: its own host copies per product, the CPU's eigenvalues."""
    torch, copies = torch_on_cpu_as_cuda
    pt = pytest.importorskip("pycurv.torch")

    def hessian():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
        return pt.hessian(model, torch.nn.functional.cross_entropy, (x, y), dtype=torch.float64)

    on_cpu, on_gpu = hessian(), hessian()
    on_gpu.device = "cuda:0"  # what a model on a GPU reports; its products stay where its parameters are
    n = on_gpu.shape[0]
    with pytest.warns(pycurv.HostBasisWarning,
                      match=rf"no CUDA device is visible .* \({16 * n} bytes per product at n={n}, "):
        gpu = pycurv.lanczos(on_gpu, 2, tol=1e-8, seed=1)
    cpu = pycurv.lanczos(on_cpu, 2, tol=1e-8, seed=1)
    assert gpu.converged and np.array_equal(gpu.eigenvalues, cpu.eigenvalues)
    assert isinstance(gpu.eigenvectors, torch.Tensor) and copies == ["cuda:0"]  # the eigenvectors, to the device
    assert np.array_equal(gpu.eigenvectors.numpy(), cpu.eigenvectors)


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


# ---- JAX devices in multi-process runs ---------------------------------------------------------


def test_jax_gpu_is_named_by_its_local_hardware_id():
    """Device.id counts GPUs across processes (process 1's first GPU is id 8 on 8-GPU hosts); CUDA's index is local."""
    from pycurv._devices import jax_device_name

    gpu = types.SimpleNamespace(platform="gpu", id=9, local_hardware_id=1, process_index=1)
    assert jax_device_name(gpu) == "cuda:1"
    assert jax_device_name(types.SimpleNamespace(platform="gpu", id=2, local_hardware_id=None)) == "cuda:2"
    assert jax_device_name(types.SimpleNamespace(platform="cpu", id=0)) == "cpu:0"


def test_jax_mesh_device_is_one_this_process_addresses(monkeypatch):
    jax = pytest.importorskip("jax")
    from pycurv._devices import jax_local_device

    devs = [types.SimpleNamespace(platform="gpu", id=i, local_hardware_id=i % 2, process_index=i // 2)
            for i in range(4)]
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert jax_local_device(devs) is devs[2]
    monkeypatch.setattr(jax, "process_index", lambda: 3)
    with pytest.raises(ValueError, match=r"none of the 4 devices of the mesh belongs to this process \(process 3\)"):
        jax_local_device(devs)
