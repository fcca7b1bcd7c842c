"""The examples reproduce the papers' findings (slow: about two minutes in all, on one core).

- Cohen et al. 2021: under full-batch GD the sharpness rises to 2/η and stays within 10% of it.
- Cohen et al. 2022: under full-batch Adam the preconditioned sharpness settles within 15% of 38/η.
- Gilmer et al. 2022: warmup pushes λ1 down along 2/η_t, where training without it diverges.
- On a BatchNorm convnet, with batch statistics (the training loss): Adam's λ1(P⁻¹H) rises to and
  hovers near 38/η (Cohen et al. 2022); GI-Adam starts it about 1/√(1 − β2) lower (Kalra &
  Barkeshli 2024, §6.2); warmup pushes it down ahead of 38/η_t before η reaches its target (§4.3).
"""

from __future__ import annotations


import numpy as np
import pytest

import torch  # noqa: F401 - a test dependency
import matplotlib  # noqa: F401 - a test dependency

from conftest import ROOT  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))


def test_gd_sharpens_to_the_edge_of_stability(tmp_path):
    import edge_of_stability

    runs = edge_of_stability.main(plot=tmp_path / "eos.png", verbose=False)
    assert (tmp_path / "eos.png").stat().st_size > 10_000
    for lr in (0.3, 0.4):
        tracker, losses = runs[lr]
        v = np.array([r.value for r in tracker.records])
        edge = 2 / lr
        assert v[0] < 0.6 * edge  # starts well below 2/η: what follows is progressive sharpening
        late = v[len(v) * 2 // 3:]
        assert abs(np.median(late) / edge - 1) < 0.10
        assert np.all(np.abs(late / edge - 1) < 0.25)
        assert losses[-1] < 0.3 * losses[0]  # and the loss keeps going down
        assert all(r.converged for r in tracker.records)
    tracker, _ = runs[0.1]
    v = np.array([r.value for r in tracker.records])
    assert v.max() < 0.5 * 2 / 0.1 and v[-1] > 2 * v[0]  # a small step keeps sharpening below 2/η


def test_adam_preconditioned_sharpness_settles_at_38_over_lr(tmp_path):
    import adam_edge_of_stability

    tracker, raw, losses = adam_edge_of_stability.main(plot=tmp_path / "adam.png", verbose=False)
    assert (tmp_path / "adam.png").stat().st_size > 10_000
    rec = tracker.records
    thr = 38 / 1e-3
    assert all(r.quantity == "preconditioned_sharpness" and r.threshold == pytest.approx(thr) for r in rec)
    v = np.array([r.value for r in rec])
    late = v[len(v) * 2 // 3:]
    assert abs(np.median(late) / thr - 1) < 0.15
    assert v[0] > thr  # it starts far above (Kalra & Barkeshli §4.3) ...
    assert v[len(v) // 10] < 0.5 * thr  # ... drops, then rises to the threshold
    assert raw[-1][1] < 1e-3 * thr  # the raw sharpness says nothing about Adam's stability
    assert losses[-1] < 0.1 * losses[0]


def test_warmup_pushes_sharpness_down(tmp_path):
    import warmup

    runs = warmup.main(plot=tmp_path / "warmup.png", verbose=False)
    assert (tmp_path / "warmup.png").stat().st_size > 10_000
    tr, losses = runs["warmup"]
    edge = 2 / 1.0
    v = np.array([r.value for r in tr.records])
    assert v[0] > 2.5 * edge  # a sharp start
    end = [r for r in tr.records if r.step >= 999][0]
    assert end.value < 1.3 * edge and end.value < 0.5 * v.max()  # pushed down to the edge
    late_warmup = [r for r in tr.records if 600 <= r.step < 1000]
    assert all(0.8 < r.margin < 1.4 for r in late_warmup)  # tracking 2/η_t as η_t grows
    assert losses.max() <= losses[0] and losses[-1] < 0.2 * losses[0]
    _, losses0 = runs["no warmup"]
    assert len(losses0) < 300 or not np.isfinite(losses0[-1])  # the same η without warmup diverges


def test_adam_on_batchnorm_convnet_hovers_at_38_over_lr_with_batch_statistics(tmp_path):
    import adam_batchnorm

    tracker, eval_mode, losses = adam_batchnorm.main(plot=tmp_path / "bn.png", verbose=False)
    assert (tmp_path / "bn.png").stat().st_size > 10_000
    rec = tracker.records
    thr = 38 / 3e-3
    assert all(r.threshold == pytest.approx(thr) and r.function.startswith("training loss: 2 normalisation")
               for r in rec)
    v = np.array([r.value for r in rec])
    assert v.min() < 0.2 * thr  # it falls after the first steps, then rises to the threshold ...
    late = v[len(v) // 2:]
    assert abs(np.median(late) / thr - 1) < 0.20  # ... and hovers within 20% of it (Cohen et al. 2022)
    assert np.all(np.abs(late / thr - 1) < 0.25)
    assert losses[-1] < 0.3 * losses[0]
    # eval mode (running statistics) is another function: orders of magnitude past 38/η throughout
    assert min(e for _, e in eval_mode) > 100 * thr


def test_gi_adam_lowers_the_initial_preconditioned_sharpness(tmp_path):
    import gi_adam

    runs, factor = gi_adam.main(plot=tmp_path / "gi.png", verbose=False)
    assert (tmp_path / "gi.png").stat().st_size > 10_000
    # Kalra & Barkeshli §6.2: about 1/sqrt(1 - beta2) = 31.6 (the first step moves the two runs apart a little)
    assert 20 < factor < 40
    adam, gi = runs["Adam"][0].records, runs["GI-Adam"][0].records
    assert adam[0].margin > 1 > 10 * gi[0].margin  # standard Adam starts past 38/η, GI-Adam far below it
    assert max(r.margin for r in gi) < 1


def test_warmup_pushes_preconditioned_sharpness_down_before_the_target_lr(tmp_path):
    import adam_warmup

    runs = adam_warmup.main(plot=tmp_path / "warm.png", verbose=False)
    assert (tmp_path / "warm.png").stat().st_size > 10_000
    f = adam_warmup.summary(runs, 3e-2)
    assert f["no_warmup_start"].margin > 2  # at the target η from the first step: far past 38/η
    assert f["start"].value > 5 * f["at_target"].value
    assert f["met"].step < f["at_target"].step  # it meets the falling 38/η_t during the warmup ...
    assert f["at_target"].value < 0.75 * f["peak"].value  # ... and is pushed down with it
    assert f["at_target"].margin < 1.1 and f["largest_margin"] < 1.3
