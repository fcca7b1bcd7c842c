"""The loss that training optimizes: batch statistics by default, fixed batches, verdicts that say what to do.

The reference is written here, independent of pycurv: a float64 copy of the
model in training mode (batch norm on each batch's statistics), the loss over
the same fixed batches weighted by their sizes, its dense Hessian by double
backward one row at a time, Adam's P computed from the optimizer's state by
its formula, and numpy.linalg.eigh of P^-1/2 H P^-1/2.
"""

from __future__ import annotations

import copy
import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pycurv
import pycurv.torch as pt
import torch_models as tm
from pycurv.stability import margin_report, threshold
from pycurv.track import MarginWarning


class BNConvNet(nn.Module):
    """conv-BN-relu twice, global average pooling, a linear head: the shape of the convnets people train."""

    def __init__(self, width=4, classes=3):
        super().__init__()
        self.c1 = nn.Conv2d(1, width, 3, padding=1)
        self.b1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.b2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float() * 0.5
    return x, y


def _trained(opt_name, steps=6):
    """A float32 BN convnet after a few steps on two fixed batches of 16, as a training loop leaves it."""
    torch.manual_seed(0)
    model = BNConvNet()
    batches = [_images(16, 1), _images(16, 2)]
    if opt_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(steps):
        x, y = batches[step % 2]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, batches, opt


def _reference_hessian(model, batches):
    """Dense float64 Hessian of the training loss (batch statistics) over the batches, by double backward."""
    m = copy.deepcopy(model).double().train()
    params = [p for p in m.parameters()]
    n_total = sum(len(y) for _, y in batches)
    loss = sum(F.cross_entropy(m(x.double()), y) * len(y) for x, y in batches) / n_total
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)])
    rows = [torch.cat([r.reshape(-1) for r in torch.autograd.grad(g[i], params, retain_graph=True)])
            for i in range(g.numel())]
    H = torch.stack(rows).detach().numpy()
    return (H + H.T) / 2


def _reference_adam_p(model, opt):
    """Adam's P = (1 - beta1^t)(sqrt(v / (1 - beta2^t)) + eps), read from the optimizer's state by hand."""
    (b1, b2), eps = opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]
    parts = []
    for p in model.parameters():
        st = opt.state[p]
        t = float(st["step"])
        v = st["exp_avg_sq"].double().reshape(-1).numpy()
        parts.append((1 - b1**t) * (np.sqrt(v / (1 - b2**t)) + eps))
    return np.concatenate(parts)


def test_adam_report_and_tracker_default_to_the_training_loss():
    model, batches, opt = _trained("adam")
    H = _reference_hessian(model, batches)
    s = 1 / np.sqrt(_reference_adam_p(model, opt))
    exact = np.linalg.eigvalsh(s[:, None] * H * s[None, :])[-1]
    before = tm.snapshot(model, opt)

    rep = pt.stability_report(model, F.cross_entropy, batches, opt)
    assert rep.quantity == "preconditioned_sharpness"
    assert rep.value == pytest.approx(exact, rel=2e-3)
    assert rep.function.startswith("training loss: 2 normalisation layers use each batch's statistics, dropout off")
    assert "2 batches, 32 samples" in rep.function and rep.function in str(rep)

    tracker = pt.Tracker(model, F.cross_entropy, batches, opt, every=1, warn=False)
    rec = tracker.measure(6)
    assert rec.value == pytest.approx(exact, rel=2e-3)
    assert rec.function == rep.function and tracker.columns()["function"] == [rep.function]

    # The eval-mode function, with running statistics after 6 steps, is another function altogether.
    ev = pt.stability_report(model, F.cross_entropy, batches, opt, mode="eval")
    assert abs(ev.value / exact - 1) > 0.5
    assert ev.function.startswith("eval-mode loss: 2 normalisation layers use their running statistics")
    tm.assert_same(before, tm.snapshot(model, opt))


def test_sgd_report_defaults_to_the_training_loss():
    model, batches, opt = _trained("sgd")
    exact = np.linalg.eigvalsh(_reference_hessian(model, batches))[-1]
    rep = pt.stability_report(model, F.cross_entropy, batches, opt)
    assert rep.quantity == "sharpness" and rep.value == pytest.approx(exact, rel=2e-3)
    rec = pt.Tracker(model, F.cross_entropy, batches, opt, every=1, warn=False).measure(0)
    assert rec.value == pytest.approx(exact, rel=2e-3)
    assert pt.sharpness(model, F.cross_entropy, batches) == pytest.approx(exact, rel=2e-3)


def test_layer_norm_model_is_the_same_function_in_every_mode():
    model = tm.lnblock()
    batches = tm.classification_batches([10, 6], d=6)
    values = {mode: pt.sharpness(model, F.cross_entropy, batches, mode=mode, tol=1e-10) for mode in
              ("batch_stats", "eval", "train")}
    assert values["eval"] == pytest.approx(values["batch_stats"], rel=1e-12)
    assert values["train"] == pytest.approx(values["batch_stats"], rel=1e-12)
    exact = np.linalg.eigvalsh(tm.dense_hessian(model, F.cross_entropy, batches))[-1]
    assert values["batch_stats"] == pytest.approx(exact, rel=1e-10)
    H = pt.hessian(model, F.cross_entropy, batches)
    assert H.function == "training loss: no batch-statistics layers, dropout off; 2 batches"


def test_shuffled_dataloader_is_one_fixed_epoch_and_left_as_it_was():
    torch.manual_seed(0)
    model = BNConvNet().double()
    x, y = _images(40, 3)
    gen = torch.Generator().manual_seed(7)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.double(), y), batch_size=16,
                                         shuffle=True, drop_last=True, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x0, y0 = _images(16, 5)
    F.cross_entropy(model(x0.double()), y0).backward()
    opt.step()
    gen_state, rng_state = gen.get_state(), torch.get_rng_state()
    before = tm.snapshot(model, opt)

    H = pt.hessian(model, F.cross_entropy, loader)  # the determinism probe runs at the first product
    lam = pycurv.sharpness(H, tol=1e-10, seed=0)
    assert H.last_probe is not None and H.last_probe < 1e-12
    assert "2 fixed batches of a shuffled DataLoader (one epoch, replayed), 32 samples" in H.function
    rep = pt.stability_report(model, F.cross_entropy, loader, opt, tol=1e-8)
    assert rep.quantity == "preconditioned_sharpness" and "shuffled DataLoader" in rep.function
    # Nothing of the user's changed: the loader's generator, torch's RNG, the model, the optimizer.
    assert torch.equal(gen.get_state(), gen_state) and torch.equal(torch.get_rng_state(), rng_state)
    tm.assert_same(before, tm.snapshot(model, opt))

    # The epoch the operator replays is the one the user's loader draws next.
    epoch = list(loader)
    assert len(epoch) == 2
    exact = np.linalg.eigvalsh(_reference_hessian(model, epoch))[-1]
    assert lam == pytest.approx(exact, rel=1e-9)
    assert H.check_determinism() < 1e-12


def test_random_augmentation_through_torch_rng_is_replayed_too():
    class Noisy(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i] + 0.1 * torch.randn_like(self.x[i]), self.y[i]

    torch.manual_seed(0)
    model = BNConvNet().double()
    x, y = _images(32, 4)
    loader = torch.utils.data.DataLoader(Noisy(x.double(), y), batch_size=16, shuffle=True)
    H = pt.hessian(model, F.cross_entropy, loader)
    pycurv.sharpness(H, tol=1e-6, seed=0)
    assert H.check_determinism() < 1e-12


def test_nan_parameter_is_reported_as_nan_not_as_dropout():
    model = tm.bn_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    batch = tm.classification_batches([12])[0]
    with pytest.raises(pycurv.NonFiniteMatvecError, match=r"non-finite values \(NaN or Inf\).*the loss is nan") as err:
        pycurv.sharpness(pt.hessian(model, F.cross_entropy, batch), seed=0)
    assert "dropout" not in str(err.value)
    report = pytest.raises(pycurv.NonFiniteMatvecError, pt.stability_report, model, F.cross_entropy, batch,
                           torch.optim.SGD(model.parameters(), lr=0.1))
    assert "NaN" in str(report.value)


def test_nan_in_jax_loss_is_reported_as_nan():
    import jax.numpy as jnp

    import pycurv.jax as pj

    def loss(p, batch):
        x, y = batch
        return jnp.mean((x @ p["w"] - y) ** 2) + jnp.log(p["w"][0] - p["w"][0])

    params = {"w": jnp.ones(3)}
    batch = (jnp.ones((4, 3)), jnp.zeros(4))
    with pytest.raises(pycurv.NonFiniteMatvecError, match="non-finite values") as err:
        pycurv.sharpness(pj.hessian(loss, params, batch), seed=0)
    assert "dropout" not in str(err.value)


def test_unstable_verdicts_say_what_to_expect_and_what_to_do():
    adam = threshold("adam", 1e-3)
    rep = margin_report(6.3e6, adam, function="training loss")
    assert not rep.stable and "165.79 of 38/η" in rep.text
    assert "catapults" in rep.advice and "Kalra & Barkeshli 2024, §4.3" in rep.advice
    assert "lower the learning rate to ≤ 6.03e-06" in rep.advice
    assert "GI-Adam" in rep.advice and "1/√(1 − β2) = 31.6" in rep.advice
    assert "warmup_timing" in rep.advice
    assert str(rep).splitlines() == [rep.text, "measured on the training loss", rep.advice]
    sgd = margin_report(25.0, threshold("sgd", 0.1))
    assert "catapults" in sgd.advice and "lower the learning rate to ≤ 0.08" in sgd.advice
    assert "GI-Adam" not in sgd.advice
    assert margin_report(19.0, threshold("sgd", 0.1)).advice == ""


class _Fixed(pycurv.Operator):
    """A diagonal operator whose top eigenvalue is set per measurement (for the tracker's bookkeeping)."""

    exact = True

    def __init__(self, top):
        d = np.r_[top, np.linspace(0.0, 0.5 * top, 9)]
        self._d = d
        self.shape = (10, 10)
        self.dtype = np.dtype(np.float64)

    def matvec(self, x):
        return self._d * x


def test_tracker_warns_at_each_crossing_and_when_the_excess_doubles():
    thr = threshold("sgd", 0.1)  # 20
    tr = pycurv.track.Tracker(every=1, tol=1e-8)
    warned = []
    for step, top in enumerate([100.0, 60.0, 30.0, 15.0, 10.0, 25.0, 30.0, 55.0]):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            tr.record(_Fixed(top), thr, step)
        warned += [(step, str(w.message)) for w in got if issubclass(w.category, MarginWarning)]
    # step 0 (5x: Adam-like early excess), step 5 (crossing again after recovering), step 7 (2.75x >= 2 x 1.25x)
    assert [s for s, _ in warned] == [0, 5, 7]
    assert warned[1][1].startswith("step 5: λ1 = 25 is at 1.25 of 2/η = 20 — past the stability threshold. Expect")
    assert "lower the learning rate to ≤ 0.08" in warned[1][1]


def test_tracker_logs_each_measurement_and_plots_decades_on_a_log_axis(tmp_path, caplog):
    import matplotlib  # noqa: F401 - a test dependency

    thr = threshold("adam", 1e-3)
    tr = pycurv.track.Tracker(every=1, tol=1e-8, warn=False)
    with caplog.at_level(logging.INFO, logger="pycurv"):
        for step, top in enumerate([3e6, 2e4, 3e4]):
            tr.record(_Fixed(top), thr, step)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["step 0", "step 1", "step 2"]
    assert "is at 78.95 of 38/η = 38000" in caplog.records[0].getMessage()
    fig = tr.plot(tmp_path / "t.png")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert ax.get_title() == "preconditioned sharpness against 38/η, adam"
    narrow = pycurv.track.Tracker(every=1, tol=1e-8, warn=False)
    narrow.record(_Fixed(30.0), threshold("sgd", 0.1), 0)
    assert narrow.plot().axes[0].get_yscale() == "linear"


def test_gi_adam_starts_the_second_moment_at_the_gradient_squared():
    model = tm.mlp_tanh()
    x, y = tm.classification_batches([20])[0]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    F.cross_entropy(model(x), y).backward()
    g0 = [p.grad.clone() for p in model.parameters()]
    assert pt.init_adam_from_gradients(opt) == 4
    opt.step()
    for p, g in zip(model.parameters(), g0):
        # v1 = beta2 v0 + (1 - beta2) g1^2 with v0 = g1 = g0
        assert torch.allclose(opt.state[p]["exp_avg_sq"], g**2, rtol=1e-12)
        assert float(opt.state[p]["step"]) == 1.0
    with pytest.raises(ValueError, match="before the first optimizer.step"):
        pt.init_adam_from_gradients(opt)
    with pytest.raises(ValueError, match="call loss.backward"):
        pt.init_adam_from_gradients(torch.optim.Adam(tm.mlp_tanh().parameters()))


def test_long_measurements_log_progress_with_the_target_tolerance(caplog):
    from pycurv._progress import Progress
    from pycurv.results import LanczosProgress

    bar = Progress("λ1", enabled=False, delay=0.0, tol=1e-4, log_every=0.0)
    assert not bar.enabled and not bar.wanted  # nobody listens: no callback at all
    with caplog.at_level(logging.INFO, logger="pycurv"):
        assert bar.wanted
        bar(LanczosProgress(12, np.array([8.5]), np.array([0.017])))
    (record,) = caplog.records
    assert record.getMessage().startswith("λ1: 8.5  residual 2.0e-03 (tol 1.0e-04)  12 HVPs")
