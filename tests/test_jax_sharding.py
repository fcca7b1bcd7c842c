"""pycurv.jax over 4 host devices: data-parallel products and a basis sharded over the devices.

JAX fixes its device count when it starts, so the checks run in a fresh
interpreter with XLA_FLAGS=--xla_force_host_platform_device_count=4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax  # noqa: F401 - a test dependency: its absence must fail, not skip
import pytest

SCRIPT = textwrap.dedent('''
    import json
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    import pycurv
    import pycurv.jax as pj

    assert len(jax.devices()) == 4, jax.devices()
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w1": 0.5 * jax.random.normal(k1, (5, 16)), "b1": jnp.zeros(16), "w2": 0.5 * jax.random.normal(k2, (16, 3))}
    x = jax.random.normal(k3, (64, 5))
    y = jax.random.randint(k4, (64,), 0, 3)

    def loss_fn(p, batch):
        xb, yb = batch
        logits = jnp.tanh(xb @ p["w1"] + p["b1"]) @ p["w2"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(yb.shape[0]), yb])

    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    mesh = Mesh(np.array(jax.devices()), ("data",))
    out = {}
    single = pycurv.lanczos(pj.hessian(loss_fn, params, batches), 2, which="BE", tol=1e-12, seed=3)
    H = pj.hessian(loss_fn, params, batches, mesh=mesh)
    out["devices_per_batch"] = len(jax.tree_util.tree_leaves(H._data)[0].sharding.device_set)
    dp = pycurv.lanczos(H, 2, which="BE", tol=1e-12, seed=3)
    Hs = pj.hessian(loss_fn, params, batches, mesh=mesh, shard_basis=True)
    out["shards"] = Hs.shard_bounds
    sb = pycurv.lanczos(Hs, 2, which="BE", tol=1e-12, seed=3)
    out["single"] = single.eigenvalues.tolist()
    out["data_parallel"] = dp.eigenvalues.tolist()
    out["sharded"] = sb.eigenvalues.tolist()
    out["vector_overlap"] = float(abs(np.sum(sb.eigenvectors[:, 0] * dp.eigenvectors[:, 0])))
    bad = x.at[40, 2].set(jnp.nan)  # a sample held by the third device
    try:
        pycurv.lanczos(pj.hessian(loss_fn, params, (bad, y), mesh=mesh, check_determinism=False), 1, seed=3)
        out["nan"] = None
    except Exception as exc:
        out["nan"] = f"{type(exc).__name__}: {exc}"
    try:
        pj.hessian(loss_fn, params, (x[:30], y[:30]), mesh=mesh)
        out["uneven"] = None
    except ValueError as exc:
        out["uneven"] = str(exc)
    print(json.dumps(out))
''')


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path_factory.mktemp("jax4"))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rel(a, b):
    return max(abs(p - q) / abs(q) for p, q in zip(a, b))


def test_data_parallel_equals_single_device(four_devices):
    assert four_devices["devices_per_batch"] == 4  # each batch really is split over the four devices
    assert _rel(four_devices["data_parallel"], four_devices["single"]) <= 1e-10


def test_sharded_basis_equals_replicated(four_devices):
    assert len(four_devices["shards"]) == 4
    assert _rel(four_devices["sharded"], four_devices["data_parallel"]) <= 1e-10
    assert four_devices["vector_overlap"] == pytest.approx(1.0, abs=1e-8)


def test_nan_on_one_device_is_reported(four_devices):
    assert four_devices["nan"].startswith("NonFiniteMatvecError: matvec call 1 returned")


def test_uneven_batch_is_a_clear_error(four_devices):
    assert "cannot be split evenly over the 4 devices" in four_devices["uneven"]
