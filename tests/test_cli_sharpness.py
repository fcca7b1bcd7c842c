"""``pycurv sharpness``: the built-in example, user scripts and modules, --json, --batch-size, errors."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest

import torch

import pycurv  # noqa: E402
import pycurv.torch as pt  # noqa: E402
from pycurv import noise  # noqa: E402
from pycurv._builtin_model import setup as builtin_setup  # noqa: E402
from pycurv.cli import main  # noqa: E402


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """The command puts the cwd or the script's folder on sys.path, as `python SCRIPT.py` would: keep that
    (and the cwd) out of the other tests, whose spawned workers inherit sys.path."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)


def _run(capsys, *argv):
    code = main(["sharpness", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def builtin_values():
    model, loss_fn, data, _ = builtin_setup()
    H = pt.hessian(model, loss_fn, data)
    top = pycurv.lanczos(H, 1, tol=1e-10, seed=0)
    low = pycurv.lanczos(H, 1, which="SA", tol=1e-10, seed=0)
    return float(top.eigenvalues[0]), float(low.eigenvalues[0]), top.eigenvectors[:, 0]


def test_builtin_example_prints_a_verdict(capsys, builtin_values):
    code, out, err = _run(capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("pycurv sharpness: built-in example: tanh MLP 8-32-32-1")
    assert "  λ1 (sharpness)  8.44" in lines
    assert "  λmin            -5.03" in lines
    assert "  optimizer       SGD(lr=0.4, momentum=0.9)" in lines
    assert "  verdict         stable: λ1 = 8.44 is at 0.89 of (2 + 2β)/η = 9.5" in lines
    lam1, lam_min, _ = builtin_values
    assert f"{lam1:.3g}" == "8.44" and f"{lam_min:.3g}" == "-5.03"


def test_json_is_strict_and_complete(capsys, builtin_values):
    code, out, _ = _run(capsys, "--json", "--batch-size", "64")
    assert code == 0
    d = json.loads(out)
    lam1, lam_min, v = builtin_values
    assert d["lambda_max"]["value"] == pytest.approx(lam1, rel=1e-9) and d["lambda_max"]["converged"]
    assert d["lambda_min"]["value"] == pytest.approx(lam_min, rel=1e-8)
    assert d["threshold"] == {"value": pytest.approx(9.5), "formula": "(2 + 2β)/η", "quantity": "sharpness"}
    assert d["margin"] == pytest.approx(lam1 / 9.5, rel=1e-9) and d["stable"] and d["verdict"] == "stable"
    assert d["max_stable_lr"]["SGD"] == pytest.approx(2 / lam1, rel=1e-9)
    assert d["n_parameters"] == 1377 and d["n_samples"] == 512 and d["dtype"] == "float64"
    model, loss_fn, data, _ = builtin_setup()
    cv = noise.curvature_variance(pt.hessian(model, loss_fn, data, microbatch_size=64), v)
    ns = d["noisy_sgd"]
    assert ns["curvature_variance"] == pytest.approx(cv.variance, rel=1e-6)
    assert ns["max_lr"] == pytest.approx(cv.max_lr(64, momentum=0.9), rel=1e-6)
    assert ns["max_lr"] < d["max_stable_lr"]["SGD, momentum 0.9"]  # noise only shrinks the stable range


def test_criterion_eigenvalue_fewer_products_same_answer(capsys, builtin_values):
    """--criterion eigenvalue: tol bounds λ1's estimated relative error; the JSON says which and the estimate."""
    code, out, _ = _run(capsys, "--json", "--no-min", "--tol", "1e-8")
    by_res = json.loads(out)["lambda_max"]
    code2, out2, _ = _run(capsys, "--json", "--no-min", "--tol", "1e-8", "--criterion", "eigenvalue")
    by_eig = json.loads(out2)["lambda_max"]
    assert code == code2 == 0 and by_res["criterion"] == "residual" and by_eig["criterion"] == "eigenvalue"
    lam1 = builtin_values[0]
    assert by_eig["converged"] and by_eig["error_estimate"] <= 1e-8 * abs(by_eig["value"])
    assert by_eig["value"] == pytest.approx(lam1, rel=1e-8) and by_res["value"] == pytest.approx(lam1, rel=1e-8)
    assert by_eig["matvecs"] < by_res["matvecs"]


def test_batch_size_output(capsys):
    code, out, _ = _run(capsys, "--batch-size", "32", "--no-min")
    assert code == 0
    assert "  SGD with batch size 32 of 512 samples (Wu et al. 2018):" in out
    assert "(lr 0.4: unstable)" in out and "λmin" not in out


SCRIPT = """
import torch
import torch.nn.functional as F

def setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    x = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (40,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
    return {"model": model, "loss_fn": F.cross_entropy, "data": (x, y), "optimizer": opt}
"""


def test_user_script_with_adam_is_judged_on_the_preconditioned_sharpness(tmp_path, capsys):
    path = tmp_path / "my_setup.py"
    path.write_text(textwrap.dedent(SCRIPT))
    code, out, _ = _run(capsys, str(path), "--json", "--no-min")
    assert code == 0
    d = json.loads(out)
    s = {}
    exec(compile(textwrap.dedent(SCRIPT), "s", "exec"), s)
    model, loss_fn, data, opt = s["setup"]().values()
    H = pt.hessian(model, loss_fn, data, preconditioner=opt)
    assert d["preconditioned_lambda_max"]["value"] == pytest.approx(pycurv.sharpness(H, tol=1e-10, seed=0), rel=1e-9)
    assert d["threshold"]["formula"] == "38/η" and d["threshold"]["quantity"] == "preconditioned_sharpness"
    assert d["margin"] == pytest.approx(d["preconditioned_lambda_max"]["value"] / 3800, rel=1e-12)
    code, out, _ = _run(capsys, str(path), "--no-min")
    assert "  λ1(P⁻¹H)        " in out and "  optimizer       Adam(lr=0.01, betas=(0.9, 0.999), eps=1e-08)" in out
    assert "preconditioned sharpness λ1(P⁻¹H) = " in out and "Adam (preconditioned)" in out


def test_module_function_and_module_variables(tmp_path, capsys, monkeypatch):
    (tmp_path / "mysetups.py").write_text(textwrap.dedent("""
        import torch
        def tiny():
            torch.manual_seed(1)
            m = torch.nn.Linear(2, 1).double()
            x = torch.randn(10, 2, dtype=torch.float64)
            return m, lambda o, y: ((o - y) ** 2).mean(), (x, torch.zeros(10, 1, dtype=torch.float64))
    """))
    (tmp_path / "plain.py").write_text(textwrap.dedent("""
        import torch
        model = torch.nn.Linear(2, 1).double()
        data = (torch.eye(2, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64))
        def loss_fn(o, y):
            return ((o - y) ** 2).mean()
    """))
    code, out, _ = _run(capsys, "mysetups:tiny", "--json", "--lr", "0.1")
    assert code == 0
    d = json.loads(out)
    # linear least squares: H = 2 X^T X / n (with the bias column)
    import torch as t

    t.manual_seed(1)
    t.nn.Linear(2, 1)
    x = t.randn(10, 2, dtype=t.float64).numpy()
    X = np.c_[x, np.ones(10)]
    assert d["lambda_max"]["value"] == pytest.approx(np.linalg.eigvalsh(2 * X.T @ X / 10)[-1], rel=1e-9)
    assert d["threshold"]["formula"] == "2/η" and d["optimizer"]["name"] == "sgd"
    code, out, _ = _run(capsys, "plain.py", "--no-min")
    assert code == 0 and "no optimizer given" in out
    assert "  λ1 (sharpness)  3\n" in out  # H = 2 X^T X / 2 with X = [I | 1]: eigenvalues 3, 1, 0
    d = json.loads(_run(capsys, "plain.py", "--json")[1])
    X = np.c_[np.eye(2), np.ones(2)]
    assert d["lambda_max"]["value"] == pytest.approx(np.linalg.eigvalsh(X.T @ X)[-1], rel=1e-9)


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    code, out, err = _run(capsys, str(tmp_path / "missing.py"))
    assert code == 2 and err.startswith("pycurv sharpness: error: no such file") and out == ""
    bad = tmp_path / "bad.py"
    bad.write_text("def setup():\n    return 1, 2\n")
    code, _, err = _run(capsys, str(bad))
    assert code == 2 and "must return model, loss_fn, data[, optimizer]" in err
    nomod = tmp_path / "nomodel.py"
    nomod.write_text("def setup():\n    return 'm', None, None\n")
    code, _, err = _run(capsys, str(nomod))
    assert code == 2 and "must be a torch.nn.Module, got str" in err
    nofn = tmp_path / "nofn.py"
    nofn.write_text("x = 1\n")
    code, _, err = _run(capsys, f"{nofn}:make")
    assert code == 2 and "defines no function make()" in err
    code, _, err = _run(capsys, "--optimizer", "sgd")
    assert code == 0 or "needs --lr" in err  # the built-in returns an optimizer: --optimizer alone is accepted
    code, _, err = _run(capsys, "--optimizer", "adam", "--lr", "0.1")
    assert code == 2 and "--optimizer adam needs the setup to return that optimizer" in err
    code, _, err = _run(capsys, "--batch-size", "512")
    assert code == 2 and "--batch-size must be smaller than the data set (512 samples)" in err
    code, _, err = _run(capsys, "not_a_module:f")
    assert code == 2 and "cannot import module 'not_a_module'" in err
    with pytest.raises(SystemExit) as exc:
        main(["sharpness", "--dtype", "int8"])
    assert exc.value.code == 2


BN_SCRIPT = """
import torch
import torch.nn.functional as F

def setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Dropout(0.2), torch.nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for xb, yb in loader:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    return model, F.cross_entropy, loader, opt
"""


def test_training_loss_by_default_with_advice_past_the_threshold(tmp_path, capsys):
    path = tmp_path / "bn_setup.py"
    path.write_text(BN_SCRIPT)
    code, out, err = _run(capsys, str(path), "--json", "--no-min", "--optimizer", "adam", "--lr", "1")
    assert code == 0, err
    d = json.loads(out)
    assert d["mode"] == "batch_stats"
    assert d["function"] == ("training loss: 1 normalisation layer uses each batch's statistics, dropout off; "
                             "4 fixed batches of a shuffled DataLoader (one epoch, replayed), 64 samples")
    assert d["verdict"] == "unstable" and "GI-Adam" in d["advice"] and "catapults" in d["advice"]
    code, out, _ = _run(capsys, str(path), "--no-min", "--optimizer", "adam", "--lr", "1")
    assert "  function        training loss: 1 normalisation layer" in out
    assert "  what to do      Adam need not diverge past its threshold" in out
    d_eval = json.loads(_run(capsys, str(path), "--json", "--no-min", "--mode", "eval")[1])
    assert d_eval["function"].startswith("eval-mode loss: 1 normalisation layer")
    assert d_eval["lambda_max"]["value"] != pytest.approx(d["lambda_max"]["value"], rel=1e-3)
    # dropout with seeded masks: a fixed function (the probe passes), differing from dropout off
    d_train = json.loads(_run(capsys, str(path), "--json", "--no-min", "--mode", "train", "--dropout-seed", "3")[1])
    assert d_train["function"].startswith("train-mode loss: 1 normalisation layer uses each batch's statistics, "
                                          "dropout on, masks seeded")
    code, _, err = _run(capsys, str(path), "--dropout-seed", "3")
    assert code == 2 and "--dropout-seed seeds dropout masks, which only --mode train draws" in err


def test_optimizer_flags_and_max_matvecs(capsys):
    d = json.loads(_run(capsys, "--json", "--no-min", "--lr", "0.1", "--momentum", "0.9", "--nesterov",
                        "--dampening", "0", "--weight-decay", "0.01")[1])
    hp = d["optimizer"]["hyperparameters"]
    assert hp["nesterov"] is True and hp["momentum"] == 0.9 and hp["weight_decay"] == 0.01
    lam1 = d["lambda_max"]["value"]
    assert d["threshold"]["value"] == pytest.approx((2 + 2 * 0.9) / ((1 + 2 * 0.9) * 0.1) - 0.01, rel=1e-12)
    # flags override the returned optimizer's hyper-parameters (the built-in returns SGD lr 0.4, momentum 0.9)
    d = json.loads(_run(capsys, "--json", "--no-min", "--momentum", "0.5")[1])
    assert d["optimizer"]["lr"] == 0.4 and d["optimizer"]["hyperparameters"]["momentum"] == 0.5
    assert d["threshold"]["value"] == pytest.approx(3.0 / 0.4, rel=1e-12)
    d = json.loads(_run(capsys, "--json", "--no-min", "--max-matvecs", "3")[1])
    assert d["lambda_max"]["matvecs"] <= 3 and not d["lambda_max"]["converged"]
    assert d["lambda_max"]["value"] < lam1
    code, _, err = _run(capsys, "--beta1", "0.8")
    assert code == 2 and "beta1" in err


def test_nan_parameters_are_one_line_naming_nan(tmp_path, capsys):
    path = tmp_path / "nan_setup.py"
    path.write_text(textwrap.dedent("""
        import torch
        import torch.nn.functional as F

        def setup():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)).double()
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
            return model, F.cross_entropy, (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
    """))
    code, out, err = _run(capsys, str(path))
    assert code == 1 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("pycurv sharpness: error: NonFiniteMatvecError: the Hessian-vector product has ")
    assert "(the loss is nan)" in err and "dropout" not in err
