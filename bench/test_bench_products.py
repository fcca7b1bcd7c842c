"""What one Hessian-vector product costs: pycurv's against the ways a user would write it, on real models.

torch, one intra-op thread, float32, in one process:

* ``pycurv``: ``pycurv.torch.hessian(...).matvec`` at its defaults (each batch's
  gradient graph built once, one backward per product);
* ``pycurv forward``: the same operator with ``hvp="forward"`` (forward-over-reverse
  through torch.func, pycurv's earlier default);
* ``double backward``: the plain recipe, loss and ``create_graph=True`` gradient
  recomputed in every product, then one more backward;
* ``cached double backward``: the gradient graph built once by hand, then one
  backward per product (what PyHessian does).

Steady state: the four are interleaved product by product on the same unit
vectors, their order rotated every round (a product that follows one which
freed a large graph pays for the allocator's page faults), medians of ROUNDS;
machine load hits them alike. All four differentiate the training loss
(batch statistics, dropout off) with attention on its math backend (the
hand-written recipes fail on the fused kernels otherwise). Whole solves: 30
products from scratch (graph building, the determinism probe and the Lanczos
core included for pycurv; graph building plus 30 backward passes for the
hand-written loop). Models: a ResNet-style convnet with BatchNorm (82k
parameters, 64 images 3x32x32) and a transformers GPT-2 from a config (2 layers,
n_embd 64, vocab 256; default attention), 8 x 32 tokens.

JAX, jitted, on the CPU: a linearised product (``jax.linearize`` per batch,
pycurv's default) against ``jvp(grad)`` recomputed per product, on an MLP (84k
parameters, 2,048 samples), a small convnet and a transformer block.

``pytest bench/test_bench_products.py --benchmark-json=products.json`` then
``python bench/summarize.py products.json``.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import pycurv  # noqa: E402
import pycurv.torch as pt  # noqa: E402

ROUNDS = int(os.environ.get("PYCURV_BENCH_ROUNDS", "15"))
SOLVE_PRODUCTS = 30


# ---------------------------------------------------------------------------
# torch models


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class ResNet(nn.Module):
    """stem, two residual blocks at 32 channels, one at 48 after a 1x1 projection, pooling, linear: 82k parameters."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.stage1 = nn.Sequential(_Block(32), _Block(32), nn.MaxPool2d(2))
        self.proj = nn.Conv2d(32, 48, 1, bias=False)
        self.stage2 = nn.Sequential(_Block(48), nn.MaxPool2d(2))
        self.fc = nn.Linear(48, classes)

    def forward(self, x):
        x = self.stage1(F.relu(self.bn(self.stem(x))))
        return self.fc(self.stage2(self.proj(x)).mean((2, 3)))


class Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


def next_token_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def resnet_problem():
    torch.manual_seed(0)
    model = ResNet()
    g = torch.Generator().manual_seed(1)
    return model, F.cross_entropy, (torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g))


def gpt2_problem():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = Logits(GPT2LMHeadModel(cfg))
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    return model, next_token_loss, (ids, ids)


PROBLEMS = {"resnet-bn": resnet_problem, "gpt2": gpt2_problem}


def training_loss_mode(model):
    """Batch statistics, dropout off: the function pycurv's default differentiates.

    Every module in eval mode but the normalisation layers (transformers apply
    attention dropout through functional calls guarded by the module's own flag).
    """
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.train()
    return model


class _HandWritten:
    """The recipes a user writes: recomputed double backward, and the cached graph (one backward per product)."""

    def __init__(self, model, loss_fn, data):
        self.model, self.loss_fn, (self.x, self.y) = model, loss_fn, data
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sizes = [p.numel() for p in self.params]
        self.graph = None

    def _grads(self):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            loss = self.loss_fn(self.model(self.x), self.y)
        return torch.autograd.grad(loss, self.params, create_graph=True)

    def _split(self, v):
        t = torch.as_tensor(v, dtype=torch.float32)
        return [piece.view_as(p) for piece, p in zip(torch.split(t, self.sizes), self.params)]

    def plain(self, v):
        out = torch.autograd.grad(self._grads(), self.params, grad_outputs=self._split(v))
        return torch.cat([o.reshape(-1) for o in out]).double().numpy()

    def build(self):
        self.graph = self._grads()

    def cached(self, v):
        out = torch.autograd.grad(self.graph, self.params, grad_outputs=self._split(v), retain_graph=True)
        return torch.cat([o.reshape(-1) for o in out]).double().numpy()


def _median_ms(ts):
    return 1e3 * statistics.median(ts)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_steady_state_products(benchmark, name):
    model, loss_fn, data = PROBLEMS[name]()
    training_loss_mode(model)  # the hand-written recipes differentiate the training loss, as pycurv's default does
    H = pt.hessian(model, loss_fn, data, check_determinism=False)
    Hf = pt.hessian(model, loss_fn, data, check_determinism=False, hvp="forward")
    hw = _HandWritten(model, loss_fn, data)
    hw.build()
    n = H.shape[0]
    rng = np.random.default_rng(0)
    warm = rng.standard_normal(n)
    H.matvec(warm)  # builds pycurv's graph; the comparison below is in steady state
    # The same product, up to float32: each within 1% of the float64 one (on the convnet at its
    # initialisation float32's own error is 1.5e-3 with torch's batch-norm kernel, 5e-4 with pycurv's).
    ref = pt.hessian(model, loss_fn, data, check_determinism=False, dtype="float64").matvec(warm)
    for f in (H.matvec, Hf.matvec, hw.plain, hw.cached):
        assert np.linalg.norm(f(warm) - ref) <= 1e-2 * np.linalg.norm(ref)
    ways = {"pycurv": H.matvec, "pycurv forward": Hf.matvec, "double backward": hw.plain,
            "cached double backward": hw.cached}
    times = {k: [] for k in ways}
    names = list(ways)
    for r in range(ROUNDS):
        v = rng.standard_normal(n)
        v /= np.linalg.norm(v)
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            ways[k](v)
            times[k].append(time.perf_counter() - t0)
    med = {k: _median_ms(t) for k, t in times.items()}
    benchmark.extra_info.update({"model": name, "n": n, "rounds": ROUNDS, "median_ms": med,
                                 "ratio_to_cached": med["pycurv"] / med["cached double backward"],
                                 "hvp_method": H.hvp_method, "cache_mib": H.cache_bytes / 2**20})
    benchmark.pedantic(H.matvec, args=(warm,), rounds=3, iterations=1)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_whole_solves(benchmark, name):
    """A solve from scratch against the hand-written cached loop with as many products.

    pycurv: building the operator (a copy of the parameters and of the module
    structure), the first product (which builds each batch's graph), the
    determinism probe (one product recomputed from scratch), the Lanczos core,
    up to SOLVE_PRODUCTS products; and the same solve with
    ``check_determinism=False``. The loop: building the graph, then the same
    number of backward passes. The three interleaved, their order rotated every
    round, after one solve that warms the allocator up; same process, one torch
    thread. Per product: pycurv's time outside the Lanczos core (the products,
    the graph building, the probe, the boundary) over its Lanczos products,
    against the loop's time over the same number.
    """
    model, loss_fn, data = PROBLEMS[name]()
    training_loss_mode(model)
    n = sum(p.numel() for p in model.parameters())
    v = np.random.default_rng(1).standard_normal(n)
    rows = []

    def pycurv_solve(check):
        t0 = time.perf_counter()
        H = pt.hessian(model, loss_fn, data, check_determinism=check)
        t_build = time.perf_counter() - t0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pycurv.ConvergenceWarning)
            res = pycurv.lanczos(H, 1, tol=1e-12, max_matvecs=SOLVE_PRODUCTS, seed=0)
        return time.perf_counter() - t0, t_build, res, H.n_hvps

    def loop(products):
        t0 = time.perf_counter()
        hw = _HandWritten(model, loss_fn, data)
        hw.build()
        for _ in range(products):
            hw.cached(v)
        return time.perf_counter() - t0

    products = pycurv_solve(True)[2].n_matvecs  # also warms the allocator up for all three
    for r in range(max(3, ROUNDS // 5)):
        # The order rotates every round: a run that follows one which freed a large graph gets its memory
        # without page faults.
        out = {}
        for k in (["probe", "no probe", "loop"] * 2)[r % 3: r % 3 + 3]:
            out[k] = loop(products) if k == "loop" else pycurv_solve(k == "probe")
        t_pc, t_build, res, hvps = out["probe"]
        t_np, _, res_np, _ = out["no probe"]
        rows.append((t_pc, out["loop"], t_build, float(res.time_core), int(res.n_matvecs), hvps,
                     t_pc - float(res.time_core), t_np - float(res_np.time_core)))
    t_pc, t_hw, t_build, t_core, matvecs, hvps, t_prod, t_prod_np = (statistics.median(c) for c in zip(*rows))
    benchmark.extra_info.update({"model": name, "pycurv_s": t_pc, "cached_loop_s": t_hw, "ratio": t_pc / t_hw,
                                 "build_s": t_build, "time_core_s": t_core, "lanczos_matvecs": matvecs,
                                 "pycurv_products": hvps, "per_product_ratio": t_prod / t_hw,
                                 "per_product_ratio_no_probe": t_prod_np / t_hw})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


# ---------------------------------------------------------------------------
# JAX: a linearised product against jvp(grad)


def _jax_problems():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(0)

    def normal(shape, scale):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    def xent(logits, y):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    mlp = {"w1": normal((64, 512), 1 / 8), "b1": jnp.zeros(512), "w2": normal((512, 96), 1 / 22),
           "b2": jnp.zeros(96), "w3": normal((96, 10), 0.1)}

    def mlp_loss(p, batch):
        x, y = batch
        h = jnp.tanh(jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"])
        return xent(h @ p["w3"], y)

    conv = {"k1": normal((16, 3, 3, 3), 0.2), "k2": normal((32, 16, 3, 3), 0.1), "fc": normal((32, 10), 0.1)}

    def conv_loss(p, batch):
        x, y = batch
        h = jax.nn.relu(jax.lax.conv_general_dilated(x, p["k1"], (1, 1), "SAME"))
        h = jax.nn.relu(jax.lax.conv_general_dilated(h, p["k2"], (2, 2), "SAME"))
        return xent(h.mean((2, 3)) @ p["fc"], y)

    d, heads = 64, 4
    block = {"ln": jnp.ones(d), "qkv": normal((d, 3 * d), 1 / 8), "o": normal((d, d), 1 / 8),
             "w1": normal((d, 4 * d), 1 / 8), "w2": normal((4 * d, d), 1 / 16), "emb": normal((128, d), 0.1)}

    def block_loss(p, batch):
        ids, _ = batch
        x = p["emb"][ids]
        h = x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-5) * p["ln"]
        q, k, v = jnp.split(h @ p["qkv"], 3, axis=-1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d // heads).transpose(0, 2, 1, 3)  # noqa: E731
        a = jax.nn.softmax(split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(d // heads)
                           + jnp.triu(jnp.full((ids.shape[1],) * 2, -1e9), 1), axis=-1) @ split(v)
        x = x + a.transpose(0, 2, 1, 3).reshape(x.shape) @ p["o"]
        x = x + jax.nn.gelu(x @ p["w1"]) @ p["w2"]
        logits = x @ p["emb"].T
        return xent(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))

    x = normal((2048, 64), 1.0)
    y = jnp.asarray(rng.integers(0, 10, 2048))
    imgs = normal((64, 3, 16, 16), 1.0)
    ids = jnp.asarray(rng.integers(0, 128, (16, 32)))
    return {"mlp-84k": (mlp_loss, mlp, (x, y)), "convnet": (conv_loss, conv, (imgs, y[:64])),
            "transformer-block": (block_loss, block, (ids, ids))}


@pytest.mark.parametrize("name", ["mlp-84k", "convnet", "transformer-block"])
def test_jax_linearised_against_jvp_of_grad(benchmark, name):
    import pycurv.jax as pj

    loss_fn, params, batch = _jax_problems()[name]
    lin = pj.hessian(loss_fn, params, batch, check_determinism=False)
    fwd = pj.hessian(loss_fn, params, batch, check_determinism=False, hvp="forward")
    n = lin.shape[0]
    rng = np.random.default_rng(0)
    warm = rng.standard_normal(n)
    a, b = lin.matvec(warm), fwd.matvec(warm)  # compile both, build the linearisation
    assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b)
    times = {"linearized": [], "jvp(grad)": []}
    for _ in range(ROUNDS):
        v = rng.standard_normal(n)
        for k, f in (("linearized", lin.matvec), ("jvp(grad)", fwd.matvec)):
            t0 = time.perf_counter()
            f(v)
            times[k].append(time.perf_counter() - t0)
    med = {k: _median_ms(t) for k, t in times.items()}
    benchmark.extra_info.update({"model": name, "n": n, "median_ms": med,
                                 "ratio": med["linearized"] / med["jvp(grad)"], "cache_mib": lin.cache_bytes / 2**20})
    benchmark.pedantic(lin.matvec, args=(warm,), rounds=3, iterations=1)
