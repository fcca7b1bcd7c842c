"""The noisy quadratic model (NQM) of Zhang et al. 2019: steps to a target loss versus batch size.

Model (Zhang et al. 2019, §3): the loss is L(θ) = ½ Σ_i h_i θ_i² in the Hessian's
eigenbasis, and a minibatch gradient of batch size B is g_i = h_i θ_i + ξ_i with
independent zero-mean noise of variance c_i / B (``noise`` holds c_i, the
per-example gradient variance along direction i; Zhang et al. take c_i = h_i).
The start has E[θ_i,0²] = ``init`` (1 by default) and a zero momentum buffer.

For SGD (θ ← θ − ηg) each direction's second moment follows

    E[θ_i²]_{t+1} = (1 − ηh_i)² E[θ_i²]_t + η² c_i / B,

and with PyTorch's momentum (b ← βb + (1 − d)g, θ ← θ − ηb, or Nesterov) the
second moments (E[θ²], E[θb], E[b²]) of each direction follow a 3×3 affine
recurrence S ← M S Mᵀ + (c_i/B) u uᵀ, M the iteration matrix of
:func:`pycurv.stability.iteration_matrix` and u = ∂(θ, b)_{t+1}/∂g. The expected
loss is E[L_t] = ½ Σ_i h_i E[θ_i²]_t; everything here is exact for the model (no
sampling).

Steps to a target loss count the first t with E[L_t] ≤ target; the best learning
rate for a batch size minimises those steps over a fixed log-spaced grid below
the largest stable learning rate (that of the top curvature). The critical batch
size is where the best steps are twice the large-batch minimum S_min (the
deterministic limit B → ∞), McCandlish et al.'s S = S_min(1 + B_crit/B) read at
B = B_crit. :func:`curvature_batch_scaling` reproduces Gilmer et al. 2022, §6: with
the same gradient noise, a model with higher curvature gains little from larger
batches, because its best learning rate sits at the stability limit 2/λ1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .._checks import as_real, check_lr
from .._memory import available_bytes, require_bytes
from .quadratic import _resolve, max_stable_lr

__all__ = [
    "NoisyQuadraticModel",
    "BatchScaling",
    "nqm_expected_loss",
    "nqm_steady_state_loss",
    "nqm_steps_to_target",
    "nqm_max_lr",
    "nqm_lr_grid",
    "nqm_best_lr",
    "nqm_batch_scaling",
    "nqm_critical_batch_size",
    "curvature_batch_scaling",
]


def _vector(name: str, values, n: Optional[int] = None, *, positive: bool = False) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if n is not None and arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if n is not None and arr.size != n:
        raise ValueError(f"{name} must have {n} entries (one per curvature), got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf")
    bad = arr <= 0 if positive else arr < 0
    if np.any(bad):
        rule = "> 0" if positive else ">= 0"
        i = int(np.argmax(bad))
        raise ValueError(f"{name} must be {rule}, got {name}[{i}]={float(arr[i])!r}")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class NoisyQuadraticModel:
    """An NQM: curvatures h_i > 0, per-example gradient noise c_i ≥ 0, start E[θ_i,0²].

    Construct with ``NoisyQuadraticModel(curvatures, noise=None, init=1.0)``;
    ``noise=None`` means c_i = h_i (Zhang et al.), a scalar ``init`` applies to every
    direction. :meth:`zhang` builds their spectrum h_i = top/i.
    """

    curvatures: np.ndarray
    noise: Optional[np.ndarray] = None
    init: object = 1.0

    def __post_init__(self):
        h = _vector("curvatures", self.curvatures, positive=True)
        c = h if self.noise is None else _vector("noise", self.noise, h.size)
        x0 = _vector("init", self.init, h.size)
        object.__setattr__(self, "curvatures", h)
        object.__setattr__(self, "noise", c)
        object.__setattr__(self, "init", x0)

    @classmethod
    def zhang(cls, dim: int = 100, *, top: float = 1.0, power: float = 1.0, noise_scale: float = 1.0,
              init: float = 1.0) -> "NoisyQuadraticModel":
        """h_i = top · i^(−power) for i = 1..dim, c_i = noise_scale · h_i (Zhang et al. 2019, §3.2)."""
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got dim={dim!r}")
        top, power = as_real("top", top), as_real("power", power)
        first = zhang_underflow(int(dim), top, power)
        if first is not None:
            raise ValueError(f"h_i = top·i^-power underflows to 0 from i = {first} on (top={top:g}, power={power:g}, "
                             f"dim={dim}): every curvature must be a positive float64; lower power or dim, or raise "
                             "top")
        i = np.arange(1, int(dim) + 1, dtype=np.float64)
        h = top * i ** (-power)
        return cls(h, as_real("noise_scale", noise_scale) * h, init)

    @property
    def dim(self) -> int:
        return int(self.curvatures.size)

    @property
    def sharpness(self) -> float:
        """λ1 = max h_i."""
        return float(self.curvatures.max())

    @property
    def initial_loss(self) -> float:
        """E[L_0] = ½ Σ h_i E[θ_i,0²]."""
        return 0.5 * float(self.curvatures @ self.init)

    def noise_scale(self) -> float:
        """B_simple = tr(Σ)/‖G‖² at the start, with Σ = diag(c) and E‖G‖² = Σ h_i² E[θ_i,0²]."""
        from .noise_scale import simple_noise_scale

        # In units of max h: h² overflows from h ~ 1e154 on, the ratio does not.
        top = float(self.curvatures.max())
        trace = float(self.noise.sum()) / top / top
        return simple_noise_scale(trace, float((self.curvatures / top) ** 2 @ self.init))

    def scaled(self, factor) -> "NoisyQuadraticModel":
        """The same model with every curvature multiplied by ``factor`` and the noise unchanged."""
        f = as_real("factor", factor)
        if f <= 0:
            raise ValueError(f"factor must be > 0, got factor={factor!r}")
        return NoisyQuadraticModel(self.curvatures * f, self.noise, self.init)


# --- the exact second-moment recursion ----------------------------------------------------------


class _RowsCache:
    """The scan's per-learning-rate tables, kept while they fit in a byte budget.

    Without a bound they grew with every learning rate of the grid (2 KiB per
    direction each): tens of GB at a million directions. The search visits the
    learning rates in the same order for every batch size, so past the budget
    a new table is used once and dropped rather than evicting an older one
    (least-recently-used eviction would miss on every visit of such a cycle).
    """

    def __init__(self, budget: int):
        self.budget = int(budget)
        self.entries: dict = {}
        self.bytes = 0

    def get(self, key: int):
        return self.entries.get(key)

    def put(self, key: int, entry: tuple) -> None:
        size = sum(a.nbytes for a in entry)
        if self.bytes + size <= self.budget:
            self.entries[key] = entry
            self.bytes += size


_SCAN_CACHE_BYTES = 256 << 20   # all learning rates' scan tables together
_SCAN_TABLE_BYTES = 32 << 20    # one learning rate's table: fewer steps per block for many directions
_SCAN_BLOCK = 256


def _scan_block(d: int, m: int) -> int:
    return int(max(8, min(_SCAN_BLOCK, _SCAN_TABLE_BYTES // (8 * d * m))))


def _grid_bytes(d: int, n_lrs: int, m: int) -> float:
    """Bytes a grid search over ``n_lrs`` learning rates holds at its peak, for d directions and m moments."""
    per_lr = 8.0 * d * (m * m + m)                              # K and the noise of each learning rate
    shared = 8.0 * d * (4 + m)                                  # h, c, init, ½h, the start moments
    work = 8.0 * d * (12 * m * m + 8)                           # temporaries while one is built and solved
    tables = min(_SCAN_CACHE_BYTES, n_lrs * 8.0 * d * m * (_scan_block(d, m) + m))
    return n_lrs * per_lr + shared + work + tables


def check_grid_memory(d: int, n_lrs: int, momentum: bool, what: str, fix: str) -> None:
    """MemoryError naming the bytes when a grid search would not fit in what this process may still take."""
    require_bytes(_grid_bytes(d, n_lrs, 3 if momentum else 1), what, fix)


def zhang_underflow(dim: int, top: float, power: float) -> Optional[int]:
    """The first i <= dim whose h_i = top·i^-power underflows to 0 (None if none does), without building h."""
    if top <= 0 or power <= 0 or top * float(dim) ** (-power) > 0:
        return None
    lo, hi = 1, dim  # h_lo > 0 or lo = 1; h_hi == 0; h decreases with i
    if top * 1.0 == 0:
        return 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if top * float(mid) ** (-power) > 0:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class _Dynamics:
    """Per-direction affine recurrence s ← K s + n of the second moments (m = 1 or 3 moments)."""

    k: np.ndarray        # (d, m, m)
    noise: np.ndarray    # (d, m): n for batch size 1 (divide by B)
    weights: np.ndarray  # (d,): ½ h_i, E[L] = Σ weights · s[:, 0]
    s0: np.ndarray       # (d, m), read-only (shared by every learning rate of a grid)
    stable: bool         # every direction's iteration matrix has ρ < 1
    cache: dict = field(default_factory=dict, compare=False, hash=False)
    tables: Optional[_RowsCache] = field(default=None, compare=False, hash=False)  # the grid's, if any

    @property
    def m(self) -> int:
        return self.k.shape[1]


def _shared(model: NoisyQuadraticModel, m: int) -> tuple:
    """½h and the start moments: the same for every learning rate, built once per grid."""
    d = model.curvatures.size
    if m == 1:
        s0 = model.init.reshape(d, 1)
    else:
        s0 = np.zeros((d, 3))
        s0[:, 0] = model.init
        s0.setflags(write=False)
    weights = 0.5 * model.curvatures
    weights.setflags(write=False)
    return weights, s0


def _dynamics(model: NoisyQuadraticModel, lr: float, hp: dict, shared: Optional[tuple] = None,
              tables: Optional[_RowsCache] = None) -> _Dynamics:
    h, c = model.curvatures, model.noise
    d = h.size
    beta = hp["momentum"]
    ell = h + hp["weight_decay"]
    weights, s0 = shared if shared is not None else _shared(model, 1 if beta == 0.0 else 3)
    if beta == 0.0:
        r = (1.0 - lr * ell) ** 2
        k = r.reshape(d, 1, 1)
        with np.errstate(over="ignore"):  # an overflowing noise is a target out of reach, judged by _steps
            noise = ((lr * lr) * c).reshape(d, 1)
        stable = bool(np.all(np.abs(1.0 - lr * ell) < 1.0))
        return _Dynamics(k, noise, weights, s0, stable, tables=tables)
    if hp["nesterov"]:
        p, q, rr, w = 1.0 - lr * (1.0 + beta) * ell, -lr * beta * beta, ell, beta
        u1, u2 = -lr * (1.0 + beta), 1.0
    else:
        s = 1.0 - hp["dampening"]
        p, q, rr, w = 1.0 - lr * s * ell, -lr * beta, s * ell, beta
        u1, u2 = -lr * s, s
    q = np.broadcast_to(q, d)
    w = np.broadcast_to(w, d)
    # S' = M S Mᵀ on (S11, S12, S22) for M = [[p, q], [r, w]].
    k = np.stack([
        np.stack([p * p, 2 * p * q, q * q], axis=-1),
        np.stack([p * rr, p * w + q * rr, q * w], axis=-1),
        np.stack([rr * rr, 2 * rr * w, w * w], axis=-1),
    ], axis=1)
    with np.errstate(over="ignore"):
        noise = np.outer(c, [u1 * u1, u1 * u2, u2 * u2])
    mats = np.empty((d, 2, 2))
    mats[:, 0, 0], mats[:, 0, 1], mats[:, 1, 0], mats[:, 1, 1] = p, q, rr, w
    stable = bool(np.all(np.max(np.abs(np.linalg.eigvals(mats)), axis=1) < 1.0))
    return _Dynamics(k, noise, weights, s0, stable, tables=tables)


def _steady(dyn: _Dynamics, batch_size: float) -> np.ndarray:
    if math.isinf(batch_size):  # no noise (and no inf / inf where the noise overflowed)
        return np.zeros_like(dyn.noise)
    n = dyn.noise / batch_size
    if dyn.m == 1:
        return n / (1.0 - dyn.k[:, :, 0])
    eye = np.eye(dyn.m)
    return np.linalg.solve(eye - dyn.k, n[..., None])[..., 0]


def _hp(kw) -> dict:
    _, hp = _resolve("sgd", kw)
    return hp


def _check_batch(batch_size) -> float:
    if batch_size is None:
        return math.inf
    b = as_real("batch_size", batch_size)
    if b <= 0:
        raise ValueError(f"batch_size must be > 0, got batch_size={batch_size!r}")
    return b


def nqm_expected_loss(model: NoisyQuadraticModel, lr, batch_size, steps: int, **sgd_hyperparameters) -> np.ndarray:
    """E[L_t] for t = 0, 1, ..., steps (exact for the model), as an array of steps + 1 values.

    ``batch_size=None`` (or ``math.inf``) is noise-free gradient descent.
    ``sgd_hyperparameters``: ``momentum``, ``dampening``, ``nesterov``, ``weight_decay``.
    """
    lr = check_lr(lr)
    b = _check_batch(batch_size)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got steps={steps!r}")
    dyn = _dynamics(model, lr, _hp(sgd_hyperparameters))
    s = dyn.s0.copy()
    n = dyn.noise / b
    out = np.empty(int(steps) + 1)
    out[0] = dyn.weights @ s[:, 0]
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(1, int(steps) + 1):
            s = np.einsum("dij,dj->di", dyn.k, s) + n
            out[t] = dyn.weights @ s[:, 0]
    return out


def nqm_steady_state_loss(model: NoisyQuadraticModel, lr, batch_size, **sgd_hyperparameters) -> float:
    """E[L_∞] = ½ Σ h_i E[θ_i²]_∞ (``math.inf`` when some direction is unstable).

    For SGD E[θ_i²]_∞ = η c_i / (B h_i (2 − η h_i)).
    """
    lr = check_lr(lr)
    b = _check_batch(batch_size)
    dyn = _dynamics(model, lr, _hp(sgd_hyperparameters))
    if not dyn.stable:
        return math.inf
    return float(dyn.weights @ _steady(dyn, b)[:, 0])


def _steps(dyn: _Dynamics, batch_size: float, target: float, max_steps: int) -> float:
    """First t with E[L_t] <= target, or inf (unstable, target at or below E[L_∞], > max_steps)."""
    s0 = dyn.s0
    if dyn.weights @ s0[:, 0] <= target:
        return 0.0
    if not dyn.stable:
        return math.inf
    with np.errstate(over="ignore", invalid="ignore"):  # a steady state beyond float64 is out of reach
        s_inf = _steady(dyn, batch_size)
        l_inf = float(dyn.weights @ s_inf[:, 0])
    if not l_inf < target:
        return math.inf
    dev = s0 - s_inf
    if dyn.m == 1:
        r = dyn.k[:, 0, 0]
        w = dyn.weights * dev[:, 0]
        if np.all(w >= 0):
            # Every term decays monotonically: E[L_t] is non-increasing, bisect on t.
            def loss(t: int) -> float:
                return l_inf + float(w @ np.power(r, float(t)))

            hi = 1
            while loss(hi) > target:
                hi *= 2
                if hi > 2 * max_steps:
                    return math.inf
            lo = hi // 2  # loss(lo) > target (lo = 0 checked above)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if loss(mid) <= target:
                    hi = mid
                else:
                    lo = mid
            return float(hi) if hi <= max_steps else math.inf
    return _scan(dyn, dev, l_inf, target, max_steps)


def _scan(dyn: _Dynamics, dev: np.ndarray, l_inf: float, target: float, max_steps: int) -> float:
    """First hit by blocks: E[L_{t0+j}] − E[L_∞] = Σ_i ½h_i [K_i^j dev_i(t0)]_0 for j < T."""
    d, m = dev.shape
    block = _scan_block(d, m)
    entry = dyn.tables.get(id(dyn)) if dyn.tables is not None else dyn.cache.get("rows")
    if entry is None:
        # Depends on η only (not on B): built once per learning rate (while the grid's budget keeps it).
        rows = np.empty((block, d, m))   # rows[j] = first row of K^j, per direction
        row = np.zeros((d, m))
        row[:, 0] = 1.0
        for j in range(block):
            rows[j] = row
            row = np.einsum("di,dij->dj", row, dyn.k)
        rows *= dyn.weights[None, :, None]
        entry = (rows, np.linalg.matrix_power(dyn.k, block))
        if dyn.tables is not None:
            dyn.tables.put(id(dyn), entry)
        else:
            dyn.cache["rows"] = entry
    rows, jump = entry
    t0 = 0
    while t0 <= max_steps:
        losses = l_inf + np.einsum("tdm,dm->t", rows, dev)
        hit = np.flatnonzero(losses <= target)
        if hit.size:
            t = t0 + int(hit[0])
            return float(t) if t <= max_steps else math.inf
        dev = np.einsum("dij,dj->di", jump, dev)
        t0 += block
    return math.inf


def nqm_steps_to_target(model: NoisyQuadraticModel, lr, batch_size, target, *, max_steps: int = 10**8,
                        **sgd_hyperparameters) -> float:
    """Smallest t with E[L_t] ≤ ``target`` (a float; ``math.inf`` when never).

    Never: the learning rate is unstable for some direction, the target is at or
    below the steady-state loss E[L_∞] (a dip below it on the way to a higher
    steady state is not counted), or more than ``max_steps`` steps are needed.
    """
    lr = check_lr(lr)
    b = _check_batch(batch_size)
    target = as_real("target", target)
    dyn = _dynamics(model, lr, _hp(sgd_hyperparameters))
    return _steps(dyn, b, target, int(max_steps))


def nqm_max_lr(model: NoisyQuadraticModel, **sgd_hyperparameters) -> float:
    """Largest stable learning rate of the noise-free model: that of its top curvature (2/λ1 for SGD)."""
    hp = _hp(sgd_hyperparameters)
    return max_stable_lr("sgd", model.sharpness, **hp)


def nqm_lr_grid(model: NoisyQuadraticModel, n: int = 80, *, decades: float = 4.0,
                **sgd_hyperparameters) -> np.ndarray:
    """The default learning rates searched: ``n`` log-spaced values from η_max·10^−decades to 0.999·η_max."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got n={n!r}")
    top = nqm_max_lr(model, **sgd_hyperparameters)
    return top * np.geomspace(10.0 ** (-as_real("decades", decades)), 0.999, int(n))


def _best(dyns, lrs, b, target, max_steps) -> tuple[float, float]:
    best_lr, best_steps = math.nan, math.inf
    # Largest learning rate first; each search stops once it cannot beat the best so far
    # (a tie goes to the smaller learning rate).
    for i in np.argsort(lrs)[::-1]:
        cap = max_steps if math.isinf(best_steps) else int(best_steps)
        s = _steps(dyns[i], b, target, cap)
        if math.isfinite(s) and s <= best_steps:
            best_lr, best_steps = float(lrs[i]), s
    return best_lr, best_steps


def _grid(model, lrs, hp) -> tuple[np.ndarray, list]:
    if lrs is None:
        lrs = nqm_lr_grid(model, **hp)
    lrs = np.asarray([check_lr(x) for x in np.atleast_1d(lrs)], dtype=np.float64)
    m = 1 if hp["momentum"] == 0.0 else 3
    check_grid_memory(model.dim, lrs.size, m == 3,
                      f"the noisy quadratic model's search over {lrs.size} learning rates for {model.dim} directions",
                      "use fewer directions or learning rates")
    room = available_bytes()
    tables = _RowsCache(_SCAN_CACHE_BYTES if room is None else min(_SCAN_CACHE_BYTES, room // 4))
    shared = _shared(model, m)
    return lrs, [_dynamics(model, float(lr), hp, shared, tables) for lr in lrs]


def nqm_best_lr(model: NoisyQuadraticModel, batch_size, target, *, lrs: Optional[Sequence[float]] = None,
                max_steps: int = 10**8, **sgd_hyperparameters) -> tuple[float, float]:
    """(best learning rate, its steps to ``target``) over ``lrs`` (default :func:`nqm_lr_grid`).

    Ties go to the smaller learning rate; (nan, inf) when no learning rate reaches the target.
    """
    hp = _hp(sgd_hyperparameters)
    lrs, dyns = _grid(model, lrs, hp)
    return _best(dyns, lrs, _check_batch(batch_size), as_real("target", target), int(max_steps))


@dataclass(frozen=True)
class BatchScaling:
    """Steps to a target loss against batch size, each batch size at its best learning rate.

    Attributes
    ----------
    batch_sizes, best_lr, steps : ndarray
        One entry per batch size; ``steps`` is ``inf`` where the target is out of reach.
    max_stable_lr : float
        The stability limit of the learning rate (top curvature), the top of the search grid.
    target : float
        Target expected loss.
    min_steps : float
        S_min: best steps without gradient noise (B → ∞).
    critical_batch_size : float
        Batch size with best steps = 2·S_min (``nan`` if not computed).
    """

    batch_sizes: np.ndarray
    best_lr: np.ndarray
    steps: np.ndarray
    max_stable_lr: float
    target: float
    min_steps: float
    critical_batch_size: float = math.nan
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def speedup(self) -> np.ndarray:
        """steps at the smallest batch size / steps (nan where both are inf)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.steps[0] / self.steps

    @property
    def lr_fraction(self) -> np.ndarray:
        """best_lr / max_stable_lr: near 1 means the learning rate is held back by stability."""
        return self.best_lr / self.max_stable_lr


def _critical(dyns, lrs, target, s_min, max_steps) -> float:
    if not math.isfinite(s_min):
        return math.nan
    goal = 2.0 * s_min

    def ok(b: float) -> bool:
        return _best(dyns, lrs, b, target, max_steps)[1] <= goal

    hi = 1.0
    if ok(hi):
        lo = hi
        while ok(lo):
            lo /= 2.0
            if lo < 1e-9:
                return lo
        hi = 2.0 * lo
    else:
        lo = hi
        while not ok(hi):
            lo, hi = hi, 2.0 * hi
            if hi > 1e15:
                return math.inf
    # lo fails, hi passes: bisect in log B to 0.1 %.
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def nqm_critical_batch_size(model: NoisyQuadraticModel, target, *, lrs: Optional[Sequence[float]] = None,
                            max_steps: int = 10**8, **sgd_hyperparameters) -> float:
    """Batch size (real, to 0.1 %) at which the best steps to ``target`` are 2·S_min.

    S_min is the best without noise. On a fixed learning-rate grid the best steps
    never increase with B (less noise lowers every E[θ_i²]_t), so bisection applies.
    """
    hp = _hp(sgd_hyperparameters)
    lrs, dyns = _grid(model, lrs, hp)
    target = as_real("target", target)
    s_min = _best(dyns, lrs, math.inf, target, int(max_steps))[1]
    return _critical(dyns, lrs, target, s_min, int(max_steps))


def nqm_batch_scaling(model: NoisyQuadraticModel, batch_sizes: Sequence[float], target, *,
                      lrs: Optional[Sequence[float]] = None, critical: bool = True,
                      max_steps: int = 10**8, **sgd_hyperparameters) -> BatchScaling:
    """Best learning rate and steps to ``target`` for each batch size (one learning-rate grid for all)."""
    hp = _hp(sgd_hyperparameters)
    lrs, dyns = _grid(model, lrs, hp)
    target = as_real("target", target)
    sizes = np.asarray([_check_batch(b) for b in np.atleast_1d(batch_sizes)], dtype=np.float64)
    best_lr = np.empty(sizes.size)
    steps = np.empty(sizes.size)
    for i, b in enumerate(sizes):
        best_lr[i], steps[i] = _best(dyns, lrs, float(b), target, int(max_steps))
    s_min = _best(dyns, lrs, math.inf, target, int(max_steps))[1]
    b_crit = _critical(dyns, lrs, target, s_min, int(max_steps)) if critical else math.nan
    return BatchScaling(batch_sizes=sizes, best_lr=best_lr, steps=steps,
                        max_stable_lr=nqm_max_lr(model, **hp), target=target, min_steps=s_min,
                        critical_batch_size=b_crit)


def curvature_batch_scaling(model: NoisyQuadraticModel, scales: Sequence[float] = (1.0, 10.0, 100.0),
                            batch_sizes: Sequence[float] = tuple(2.0 ** np.arange(0, 13)), *,
                            target_fraction: float = 0.01, critical: bool = True,
                            **sgd_hyperparameters) -> dict:
    """Gilmer et al. 2022, §6 in the NQM: higher curvature, same noise, less gain from larger batches.

    Each entry of ``scales`` multiplies every curvature of ``model`` (noise and start
    unchanged); the target is ``target_fraction`` of each scaled model's initial loss.
    Returns {scale: BatchScaling}. In this model scaling the curvature by s is
    exactly scaling the batch size by s² (substitute η → η/s), so a high-curvature
    model is already far along the curve: its steps barely fall with B and its best
    learning rate sits at the stability limit 2/λ1 (``lr_fraction`` near 1),
    while the low-curvature model's best learning rate grows with B.
    """
    frac = as_real("target_fraction", target_fraction)
    if not 0 < frac < 1:
        raise ValueError(f"target_fraction must satisfy 0 < target_fraction < 1, got target_fraction={frac!r}")
    out = {}
    for s in scales:
        m = model.scaled(s)
        out[float(s)] = nqm_batch_scaling(m, batch_sizes, frac * m.initial_loss, critical=critical,
                                          **sgd_hyperparameters)
    return out
