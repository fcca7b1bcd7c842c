"""The examples reproduce the papers' findings (slow: about two minutes in all, on one core).

- Cohen et al. 2021: under full-batch GD the sharpness rises to 2/η and stays within 10% of it.
- Cohen et al. 2022: under full-batch Adam the preconditioned sharpness settles within 15% of 38/η.
- Gilmer et al. 2022: warmup pushes λ1 down along 2/η_t, where training without it diverges.
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
