"""The training-loop tracker: records, warm starts, the margin warning, CSV/JSON, plots."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest

import pycurv
from pycurv.stability import threshold
from pycurv.testing import SpectrumOperator
from pycurv.track import MarginWarning, Tracker, operator_options


class _Counting(pycurv.Operator):
    """A float64 spectrum operator that counts its products like the adapters do."""

    exact = False

    def __init__(self, eigs):
        self.base = SpectrumOperator(eigs, seed=1)
        self.shape = self.base.shape
        self.dtype = np.dtype(np.float64)
        self.n_hvps = 0

    def matvec(self, x):
        self.n_hvps += 1
        return self.base.matvec(x)


def _eigs(top, n=400, seed=0, second=0.7):
    rng = np.random.default_rng(seed)
    return np.r_[top, second * top, rng.uniform(-1, 0.5 * top, n - 2)]


def test_records_margin_and_warm_start():
    tr = Tracker(every=10, tol=1e-8, seed=0)
    op = _Counting(_eigs(15.0, second=0.995))  # a close second: a cold start needs more than 12 products
    thr = threshold("sgd", 0.1)  # 2/η = 20
    r0 = tr.record(op, thr, 0)
    assert r0.value == pytest.approx(15.0, rel=1e-12)
    assert r0.threshold == pytest.approx(20.0) and r0.margin == pytest.approx(0.75)
    assert r0.quantity == "sharpness" and r0.formula == "2/η" and r0.optimizer == "sgd"
    assert r0.lr == 0.1 and r0.converged and r0.status == "converged" and r0.matvecs == op.n_hvps
    r1 = tr.record(op, thr, 10)  # same operator: the previous Ritz vector is already converged
    assert r1.matvecs <= 13 < r0.matvecs  # no stop before 12 products (min_matvecs), then at once
    assert [r.step for r in tr.records] == [0, 10] and len(tr) == 2
    assert tr.due(20) and not tr.due(21)
    with pytest.raises(ValueError, match="every must be a positive integer"):
        Tracker(every=0)


def test_warns_once_when_the_margin_first_exceeds_one():
    tr = Tracker(every=1, tol=1e-8)
    thr = threshold("sgd", 0.1, momentum=0.9)  # 38
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr.record(_Counting(_eigs(30.0)), thr, 0)
    with pytest.warns(MarginWarning, match=r"step 1: λ1 = 40 is at 1.05 of \(2 \+ 2β\)/η = 38 — past"):
        tr.record(_Counting(_eigs(40.0)), thr, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr.record(_Counting(_eigs(45.0)), thr, 2)
    assert [r.margin > 1 for r in tr.records] == [False, True, True]
    quiet = Tracker(every=1, warn=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.record(_Counting(_eigs(45.0)), thr, 0)


def test_csv_json_and_plot(tmp_path):
    import matplotlib  # noqa: F401 - a test dependency
    tr = Tracker(every=1, tol=1e-6, warn=False)
    for step, (top, lr) in enumerate([(5.0, 0.1), (12.0, 0.1), (21.0, 0.1), (18.0, 0.05)]):
        tr.record(_Counting(_eigs(top, seed=step)), threshold("sgd", lr), step)
    tr.to_csv(tmp_path / "t.csv")
    with open(tmp_path / "t.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[2]["value"]) == pytest.approx(21.0, rel=1e-9)
    assert float(rows[3]["threshold"]) == pytest.approx(40.0)
    assert rows[0]["formula"] == "2/η" and rows[0]["converged"] == "True"
    tr.to_json(tmp_path / "t.json")
    data = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))
    assert data["records"][1]["margin"] == pytest.approx(12.0 / 20.0, rel=1e-9)
    assert set(data["records"][0]) == set(tr.columns())
    fig = tr.plot(tmp_path / "t.png", title="test")
    assert (tmp_path / "t.png").stat().st_size > 1000
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and "2/η" in ax.get_legend().get_texts()[1].get_text()


def test_operator_options_follow_the_threshold():
    assert operator_options(threshold("sgd", 0.1, weight_decay=1e-3)) == {}
    opt = object()
    assert operator_options(threshold("adam", 1e-3), opt) == {"preconditioner": opt}
    assert operator_options(threshold("adam", 1e-3, weight_decay=0.01), opt) == {"preconditioner": opt, "l2": 0.01}
    assert operator_options(threshold("adamw", 1e-3, weight_decay=0.01), opt) == {"preconditioner": opt}


# -- PyTorch -------------------------------------------------------------------


def test_torch_tracker_follows_the_schedule_and_adam():
    import torch
    import torch.nn.functional as F

    import pycurv.torch as pt
    import torch_models as tm

    model = tm.mlp_tanh()
    x, y = tm.classification_batches([32])[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    tr = pt.Tracker(model, F.cross_entropy, (x, y), opt, every=3, tol=1e-8)
    for step in range(7):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        rec = tr.step()
        assert (rec is not None) == (step % 3 == 0)
    assert [r.step for r in tr.records] == [0, 3, 6]
    assert [r.lr for r in tr.records] == [0.5, 0.25, 0.25]  # the lr of the next step: after sched.step()
    assert tr.records[2].threshold == pytest.approx(3.0 / 0.25)  # (2 + 2β)/η
    assert tr.records[-1].value == pytest.approx(pt.sharpness(model, F.cross_entropy, (x, y), tol=1e-10), rel=1e-9)
    assert all(r.converged for r in tr.records)

    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    tr = pt.Tracker(model, F.cross_entropy, (x, y), adam, every=2, tol=1e-8)
    # Adam's preconditioned sharpness starts far above 38/η (Kalra & Barkeshli §4.3): one warning
    with pytest.warns(MarginWarning, match="step 0: preconditioned sharpness"):
        for step in range(3):
            adam.zero_grad()
            F.cross_entropy(model(x), y).backward()
            adam.step()
            tr.step(step)
    assert [r.step for r in tr.records] == [0, 2]
    last = tr.records[-1]
    assert last.quantity == "preconditioned_sharpness" and last.formula == "38/η"
    assert last.threshold == pytest.approx(3800.0)
    H = pt.hessian(model, F.cross_entropy, (x, y), preconditioner=adam)
    assert last.value == pytest.approx(pycurv.sharpness(H, tol=1e-10, seed=0), rel=1e-9)

    rep = pt.stability_report(model, F.cross_entropy, (x, y), adam, tol=1e-10)
    assert rep.quantity == "preconditioned_sharpness" and rep.value == pytest.approx(last.value, rel=1e-9)
    assert rep.text.startswith("preconditioned sharpness λ1(P⁻¹H) = ") and "of 38/η = 3800" in rep.text
    with pytest.raises(ValueError, match="no stability model for optimizer Adagrad"):
        pt.Tracker(model, F.cross_entropy, (x, y), torch.optim.Adagrad(model.parameters()))


def test_torch_rmsprop_and_coupled_weight_decay():
    import torch
    import torch.nn.functional as F

    import pycurv.torch as pt
    import torch_models as tm

    model = tm.mlp_tanh()
    x, y = tm.classification_batches([16])[0]
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, weight_decay=0.1, centered=True)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    rep = pt.stability_report(model, F.cross_entropy, (x, y), opt, tol=1e-10)
    P = np.concatenate([
        (torch.sqrt(opt.state[p]["square_avg"] - opt.state[p]["grad_avg"] ** 2) + 1e-8).reshape(-1).numpy()
        for p in model.parameters()])
    D = tm.dense_hessian(model, F.cross_entropy, [(x, y)]) + 0.1 * np.eye(P.size)
    s = 1 / np.sqrt(P)
    assert rep.value == pytest.approx(np.linalg.eigvalsh(s[:, None] * D * s[None, :])[-1], rel=1e-9)
    assert rep.threshold == pytest.approx(2 / 1e-3)


# -- JAX -----------------------------------------------------------------------


def test_jax_tracker_with_a_schedule_and_with_adam():
    import jax
    import optax
    import jax.numpy as jnp

    import pycurv.jax as pj

    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.standard_normal((32, 3)), jnp.float32)
    Y = jnp.asarray(np.sin(rng.standard_normal(32)), jnp.float32)
    params = {"w1": jnp.asarray(rng.standard_normal((3, 8)) / 2, jnp.float32), "w2": jnp.zeros(8, jnp.float32)}

    def loss(p, b):
        return jnp.mean((jnp.tanh(b[0] @ p["w1"]) @ p["w2"] - b[1]) ** 2)

    sched = optax.linear_schedule(0.01, 0.1, 6)
    tx = optax.sgd(sched)
    st = tx.init(params)
    tr = pj.Tracker(loss, (X, Y), optimizer="sgd", lr=sched, every=3, tol=1e-4)
    grad = jax.jit(jax.grad(loss))
    for step in range(7):
        upd, st = tx.update(grad(params, (X, Y)), st, params)
        params = optax.apply_updates(params, upd)
        tr.step(step, params, st)
    assert [r.step for r in tr.records] == [0, 3, 6]
    assert [r.lr for r in tr.records] == pytest.approx([0.01, 0.055, 0.1])
    assert tr.records[-1].value == pytest.approx(pj.sharpness(loss, params, (X, Y), tol=1e-5), rel=1e-4)

    tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    st = tx.init(params)
    tr = pj.Tracker(loss, (X, Y), optimizer="adam", every=1, tol=1e-4)
    for step in range(2):
        upd, st = tx.update(grad(params, (X, Y)), st, params)
        params = optax.apply_updates(params, upd)
        tr.step(step, params, st)
    assert tr.records[-1].quantity == "preconditioned_sharpness"
    assert tr.records[-1].threshold == pytest.approx(3800.0, rel=1e-6)
    H = pj.hessian(loss, params, (X, Y), preconditioner=st)
    assert tr.records[-1].value == pytest.approx(pycurv.sharpness(H, tol=1e-5, seed=0), rel=1e-4)
    with pytest.raises(ValueError, match="needs the learning rate"):
        pj.Tracker(loss, (X, Y), every=1).step(0, params)
    with pytest.raises(ValueError, match="needs beta1, beta2 and eps"):
        pj.Tracker(loss, (X, Y), optimizer="adam", lr=0.1, every=1).step(0, params, optax.adam(0.1).init(params))


def test_progress_line_only_on_a_terminal():
    import io

    from pycurv._progress import Progress, measure_top

    class Tty(io.StringIO):
        def isatty(self):
            return True

    op = _Counting(_eigs(15.0, n=3000))
    out = Tty()
    bar = Progress("λ1", stream=out, delay=0.0)
    bar._last = -1.0
    res = pycurv.lanczos(op, 1, tol=1e-10, seed=0, callback=bar)
    bar.close()
    text = out.getvalue()
    assert res.converged and text.startswith("\rλ1: ") and "HVPs" in text and text.endswith("\r\033[K")
    pipe = io.StringIO()
    quiet = Progress("λ1", stream=pipe, delay=0.0)
    assert not quiet.enabled
    pycurv.lanczos(op, 1, tol=1e-10, seed=0, callback=quiet)
    quiet.close()
    assert pipe.getvalue() == ""
    assert measure_top(op, seed=0, progress=False).converged  # the default tol of float64: 1e-6
