"""Plots (the ``plot`` extra) and the promise that ``import pycurv`` needs NumPy only."""

import subprocess
import sys

import numpy as np
import pytest

import pycurv
from pycurv.errors import MissingDependencyError
from pycurv.stability import NoisyQuadraticModel, curvature_batch_scaling, nqm_batch_scaling, threshold


def test_import_pycurv_is_numpy_only(tmp_path):
    code = ("import sys, pycurv, pycurv.stability, pycurv.solvers, pycurv.plot, pycurv.cli; "
            "bad = [m for m in ('matplotlib', 'scipy', 'torch', 'jax') if m in sys.modules]; "
            "print(','.join(bad))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_missing_matplotlib_is_one_sentence(monkeypatch):
    from pycurv.plot import plot_stability_region

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"plotting needs matplotlib.*pip install 'pycurv\[plot\]'"):
        plot_stability_region("sgd", lr=0.1)


def test_stability_region():
    import matplotlib  # noqa: F401 - a test dependency
    from pycurv.plot import plot_stability_region

    fig = plot_stability_region("sgd", lr=0.1, sharpness=30.0, momentum=0.9)
    ax = fig.axes[0]
    boundary, point = ax.lines[0], ax.lines[-1]
    x, y = boundary.get_data()
    np.testing.assert_allclose(y, [threshold("sgd", v, momentum=0.9).max_stable_sharpness for v in x])
    assert point.get_xydata().tolist() == [[0.1, 30.0]] and "stable" in point.get_label()
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "λ1"
    fig = plot_stability_region("adam", lr=1e-3, sharpness=5e4)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "λ1(P⁻¹H)" and "unstable" in ax.lines[-1].get_label()
    fig = plot_stability_region("sgd", lr=0.05, sharpness=10.0, noise=(4, 100, 30.0))
    assert len(fig.axes[0].lines) == 4  # boundary, two minibatch bounds, the point


def test_nqm_scaling_plot(tmp_path):
    import matplotlib  # noqa: F401 - a test dependency
    from pycurv.plot import plot_nqm_scaling, save_figure

    model = NoisyQuadraticModel.zhang(10)
    res = nqm_batch_scaling(model, [1, 4, 16], 0.01 * model.initial_loss)
    fig = plot_nqm_scaling(res)
    steps = fig.axes[0].lines[0].get_ydata()
    np.testing.assert_array_equal(steps, res.steps)
    both = curvature_batch_scaling(model, (1.0, 16.0), [1, 4, 16], critical=False)
    fig = plot_nqm_scaling(both, normalize=True)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["curvature × 1", "curvature × 16"]
    save_figure(fig, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_public_names():
    for name in ("threshold", "max_stable_lr", "threshold_from_optimizer", "margin_report", "critical_lr",
                 "PersistentCatapultWarmup", "warmup_timing", "NoisyQuadraticModel", "solve_noisy_sgd"):
        assert name in pycurv.__all__ and hasattr(pycurv, name)
    assert pycurv.stability.threshold is pycurv.threshold
