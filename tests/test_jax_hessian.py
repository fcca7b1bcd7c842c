"""pycurv.jax.hessian against dense jax.hessian of tiny models, with and without jax_enable_x64."""

from __future__ import annotations


import numpy as np
import pytest

import jax

import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import pycurv  # noqa: E402
import pycurv.jax as pj  # noqa: E402


def x64(on: bool = True):
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(on)
    from jax.experimental import disable_x64, enable_x64  # older JAX

    return enable_x64() if on else disable_x64()


# -- tiny models (params are nested pytrees) --------------------------------


def _normal(rng, shape, dtype, scale=1.0):
    # NumPy draws: jax.random would compile a kernel per shape, seconds on a slow machine
    return jnp.asarray(scale * rng.standard_normal(shape), dtype)


def init_mlp(rng, sizes, dtype):
    return [{"w": _normal(rng, (a, b), dtype, 1 / np.sqrt(a)), "b": _normal(rng, (b,), dtype, 0.1)}
            for a, b in zip(sizes[:-1], sizes[1:])]


def mlp(params, x, act):
    for layer in params[:-1]:
        x = act(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def xent(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def mse(out, y):
    return jnp.mean((out - y) ** 2)


def init_conv(rng, dtype):
    return {"conv": {"k": _normal(rng, (3, 1, 3, 3), dtype, 0.3), "b": jnp.zeros(3, dtype)},
            "fc": (_normal(rng, (48, 3), dtype, 0.1), _normal(rng, (3,), dtype, 0.1))}


def conv(params, x):
    h = jax.lax.conv_general_dilated(x, params["conv"]["k"], (1, 1), "VALID") + params["conv"]["b"][None, :, None, None]
    h = jnp.tanh(h).reshape(x.shape[0], -1)
    w, b = params["fc"]
    return h @ w + b


def init_ln(rng, dtype, d=6, h=10, out=3):
    return {"g": jnp.ones(d, dtype), "beta": jnp.zeros(d, dtype), "w1": _normal(rng, (d, h), dtype, 1 / np.sqrt(d)),
            "w2": _normal(rng, (h, d), dtype, 1 / np.sqrt(h)), "head": _normal(rng, (d, out), dtype, 1 / np.sqrt(d))}


def ln_block(p, x):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    z = (x - mu) / jnp.sqrt(var + 1e-5) * p["g"] + p["beta"]
    return (x + jax.nn.gelu(z @ p["w1"]) @ p["w2"]) @ p["head"]


def batches(sizes, d, seed=0, classes=3, regression=0, image=False, dtype=None):
    rng = np.random.default_rng(seed)
    dtype = dtype or (np.float64 if jax.config.jax_enable_x64 else np.float32)
    out = []
    for n in sizes:
        x = rng.standard_normal((n, 1, 6, 6) if image else (n, d)).astype(dtype)
        y = rng.standard_normal((n, regression)).astype(dtype) if regression else rng.integers(0, classes, n)
        out.append((jnp.asarray(x), jnp.asarray(y)))
    return out


def case(name):
    dt = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    key = np.random.default_rng(0)
    if name == "mlp-tanh-xent":
        return init_mlp(key, [4, 8, 3], dt), lambda p, b: xent(mlp(p, b[0], jnp.tanh), b[1]), batches([16], 4)
    if name == "mlp-relu-mse-3-batches":
        return (init_mlp(key, [4, 10, 2], dt), lambda p, b: mse(mlp(p, b[0], jax.nn.relu), b[1]),
                batches([5, 9, 6], 4, regression=2))
    if name == "conv-xent-2-batches":
        return init_conv(key, dt), lambda p, b: xent(conv(p, b[0]), b[1]), batches([7, 5], 0, image=True)
    if name == "layernorm-xent":
        return init_ln(key, dt), lambda p, b: xent(ln_block(p, b[0]), b[1]), batches([12], 6)
    raise KeyError(name)


def dense(loss_fn, params, data):
    flat, unravel = ravel_pytree(params)
    N = sum(int(b[0].shape[0]) for b in data)

    def f(v):
        return sum(loss_fn(unravel(v), b) * b[0].shape[0] for b in data) / N

    return np.asarray(jax.jit(jax.hessian(f))(flat), dtype=np.float64)


CASES = ["mlp-tanh-xent", "mlp-relu-mse-3-batches", "conv-xent-2-batches", "layernorm-xent"]


@pytest.mark.parametrize("name", CASES)
def test_hvp_and_sharpness_match_dense_jax_hessian_in_float64(name):
    with x64(True):
        params, loss_fn, data = case(name)
        D = dense(loss_fn, params, data)
        ev = np.linalg.eigvalsh(D)
        scale = np.max(np.abs(ev))
        H = pj.hessian(loss_fn, params, data if len(data) > 1 else data[0])
        assert H.dtype == "float64" and H.device == "cpu:0" and H.shape == D.shape
        for v in np.random.default_rng(0).standard_normal((3, H.shape[0])):
            assert np.max(np.abs(H.matvec(v) - D @ v)) <= 1e-10 * scale * np.linalg.norm(v)
        res = pycurv.lanczos(H, 1, tol=1e-12, seed=0)
        assert res.converged and abs(res.eigenvalues[0] - ev[-1]) <= 1e-10 * scale
        assert H.n_samples == sum(int(b[0].shape[0]) for b in data)


def test_without_x64_products_are_float32_and_sharpness_agrees():
    with x64(False):
        params32, loss_fn, data32 = case("layernorm-xent")
        H32 = pj.hessian(loss_fn, params32, data32[0])
        assert H32.dtype == "float32"
        lam32 = pj.sharpness(loss_fn, params32, data32[0], tol=1e-4)
        with pytest.raises(ValueError, match="jax_enable_x64"):
            pj.hessian(loss_fn, params32, data32[0], dtype="float64")
        assert H32.matvec(np.ones(H32.shape[0])).dtype == np.float64
    with x64(True):
        params64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params32)
        x, y = data32[0]
        H64 = pj.hessian(loss_fn, params64, (jnp.asarray(x, jnp.float64), y))
        lam64 = pycurv.sharpness(H64, tol=1e-10, seed=0)
        # float32 parameters cast up: the same point, float64 products
        H64b = pj.hessian(loss_fn, params32, (x, y), dtype="float64")
        assert H64b.dtype == "float64"
        assert abs(pycurv.sharpness(H64b, tol=1e-10, seed=0) - lam64) <= 1e-12 * lam64
    assert abs(lam32 - lam64) <= 1e-5 * abs(lam64)


def test_layout_batches_and_reductions():
    with x64(True):
        params, loss_fn, data = case("mlp-relu-mse-3-batches")
        D = dense(loss_fn, params, data)
        v = np.random.default_rng(1).standard_normal(D.shape[0])
        summed = pj.hessian(lambda p, b: loss_fn(p, b) * b[0].shape[0], params, data, reduction="sum")
        assert np.max(np.abs(summed.matvec(v) - D @ v)) <= 1e-12 * np.max(np.abs(D @ v))
        H = pj.hessian(loss_fn, params, data)
        assert H.count_samples() == 20
        theta = H.parameters_vector()
        assert np.array_equal(theta, np.asarray(ravel_pytree(params)[0]))
        assert np.array_equal(H.to_vector(H.from_vector(theta)), theta)
        assert abs(H.loss() - sum(float(loss_fn(params, b)) * b[0].shape[0] for b in data) / 20) < 1e-14
        l2 = pj.hessian(loss_fn, params, data, l2=0.5)
        assert np.allclose(l2.matvec(v), H.matvec(v) + 0.5 * v, rtol=0, atol=1e-13)
        H.matvec(v)
        assert H.n_hvps == 3 and H.last_probe < 1e-14  # the linearised product against jvp(grad) recomputed


def test_optax_adam_preconditioner_matches_dense():
    import optax
    with x64(True):
        params, loss_fn, data = case("layernorm-xent")
        batch = data[0]
        opt = optax.inject_hyperparams(optax.adam)(learning_rate=3e-3, b1=0.9, b2=0.99, eps=1e-6)
        state = opt.init(params)

        @jax.jit
        def step(params, state):
            upd, state = opt.update(jax.grad(loss_fn)(params, batch), state, params)
            return optax.apply_updates(params, upd), state

        for _ in range(4):
            params, state = step(params, state)
        nu, _ = ravel_pytree(state.inner_state[0].nu)
        t = int(state.inner_state[0].count)
        P = (1 - 0.9**t) * (np.sqrt(np.asarray(nu) / (1 - 0.99**t)) + 1e-6)
        s = 1 / np.sqrt(P)
        A = s[:, None] * dense(loss_fn, params, data) * s[None, :]
        ev = np.linalg.eigvalsh(A)
        H = pj.hessian(loss_fn, params, batch, preconditioner=state)
        assert H.preconditioned
        np.testing.assert_allclose(np.asarray(H.preconditioner_diagonal), P, rtol=1e-13)
        v = np.random.default_rng(2).standard_normal(H.shape[0])
        assert np.max(np.abs(H.matvec(v) - A @ v)) <= 1e-10 * np.max(np.abs(ev)) * np.linalg.norm(v)
        assert abs(pycurv.sharpness(H, tol=1e-12, seed=0) - ev[-1]) <= 1e-10 * np.max(np.abs(ev))

        # plain optax.adam does not record b1, b2, eps: they are asked for
        plain = optax.adam(3e-3, b1=0.9, b2=0.99, eps=1e-6)
        pstate = plain.init(params)
        g = jax.grad(loss_fn)(params, batch)
        _, pstate = plain.update(g, pstate, params)
        with pytest.raises(ValueError, match="does not record Adam's b1; pass it"):
            pj.hessian(loss_fn, params, batch, preconditioner=pstate)
        Pd = pj.adam_preconditioner(pstate, b1=0.9, b2=0.99, eps=1e-6)
        H2 = pj.hessian(loss_fn, params, batch, preconditioner=Pd)
        assert H2.shape == H.shape and np.all(np.isfinite(H2.matvec(v)))


def test_hand_built_adam_state_and_no_step_error():
    with x64(True):
        from collections import namedtuple

        params, loss_fn, data = case("mlp-tanh-xent")
        State = namedtuple("State", "count mu nu")
        nu = jax.tree_util.tree_map(lambda a: jnp.full_like(a, 0.04), params)
        st = (State(jnp.asarray(0), nu, nu),)
        with pytest.raises(ValueError, match="count=0: the optimizer has taken no step yet"):
            pj.adam_preconditioner(st, b1=0.9, b2=0.999, eps=1e-8)
        st = (State(jnp.asarray(1), nu, nu),)
        P = pj.adam_preconditioner(st, b1=0.9, b2=0.999, eps=1e-8)
        expected = 0.1 * (np.sqrt(0.04 / 0.001) + 1e-8)
        np.testing.assert_allclose(np.asarray(P), expected, rtol=1e-12)
        with pytest.raises(TypeError, match="no Adam state"):
            pj.adam_preconditioner({"foo": 1})


def test_errors_name_the_value():
    with x64(True):
        params, loss_fn, data = case("mlp-tanh-xent")
        with pytest.raises(TypeError, match="one-shot iterator"):
            pj.hessian(loss_fn, params, (b for b in data))
        with pytest.raises(ValueError, match="data is empty"):
            pj.hessian(loss_fn, params, [])
        with pytest.raises(ValueError, match="reduction must be"):
            pj.hessian(loss_fn, params, data[0], reduction="avg")
        with pytest.raises(TypeError, match="not floating point"):
            pj.hessian(loss_fn, {"w": jnp.ones(3), "step": jnp.asarray(3)}, data[0])
        with pytest.raises(ValueError, match="dtype must be a floating-point dtype"):
            pj.hessian(loss_fn, params, data[0], dtype="int32")
        H = pj.hessian(lambda p, b: mlp(p, b[0], jnp.tanh).sum(0), params, data[0])
        with pytest.raises(TypeError, match="must return a scalar"):
            H.matvec(np.ones(H.shape[0]))
        with pytest.raises(ValueError, match="must have .* entries"):
            pj.hessian(loss_fn, params, data[0], preconditioner=np.ones(3))


def test_data_that_changes_between_passes_is_caught_by_the_probe():
    with x64(True):
        params, loss_fn, data = case("mlp-tanh-xent")
        x, y = data[0]

        class Augmented:
            """Re-iterable data with a new random perturbation on every pass."""

            def __init__(self):
                self.rng = np.random.default_rng(0)

            def __iter__(self):
                yield (x + 0.3 * jnp.asarray(self.rng.standard_normal(x.shape)), y)

        H = pj.hessian(loss_fn, params, Augmented())
        with pytest.raises(pycurv.NonDeterministicOperatorError, match="fix the PRNG key"):
            H.matvec(np.ones(H.shape[0]))


def test_linearised_products_cached_per_batch_match_dense_and_respect_the_budget():
    with x64():
        rng = np.random.default_rng(7)
        params = init_mlp(rng, [4, 6, 3], jnp.float64)
        data = [(_normal(rng, (n, 4), jnp.float64), jnp.asarray(rng.integers(0, 3, n))) for n in (8, 8, 8)]

        def loss_fn(p, batch):
            x, y = batch
            return xent(mlp(p, x, jnp.tanh), y)

        flat, unravel = ravel_pytree(params)
        D = np.asarray(jax.hessian(lambda f: sum(loss_fn(unravel(f), b) for b in data) / 3)(flat))
        H = pj.hessian(loss_fn, params, data)
        assert H.hvp_method == "linearized"
        v = rng.standard_normal(H.shape[0])
        for _ in range(2):
            assert np.linalg.norm(H.matvec(v) - D @ v) <= 1e-10 * np.linalg.norm(D @ v)
        assert H.cache_batches == 3 and H.cache_bytes > 0
        per_batch = H.cache_bytes // 3
        small = pj.hessian(loss_fn, params, data, cache=int(1.5 * per_batch))
        assert np.linalg.norm(small.matvec(v) - D @ v) <= 1e-10 * np.linalg.norm(D @ v)
        assert small.cache_batches == 1 and small.cache_bytes <= small.cache_budget
        off = pj.hessian(loss_fn, params, data, cache=False)
        assert off.hvp_method == "forward-over-reverse" and off.cache_batches == 0
        lam = pycurv.sharpness(H, tol=1e-10, seed=0)
        assert H.cache_batches == 0  # released when the solve ends
        assert lam == pytest.approx(np.linalg.eigvalsh(D)[-1], rel=1e-10)
        with pytest.raises(ValueError, match="hvp must be 'auto'"):
            pj.hessian(loss_fn, params, data, hvp="reverse")


def test_wrt_selects_parameters_like_torch_params():
    """wrt= restricts the Hessian to named leaves: the matching block of the dense Hessian, the rest held fixed."""
    with x64(True):
        params, loss_fn, data = case("mlp-tanh-xent")
        names = pj.leaf_names(params)
        assert names == ["0/b", "0/w", "1/b", "1/w"]
        D = dense(loss_fn, params, data)
        sizes = [int(np.size(a)) for a in jax.tree_util.tree_leaves(params)]
        starts = np.cumsum([0] + sizes)
        for wrt, chosen in (("1", [2, 3]), (["0/w"], [1]), (["1/w", "0/b"], [0, 3])):
            idx = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in chosen])
            block = D[np.ix_(idx, idx)]
            H = pj.hessian(loss_fn, params, data[0], wrt=wrt)
            assert H.shape == (idx.size, idx.size)
            v = np.random.default_rng(0).standard_normal(idx.size)
            assert np.max(np.abs(H.matvec(v) - block @ v)) <= 1e-10 * np.max(np.abs(block)) * np.linalg.norm(v)
            lam = pj.sharpness(loss_fn, params, data[0], wrt=wrt, tol=1e-10)
            assert abs(lam - np.linalg.eigvalsh(block)[-1]) <= 1e-8 * np.max(np.abs(block))
        with pytest.raises(ValueError, match="wrt names \\['nope'\\] match no parameter; the leaves are named '0/b'"):
            pj.hessian(loss_fn, params, data[0], wrt="nope")


def test_trace_and_density_of_a_jax_hessian():
    """pycurv.trace and pycurv.spectral_density take the JAX adapter: exact where the budget covers n."""
    with x64(True):
        params, loss_fn, data = case("mlp-tanh-xent")
        D = dense(loss_fn, params, data)
        ev = np.linalg.eigvalsh(D)
        H = pj.hessian(loss_fn, params, data[0])
        n = H.shape[0]
        exact = pycurv.trace(H, n_matvecs=n, seed=0)
        assert exact.method == "exact" and abs(exact.value - ev.sum()) <= 1e-10 * np.abs(ev).sum()
        est = pycurv.trace(H, n_matvecs=30, seed=1)
        assert est.n_matvecs == 30 and abs(est.value - ev.sum()) <= 4 * est.stderr
        sd = pycurv.spectral_density(H, n_probes=2, n_steps=n + 5, seed=0)
        assert sd.nodes.shape == (2, n + 5) and np.all(sd.n_nodes <= n)
        # Full Krylov spaces: the quadrature's nodes are eigenvalues, its moments exact.
        top = sd.nodes[np.arange(2), sd.n_nodes - 1]
        assert np.allclose(top, ev[-1], rtol=1e-8)
        assert np.allclose(sd.weights.sum(axis=1), 1.0, atol=1e-14)
