"""``pycurv spectrum``: λ1, λmin, top-k ratios, trace, density and its plot on the built-in example."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pycurv  # noqa: E402
import pycurv.torch as pt  # noqa: E402
from pycurv._builtin_model import setup as builtin_setup  # noqa: E402
from pycurv.cli import main  # noqa: E402


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)


def _run(capsys, *argv):
    code = main(["spectrum", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def reference():
    model, loss_fn, data, _ = builtin_setup()
    H = pt.hessian(model, loss_fn, data)
    top = pycurv.lanczos(H, 3, tol=1e-10, seed=1)
    low = pycurv.lanczos(H, 1, which="SA", tol=1e-10, seed=1)
    return top.eigenvalues, float(low.eigenvalues[0])


def test_json_reports_the_spectrum(capsys, reference):
    code, out, err = _run(capsys, "--json", "-k", "3", "--n-probes", "4", "--n-steps", "30")
    assert code == 0
    d = json.loads(out)
    top, low = reference
    assert np.allclose(d["top_k"], top, rtol=1e-5)
    assert d["lambda_max"] == d["top_k"][0] and abs(d["lambda_min"] - low) <= 1e-5 * abs(low)
    assert d["ratios"][0] == 1.0 and np.allclose(d["ratios"], np.array(d["top_k"]) / d["top_k"][0])
    assert d["eigenvalues_converged"] is True
    assert d["function"].startswith("training loss: no batch-statistics layers, dropout off")
    assert d["trace"]["method"] == "hutch++" and d["trace"]["matvecs"] == 100 and d["trace"]["stderr"] > 0
    dens = d["density"]
    assert np.array(dens["nodes"]).shape == (4, 30) and np.allclose(np.sum(dens["weights"], axis=1), 1.0)
    assert min(map(min, dens["nodes"])) >= low - 1e-6 * abs(low) and max(map(max, dens["nodes"])) <= top[0] * (1 + 1e-6)
    assert dens["matvecs"] == 120
    assert d["threshold"]["quantity"] == "sharpness" and d["threshold"]["value"] == pytest.approx(9.5)
    # The trace agrees with the density's first moment (both unbiased for tr(H)) within their errors.
    first = np.sum(np.array(dens["nodes"]) * np.array(dens["weights"])) / 4 * d["n_parameters"]
    assert abs(first - d["trace"]["value"]) <= 4 * d["trace"]["stderr"] + 0.5 * abs(d["trace"]["value"])


def test_text_and_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "density.png"
    code, out, err = _run(capsys, "--plot", str(path), "--n-probes", "2", "--n-steps", "20", "-k", "2")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("pycurv spectrum: built-in example")
    assert "  λ1              8.44" in lines and "  λmin            -5.03" in lines
    assert any(line.startswith("  function        training loss:") for line in lines)
    assert any(line.startswith("  top 2:  λ1 8.44 (1 λ1),  λ2 6.65 (0.788 λ1)") for line in lines)
    assert any(line.startswith("  trace ") and "± " in line and "hutch++, 100 products" in line for line in lines)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["spectrum", "--n-steps", "0"])
    assert exc.value.code == 2
    assert "--n-steps" in capsys.readouterr().err
