"""The calculator contract: ``pycurv bound``, ``pycurv lr-max``, ``pycurv nqm``."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

from pycurv.cli import main
from pycurv.stability import NoisyQuadraticModel, noisy_sgd_max_lr, noisy_sgd_sharpness_range, nqm_batch_scaling


def cli(capsys, *argv):
    """Run the CLI in-process; returns (exit status, stdout, stderr)."""
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_json(capsys, *argv):
    code, out, err = cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def _console_script():
    """The installed ``pycurv`` script: in this interpreter's scripts folder (venv, system or user scheme)."""
    names = ["pycurv.exe", "pycurv"] if os.name == "nt" else ["pycurv"]
    folders = [sysconfig.get_path("scripts"), str(pathlib.Path(sys.executable).parent)]
    try:
        folders.append(sysconfig.get_path("scripts", f"{os.name}_user"))
    except KeyError:
        pass
    for folder in folders:
        for name in names:
            path = pathlib.Path(folder) / name
            if path.exists():
                return path
    found = shutil.which("pycurv")
    assert found, "the pycurv console script is not installed"
    return pathlib.Path(found)


def test_installed_entry_points(tmp_path):
    """Both the console script and ``python -m pycurv`` work from the installed package."""
    script = _console_script()
    for cmd in ([str(script)], [sys.executable, "-m", "pycurv"]):
        proc = subprocess.run(cmd + ["bound", "--optimizer", "sgd", "--lr", "0.1", "--json"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["max_stable_sharpness"] == pytest.approx(20.0)
    proc = subprocess.run([str(script), "bound", "--optimizer", "sgd", "--lr", "-1"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_bound_json_keys_and_values(capsys):
    out = cli_json(capsys, "bound", "--optimizer", "sgd", "--lr", "0.1")
    assert out["max_stable_sharpness"] == pytest.approx(20.0) and out["quantity"] == "sharpness"
    assert "margin" not in out and "stable" not in out
    out = cli_json(capsys, "bound", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9", "--sharpness", "35")
    assert out["max_stable_sharpness"] == pytest.approx(38.0)
    assert out["margin"] == pytest.approx(35 / 38) and out["stable"] is True
    assert out["max_stable_lr"] == pytest.approx(3.8 / 35)
    out = cli_json(capsys, "bound", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9", "--nesterov",
                   "--sharpness", "14")
    assert out["max_stable_sharpness"] == pytest.approx(3.8 / 2.8 / 0.1) and out["stable"] is False
    out = cli_json(capsys, "bound", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9", "--dampening", "0.9")
    assert out["max_stable_sharpness"] == pytest.approx(380.0)


@pytest.mark.parametrize("opt,value", [("adam", 38000.0), ("ADAMW", 38000.0), ("rmsprop", 2000.0)])
def test_bound_preconditioned(capsys, opt, value):
    out = cli_json(capsys, "bound", "--optimizer", opt, "--lr", "1e-3", "--sharpness", str(value * 1.01))
    assert out["quantity"] == "preconditioned_sharpness"
    assert out["max_stable_sharpness"] == pytest.approx(value)
    assert out["margin"] == pytest.approx(1.01) and out["stable"] is False


def test_bound_adam_hyperparameters(capsys):
    out = cli_json(capsys, "bound", "--optimizer", "adam", "--lr", "0.01", "--beta1", "0.5", "--beta2", "0.99",
                   "--eps", "1e-6")
    assert out["max_stable_sharpness"] == pytest.approx(600.0)
    assert out["hyperparameters"] == {"beta1": 0.5, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.0,
                                      "amsgrad": False}
    out = cli_json(capsys, "bound", "--optimizer", "adamw", "--lr", "0.01", "--weight-decay", "1.0")
    assert out["max_stable_sharpness"] == pytest.approx(3800.0 - 19.0)


def test_bound_with_minibatch_noise(capsys):
    argv = ["bound", "--optimizer", "sgd", "--lr", "0.05", "--batch-size", "32", "--dataset-size", "50000",
            "--curvature-variance", "2000"]
    out = cli_json(capsys, *argv, "--sharpness", "30")
    lo, hi = noisy_sgd_sharpness_range(0.05, 2000.0, 32, 50000)
    assert out["max_stable_sharpness"] == hi and out["min_stable_sharpness"] == lo
    assert out["noiseless_max_stable_sharpness"] == pytest.approx(40.0)
    assert out["margin"] == pytest.approx(30 / hi) and out["stable"] is True
    assert out["max_stable_lr"] == noisy_sgd_max_lr(30.0, 2000.0, 32, 50000)
    out = cli_json(capsys, *argv, "--sharpness", "0.5")  # below the range: noise dominates
    assert out["margin"] < 1 and out["stable"] is False
    out = cli_json(capsys, "bound", "--optimizer", "sgd", "--lr", "1", "--batch-size", "1", "--dataset-size",
                   "100", "--curvature-variance", "50", "--sharpness", "1")
    assert out["max_stable_sharpness"] is None and out["stable"] is False and out["margin"] is None


def test_lr_max(capsys):
    out = cli_json(capsys, "lr-max", "--optimizer", "sgd", "--sharpness", "20")
    assert out["max_stable_lr"] == pytest.approx(0.1) and out["quantity"] == "sharpness"
    out = cli_json(capsys, "lr-max", "--optimizer", "sgd", "--sharpness", "20", "--momentum", "0.9")
    assert out["max_stable_lr"] == pytest.approx(0.19)
    out = cli_json(capsys, "lr-max", "--optimizer", "adam", "--sharpness", "38000")
    assert out["max_stable_lr"] == pytest.approx(1e-3) and out["quantity"] == "preconditioned_sharpness"
    out = cli_json(capsys, "lr-max", "--optimizer", "sgd", "--sharpness", "0")
    assert out["max_stable_lr"] is None  # unbounded; strict JSON has no Infinity
    out = cli_json(capsys, "lr-max", "--optimizer", "sgd", "--sharpness", "20", "--batch-size", "8",
                   "--dataset-size", "1000", "--curvature-variance", "400")
    assert out["max_stable_lr"] == noisy_sgd_max_lr(20.0, 400.0, 8, 1000)
    assert out["noiseless_max_stable_lr"] == pytest.approx(0.1)


def test_human_output(capsys):
    code, out, err = cli(capsys, "bound", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9",
                         "--sharpness", "35")
    assert code == 0 and err == ""
    assert "λ1 ≤ (2 + 2β)/η = 38" in out and "λ1 = 35 is at 0.92 of (2 + 2β)/η = 38: stable" in out
    code, out, _ = cli(capsys, "bound", "--optimizer", "adam", "--lr", "1e-3", "--sharpness", "40000")
    assert "preconditioned sharpness" in out and "38/η = 38000" in out and "UNSTABLE" in out
    code, out, _ = cli(capsys, "lr-max", "--optimizer", "sgd", "--sharpness", "0")
    assert "every learning rate is stable" in out


BAD = [
    ["bound", "--optimizer", "sgd", "--lr", "-0.1"],
    ["bound", "--optimizer", "sgd", "--lr", "0"],
    ["bound", "--optimizer", "sgd", "--lr", "nan"],
    ["bound", "--optimizer", "sgd", "--lr", "inf"],
    ["bound", "--optimizer", "sgd", "--lr", "fast"],
    ["bound", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "1"],
    ["bound", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "1.5"],
    ["bound", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "-0.1"],
    ["bound", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "nan"],
    ["bound", "--optimizer", "lbfgs", "--lr", "0.1"],
    ["bound", "--lr", "0.1"],
    ["bound", "--optimizer", "sgd"],
    ["bound", "--optimizer", "sgd", "--lr"],
    ["bound", "--optimizer", "sgd", "--lr", "0.1", "--sharpness", "-1"],
    ["bound", "--optimizer", "sgd", "--lr", "0.1", "--sharpness", "nan"],
    ["bound", "--optimizer", "sgd", "--lr", "0.1", "--nesterov"],
    ["bound", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9", "--dampening", "0.5", "--nesterov"],
    ["bound", "--optimizer", "sgd", "--lr", "0.1", "--beta1", "0.9"],
    ["bound", "--optimizer", "adam", "--lr", "0.1", "--momentum", "0.9"],
    ["bound", "--optimizer", "adam", "--lr", "0.1", "--beta1", "1"],
    ["bound", "--optimizer", "adam", "--lr", "0.1", "--eps", "-1e-8"],
    ["bound", "--optimizer", "sgd", "--lr", "0.1", "--batch-size", "32"],
    ["bound", "--optimizer", "sgd", "--lr", "0.1", "--batch-size", "32", "--dataset-size", "100"],
    ["bound", "--optimizer", "sgd", "--lr", "0.1", "--batch-size", "0", "--dataset-size", "100",
     "--curvature-variance", "1"],
    ["bound", "--optimizer", "sgd", "--lr", "0.1", "--batch-size", "200", "--dataset-size", "100",
     "--curvature-variance", "1"],
    ["bound", "--optimizer", "sgd", "--lr", "0.1", "--batch-size", "2", "--dataset-size", "100",
     "--curvature-variance", "-1"],
    ["bound", "--optimizer", "adam", "--lr", "0.1", "--batch-size", "2", "--dataset-size", "100",
     "--curvature-variance", "1"],
    ["bound", "--optimizer", "sgd", "--lr", "0.1", "--unknown-flag"],
    ["lr-max", "--optimizer", "sgd"],
    ["lr-max", "--optimizer", "sgd", "--sharpness", "-3"],
    ["lr-max", "--optimizer", "sgd", "--sharpness", "inf"],
    ["lr-max", "--optimizer", "rmsprop", "--sharpness", "3", "--alpha", "2"],
    ["lr-max", "--optimizer", "sgd", "--sharpness", "0", "--batch-size", "2", "--dataset-size", "10",
     "--curvature-variance", "1"],
    ["nqm", "--curvatures", "1,-2"],
    ["nqm", "--curvatures", "1,x"],
    ["nqm", "--curvatures", "1,2", "--noise", "1"],
    ["nqm", "--curvatures", "1,2", "--dim", "4"],
    ["nqm", "--noise", "1", "--noise-scale", "2", "--dim", "1"],
    ["nqm", "--target-fraction", "1.5"],
    ["nqm", "--target", "1", "--target-fraction", "0.1"],
    ["nqm", "--batch-sizes", "0,2"],
    ["nqm", "--momentum", "1"],
    ["nqm", "--nesterov"],
    ["nqm", "--dim", "0"],
    ["frobnicate"],
    [],
]


@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a) or "(none)" for a in BAD])
def test_bad_input_exits_2_with_one_line(capsys, argv):
    with pytest.raises(SystemExit) as info:
        code = main(argv)
        raise SystemExit(code)
    out = capsys.readouterr()
    assert info.value.code == 2
    assert out.out == ""
    if argv:  # a bare `pycurv` prints its usage instead
        assert out.err.count("\n") == 1 and out.err.startswith("pycurv"), out.err
    assert "Traceback" not in out.err


# --- nqm -----------------------------------------------------------------------------------------


def test_nqm_json_matches_the_library(capsys):
    out = cli_json(capsys, "nqm", "--curvatures", "4,1,0.25", "--noise", "2,1,0.5", "--batch-sizes", "1,8,64",
                   "--target", "0.05")
    model = NoisyQuadraticModel([4, 1, 0.25], noise=[2, 1, 0.5])
    res = nqm_batch_scaling(model, [1, 8, 64], 0.05)
    assert [r["batch_size"] for r in out["rows"]] == [1, 8, 64]
    assert [r["steps"] for r in out["rows"]] == res.steps.tolist()
    assert [r["best_lr"] for r in out["rows"]] == res.best_lr.tolist()
    assert out["critical_batch_size"] == res.critical_batch_size and out["min_steps"] == res.min_steps
    assert out["max_stable_lr"] == pytest.approx(0.5) and out["target"] == 0.05


def test_nqm_default_and_human(capsys):
    code, out, err = cli(capsys, "nqm", "--dim", "20", "--batch-sizes", "1,4,16")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("Noisy quadratic model (Zhang et al. 2019): 20 directions")
    assert "critical batch size" in lines[-1]
    out = cli_json(capsys, "nqm", "--dim", "20", "--batch-sizes", "1,4", "--momentum", "0.9", "--target-fraction",
                   "0.05")
    assert out["max_stable_lr"] == pytest.approx(3.8) and len(out["rows"]) == 2
    assert all(math.isfinite(r["steps"]) for r in out["rows"])


def test_nqm_unreachable_target(capsys):
    out = cli_json(capsys, "nqm", "--curvatures", "1", "--init", "1", "--target", "1e-300", "--batch-sizes", "1")
    assert out["rows"][0]["steps"] is None and out["rows"][0]["best_lr"] is None


# --- plots ---------------------------------------------------------------------------------------


def test_plot_needs_matplotlib_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    for argv in (["bound", "--optimizer", "sgd", "--lr", "0.1"], ["nqm", "--dim", "3", "--batch-sizes", "1"]):
        code, out, err = cli(capsys, *argv, "--plot", str(tmp_path / "x.png"))
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and "pip install 'pycurv[plot]'" in err
    assert not (tmp_path / "x.png").exists()


def test_plot_files(capsys, tmp_path):
    import matplotlib  # noqa: F401 - a test dependency
    for argv, name in ((["bound", "--optimizer", "sgd", "--lr", "0.1", "--sharpness", "15"], "b.png"),
                       (["lr-max", "--optimizer", "adam", "--sharpness", "3e4"], "l.svg"),
                       (["bound", "--optimizer", "sgd", "--lr", "0.05", "--batch-size", "4", "--dataset-size", "100",
                         "--curvature-variance", "30", "--sharpness", "10"], "n.pdf"),
                       (["nqm", "--dim", "10", "--batch-sizes", "1,2,4"], "q.png")):
        code, out, err = cli(capsys, *argv, "--plot", str(tmp_path / name), "--json")
        assert code == 0, err
        json.loads(out)  # the figure does not disturb the JSON on stdout
        assert (tmp_path / name).stat().st_size > 1000
