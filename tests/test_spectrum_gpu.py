"""pycurv.trace and pycurv.spectral_density of operators whose vectors live on a GPU.

The probes are float64 host vectors; each product copies one to the operator's device and
the result back, so the estimates are the CPU's to rounding of the products. Runs on a
GPU and against the CPU emulation of the CUDA backend (skipped without either).
"""

from __future__ import annotations

import numpy as np
import pytest

import pycurv
from _reference import dense

try:
    from pycurv import _cuda
except ImportError:  # pragma: no cover - depends on the build
    _cuda = None

_READY = _cuda is not None and bool(_cuda.devices())
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _READY, reason="needs pycurv._cuda and a CUDA device "
                                                                      "(or its CPU emulation)")]


def _on_gpu(a):
    """A float64 matrix whose products take and return pycurv DeviceArrays on cuda:0 (computed on the host)."""
    def f(x):
        assert isinstance(x, _cuda.DeviceArray) and x.shape == (a.shape[0],)
        return _cuda.DeviceArray.from_numpy(np.ascontiguousarray(a @ x.numpy()))

    return pycurv.FunctionOperator(f, a.shape[0], device="cuda:0")


def test_trace_and_density_on_the_device_match_the_cpu():
    lam = np.r_[np.linspace(-1.0, 1.0, 195), [9.0, 7.0, 5.0, -4.0, -6.0]]
    a = dense(lam, seed=3)
    op = _on_gpu(a)
    for method in ("hutch++", "hutchinson"):
        gpu = pycurv.trace(op, n_matvecs=40, method=method, seed=2)
        cpu = pycurv.trace(a, n_matvecs=40, method=method, seed=2)
        assert gpu.n_matvecs == cpu.n_matvecs == 40
        assert abs(gpu.value - cpu.value) <= 1e-12 * np.abs(lam).sum() and abs(gpu.stderr - cpu.stderr) <= 1e-10
    gpu = pycurv.spectral_density(op, n_probes=3, n_steps=30, seed=4)
    cpu = pycurv.spectral_density(a, n_probes=3, n_steps=30, seed=4)
    assert np.allclose(gpu.nodes, cpu.nodes, rtol=0, atol=1e-12 * 9) and np.allclose(gpu.weights, cpu.weights,
                                                                                     atol=1e-12)
    assert gpu.n_matvecs == cpu.n_matvecs == 90
