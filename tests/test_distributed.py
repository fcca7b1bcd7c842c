"""Lanczos across real processes: torch.multiprocessing spawn, gloo on 127.0.0.1, 2 and 4 ranks."""

from __future__ import annotations

import numpy as np
import pytest

import torch  # noqa: F401 - a test dependency: its absence must fail, not skip
import torch.multiprocessing as mp

import pycurv  # noqa: E402
from _dist_workers import matrix, run  # noqa: E402
from conftest import free_port  # noqa: E402

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def world(request, tmp_path_factory):
    """Spawns `size` ranks once; they run every scenario in SCENARIOS[size]."""
    size = request.param
    outdir = tmp_path_factory.mktemp(f"dist{size}")
    mp.start_processes(run, args=(size, free_port(), str(outdir)), nprocs=size, join=True, start_method="spawn")

    def results(scenario):
        outs = [np.load(outdir / f"{scenario}-rank{r}.npy", allow_pickle=True)[0] for r in range(size)]
        for o in outs:
            assert "crash" not in o, o["crash"]
        return outs

    return size, results


def test_sharded_basis_equals_single_process(world):
    size, results = world
    outs = results("sharded")
    single = pycurv.lanczos(matrix(240), 3, tol=1e-11, seed=5, ncv=14)
    for o in outs:
        np.testing.assert_array_equal(o["values"], outs[0]["values"])  # every rank, the same answer
    np.testing.assert_allclose(outs[0]["values"], single.eigenvalues, rtol=1e-10, atol=0)
    assert [o["hi"] - o["lo"] for o in outs] == [240 // size] * size  # each rank holds n/ranks rows
    vec = np.concatenate([o["vectors"] for o in outs], axis=0)
    signs = np.sign(np.sum(vec * single.eigenvectors, axis=0))
    np.testing.assert_allclose(vec * signs, single.eigenvectors, atol=1e-8)


def test_replicated_data_parallel_equals_single_process(world):
    size, results = world
    outs = results("replicated")
    ref = pycurv.lanczos(matrix(240), 3, tol=1e-11, seed=7, ncv=14)  # rank 0's seed is used everywhere
    for o in outs:
        np.testing.assert_array_equal(o["values"], outs[0]["values"])
        np.testing.assert_array_equal(o["vectors"], outs[0]["vectors"])
    np.testing.assert_allclose(outs[0]["values"], ref.eigenvalues, rtol=1e-10, atol=0)


def test_a_rank_that_raises_stops_every_rank(world):
    """Every rank stops at the product where the last one failed, each with the failure named.

    Checked by what the ranks did, not by the clock (a loaded machine stretches
    any time): a rank left waiting for the process group's timeout would end in
    gloo's timeout error, not in a PeerError naming the failed rank and its
    error, and the world would not have finished (the fixture joins every rank).
    """
    size, results = world
    outs = results("raise")
    assert outs[-1]["error"].startswith("KeyError: 'HVP failed on the last rank'")
    for o in outs[:-1]:
        assert o["error"].startswith(f"PeerError: rank {o['rank']} stopped because rank(s) {size - 1} failed")
        assert "HVP failed on the last rank" in o["error"]
        assert "timed out" not in o["error"].lower() and "timeout" not in o["error"].lower()
    # the failing product was the 4th on every rank: the others stopped at that product's agreement
    assert [o["products"] for o in outs] == [4] * size


def test_nan_on_one_rank_stops_every_rank(world):
    _, results = world
    outs = results("nan")
    for o in outs:
        assert o["error"].startswith("NonFiniteMatvecError: matvec call 3 returned non-finite values")
        assert "on rank(s) 1" in o["error"]
    assert [o["products"] for o in outs] == [3] * len(outs)  # every rank stopped at the bad product


# ---- shards of the basis inside one process (JAX devices use this) ----------------


@pytest.mark.parametrize("parts", [1, 3, 4])
def test_lanczos_sharded_in_one_process(parts):
    from pycurv.distributed import lanczos_sharded, shard_bounds

    a = matrix(240)
    bounds = [shard_bounds(240, parts, r) for r in range(parts)]

    def matvec(xs):
        y = a @ np.concatenate(xs)
        return [y[lo:hi] for lo, hi in bounds]

    res = lanczos_sharded(matvec, bounds, 3, tol=1e-11, seed=5, ncv=14)
    single = pycurv.lanczos(a, 3, tol=1e-11, seed=5, ncv=14)
    np.testing.assert_allclose(res.eigenvalues, single.eigenvalues, rtol=1e-10, atol=0)
    signs = np.sign(np.sum(res.eigenvectors * single.eigenvectors, axis=0))
    np.testing.assert_allclose(res.eigenvectors * signs, single.eigenvectors, atol=1e-8)
    assert res.converged and res.residuals_explicit


def test_lanczos_sharded_rejects_bad_bounds():
    from pycurv.distributed import lanczos_sharded

    with pytest.raises(ValueError, match="consecutive non-empty row ranges"):
        lanczos_sharded(lambda xs: xs, [(0, 5), (6, 10)])
