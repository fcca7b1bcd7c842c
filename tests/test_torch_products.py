"""Products at the cost of one backward pass: each batch's gradient graph cached for a solve.

References are independent of pycurv: dense Hessians by plain double backward
(torch_models.dense_hessian) in float64, and transformers models with their
eager attention against their default (sdpa) attention.
"""

from __future__ import annotations

import copy

import gc
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pycurv
import pycurv.torch as pt
import torch_models as tm


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("make,loss_fn,kind", [
    (tm.mlp_tanh, F.cross_entropy, "classification"),
    (tm.lnblock, F.cross_entropy, "classification6"),
    (tm.convnet, F.cross_entropy, "image"),
    (tm.bn_mlp, F.cross_entropy, "classification"),
    (tm.mlp_relu, F.mse_loss, "regression"),
])
def test_cached_products_match_the_dense_hessian(make, loss_fn, kind):
    model = make()
    if kind == "regression":
        batches = tm.regression_batches([9, 7])
    else:
        batches = tm.classification_batches([9, 7], d=6 if kind == "classification6" else 4, image=kind == "image")
    D = tm.dense_hessian(model, loss_fn, batches, mode="batch_stats")
    H = pt.hessian(model, loss_fn, batches)
    assert H.hvp_method == "cached reverse-over-reverse"
    rng = np.random.default_rng(0)
    for _ in range(3):  # the first builds the graphs (and the probe evaluates the losses again), the rest reuse them
        v = rng.standard_normal(H.shape[0])
        assert _rel(H.matvec(v), D @ v) <= 1e-10
    assert H.cache_batches == 2 and H.cache_bytes > 0
    assert H.n_hvps == 3 and H.last_probe == 0.0  # three products; the probe recomputed only the losses
    assert "cache=2 batches" in repr(H)


def test_cached_products_with_microbatches_preconditioner_params_l2_and_seeded_dropout():
    model = tm.dropout_mlp()
    batches = tm.classification_batches([10, 6])
    names = ["0.weight", "3.bias"]
    D = tm.dense_hessian(model, F.cross_entropy, batches)  # eval mode: dropout off
    idx = np.concatenate([np.arange(0, 48), np.arange(48 + 12 + 36, 48 + 12 + 36 + 3)])
    P = np.linspace(0.5, 2.0, idx.size)
    ref = (D[np.ix_(idx, idx)] + 0.3 * np.eye(idx.size)) / np.sqrt(np.outer(P, P))
    H = pt.hessian(model, F.cross_entropy, batches, microbatch_size=4, params=names, l2=0.3,
                   preconditioner=torch.tensor(P))
    v = np.random.default_rng(1).standard_normal(H.shape[0])
    assert _rel(H.matvec(v), ref @ v) <= 1e-10 and _rel(H.matvec(v), ref @ v) <= 1e-10
    assert H.cache_batches == 5  # 10 -> 4, 4, 2; 6 -> 4, 2
    # train mode with seeded masks: a fixed operator; the losses evaluated again agree with the cached ones
    Ht = pt.hessian(model, F.cross_entropy, batches, mode="train", seed=3)
    w = np.random.default_rng(2).standard_normal(Ht.shape[0])
    a = Ht.matvec(w)
    assert Ht.last_probe < 1e-12 and _rel(Ht.matvec(w), a) < 1e-14


def test_the_probe_compares_the_cache_with_a_recomputation():
    """Dropout without seed: the cached graph alone would repeat its masks; the probe recomputes and sees it."""
    model = tm.dropout_mlp()
    batch = tm.classification_batches([32])[0]
    H = pt.hessian(model, F.cross_entropy, batch, mode="train")
    with pytest.raises(pycurv.NonDeterministicOperatorError,
                       match="two evaluations of the loss at the same parameters differ by .* dropout is on"):
        H.matvec(np.ones(H.shape[0]))
    for cache in (False, None):  # recomputed graphs (and a budget of none) are probed the same way
        Hc = pt.hessian(model, F.cross_entropy, batch, mode="train", cache=cache)
        with pytest.raises(pycurv.NonDeterministicOperatorError, match="dropout is on"):
            Hc.matvec(np.ones(Hc.shape[0]))
    Hf = pt.hessian(model, F.cross_entropy, batch, mode="train", hvp="forward")  # no graph: products compared
    with pytest.raises(pycurv.NonDeterministicOperatorError, match="two Hessian-vector products .* dropout is on"):
        Hf.matvec(np.ones(Hf.shape[0]))


def test_cache_budget_bounds_what_is_held():
    model = tm.convnet()
    batches = tm.classification_batches([8, 8, 8, 8], image=True)
    full = pt.hessian(model, F.cross_entropy, batches)
    v = np.random.default_rng(3).standard_normal(full.shape[0])
    ref = full.matvec(v)
    per_batch = full.cache_bytes / 4
    assert full.cache_batches == 4
    budget = int(2.5 * per_batch)
    H = pt.hessian(model, F.cross_entropy, batches, cache=budget)
    assert _rel(H.matvec(v), ref) <= 1e-12 and _rel(H.matvec(v), ref) <= 1e-12
    assert H.cache_batches == 2 and H.cache_bytes <= budget == H.cache_budget
    off = pt.hessian(model, F.cross_entropy, batches, cache=False)
    assert off.hvp_method == "reverse-over-reverse" and _rel(off.matvec(v), ref) <= 1e-12
    assert off.cache_batches == 0 and off.cache_bytes == 0
    with pytest.raises(ValueError, match="cache must be True, False, None"):
        pt.hessian(model, F.cross_entropy, batches, cache=-1)


def test_the_solver_releases_the_cache_when_a_solve_ends():
    model = tm.convnet()
    batches = tm.classification_batches([8, 8], image=True)
    H = pt.hessian(model, F.cross_entropy, batches)
    H.matvec(np.ones(H.shape[0]))
    held = weakref.ref(H._cache[0].grads[0])
    lam = pycurv.sharpness(H, tol=1e-10, seed=0)
    assert H.cache_batches == 0 and H.cache_bytes == 0
    gc.collect()
    assert held() is None
    assert lam == pytest.approx(np.linalg.eigvalsh(tm.dense_hessian(model, F.cross_entropy, batches))[-1], rel=1e-10)
    assert H.matvec(np.ones(H.shape[0])).shape == (H.shape[0],) and H.cache_batches == 2  # rebuilt on demand


def test_tracker_operators_hold_no_graph_between_measurements(monkeypatch):
    model = tm.convnet()
    batches = tm.classification_batches([8, 8], image=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = pt.Tracker(model, F.cross_entropy, batches, opt, every=1, warn=False)
    refs = []
    orig = pt.operator._Linearised.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        refs.append(weakref.ref(self.grads[0]))  # the graph hangs off the gradient tensors

    monkeypatch.setattr(pt.operator._Linearised, "__init__", spy)
    for step in range(5):
        tr.step(step)
    gc.collect()
    assert len(refs) >= 10 and all(r() is None for r in refs)


def _gpt2(attn):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0,
                     eos_token_id=0, attn_implementation=attn)
    return GPT2LMHeadModel(cfg).double()


def _bert(attn):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     vocab_size=32, max_position_embeddings=16, num_labels=3, attn_implementation=attn)
    return BertForSequenceClassification(cfg).double()


class _Logits(nn.Module):
    """model(ids) -> logits, as a loss_fn(outputs, targets) expects."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


def _next_token_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("make,loss_fn,targets", [
    (_gpt2, _next_token_loss, "ids"),
    (_bert, F.cross_entropy, "labels"),
])
def test_transformers_with_default_attention_give_the_eager_lambda(make, loss_fn, targets):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32, (4, 8), generator=g)
    y = ids if targets == "ids" else torch.randint(0, 3, (4,), generator=g)
    default = make(None)
    assert default.config._attn_implementation == "sdpa"  # what users get
    lam = {}
    for name, model in (("sdpa", default), ("eager", make("eager"))):
        H = pt.hessian(_Logits(model), loss_fn, (ids, y))
        lam[name] = pycurv.sharpness(H, tol=1e-8, seed=0)
    assert lam["sdpa"] == pytest.approx(lam["eager"], rel=1e-8)


def test_an_operation_without_a_second_derivative_is_named():
    class FusedAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
            o = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]
            return self.out(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], 8).mean(1))

    torch.manual_seed(0)
    model = FusedAttention()
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    with pytest.raises(RuntimeError, match=r"the loss uses aten::_scaled_dot_product_flash_attention_for_cpu_backward, "
                                           r"which has no derivative .*attn_implementation='eager'"):
        pt.sharpness(model, F.cross_entropy, (x, y))


def test_the_core_leaves_torch_its_cores_during_a_solve():
    import os

    model = tm.mlp_tanh()
    batch = tm.classification_batches([16])[0]
    before = pycurv.build_info()["max_threads"]
    seen = []

    def watch(info):
        seen.append(pycurv.build_info()["max_threads"])

    H = pt.hessian(model, F.cross_entropy, batch)
    assert H.host_threads == torch.get_num_threads()
    pycurv.lanczos(H, 1, tol=1e-8, seed=0, callback=watch)
    expected = min(before, max(1, (os.cpu_count() or 1) - torch.get_num_threads() + 1))
    assert seen and set(seen) == {expected}
    assert pycurv.build_info()["max_threads"] == before
    torch.set_num_threads(2)  # with a worker of torch's on the other core, the core keeps to one
    try:
        seen.clear()
        pycurv.lanczos(pt.hessian(model, F.cross_entropy, batch), 1, tol=1e-8, seed=0, callback=watch)
        assert set(seen) == {min(before, max(1, (os.cpu_count() or 1) - 1))}
    finally:
        torch.set_num_threads(1)


def test_the_top_search_starts_from_the_gradient():
    """Without v0, pycurv.lanczos(which="LA") starts from H.default_start(seed): the loss gradient plus a
    random vector of equal norm, taken from the graphs the products then use; never for "SA" or a given v0."""
    model = tm.convnet()
    batches = tm.classification_batches([9, 7], image=True)
    D = tm.dense_hessian(model, F.cross_entropy, batches, mode="batch_stats")
    lam = np.linalg.eigvalsh(D)
    H = pt.hessian(model, F.cross_entropy, batches)
    ref = copy.deepcopy(model).train()  # batch statistics, as the operator's default (no dropout here)
    loss = sum(F.cross_entropy(ref(x), y) * len(y) for x, y in batches) / 16
    grads = torch.autograd.grad(loss, [dict(ref.named_parameters())[k] for k in H.layout.names])
    flat = torch.cat([t.reshape(-1) for t in grads]).double().numpy()
    start = H.default_start(5)
    assert H.cache_batches == 2  # built the graphs the first product uses
    u = flat / np.linalg.norm(flat)
    r = np.random.default_rng(5).standard_normal(H.shape[0])
    np.testing.assert_allclose(start - r / np.linalg.norm(r), u, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(start, H.default_start(5))  # the seed fixes it
    calls = []
    original = H.default_start
    H.default_start = lambda seed: calls.append(seed) or original(seed)
    top = pycurv.lanczos(H, 2, tol=1e-10, seed=5)
    np.testing.assert_allclose(top.eigenvalues, lam[::-1][:2], rtol=0, atol=1e-10 * abs(lam).max())
    bottom = pycurv.lanczos(H, 1, which="SA", tol=1e-10, seed=5)
    given = pycurv.lanczos(H, 1, tol=1e-10, v0=np.ones(H.shape[0]))
    assert calls == [5] and abs(bottom.eigenvalues[0] - lam[0]) <= 1e-10 * abs(lam).max()
    assert abs(given.eigenvalues[0] - lam[-1]) <= 1e-10 * abs(lam).max()
    # No graph kept, or a preconditioner: the random start.
    assert pt.hessian(model, F.cross_entropy, batches, hvp="forward").default_start(5) is None
    assert pt.hessian(model, F.cross_entropy, batches, preconditioner=torch.ones(H.shape[0])).default_start(5) is None
