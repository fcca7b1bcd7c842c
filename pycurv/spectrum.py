"""The wider spectrum from products alone: the trace and the spectral density.

:func:`trace` estimates ``tr(A)`` with Hutchinson's estimator or Hutch++
(Meyer, Musco, Musco & Woodruff, SOSA 2021) and an honest standard error.
:func:`spectral_density` is stochastic Lanczos quadrature (SLQ; Ubaru, Chen &
Saad, SIMAX 38, 2017; Ghorbani, Krishnan & Xiao, ICML 2019): for each random
probe, a fixed number of Lanczos steps in the compiled core (float64 basis,
full reorthogonalisation, no restarts) gives the Gauss quadrature of the
probe's spectral measure, and the average over probes estimates the spectral
density ``(1/n) sum_i delta(t - lambda_i)``.

Both accept every operator :func:`pycurv.lanczos` accepts. For an operator on
a GPU the products run there; the probes and (for the density) the Krylov
basis are float64 host arrays, copied to the device and back once per product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from . import _checks, _gpu
from ._drive import nonfinite_error
from ._native import DONE, MATVEC, core
from .operators import as_operator

__all__ = ["trace", "spectral_density", "TraceEstimate", "SpectralDensity"]

_METHODS = ("hutchinson", "hutch++")
_BLOCK = 1024  # grid points evaluated at once by density() and cdf()


@dataclass(frozen=True)
class TraceEstimate:
    """Outcome of :func:`pycurv.trace`.

    Attributes
    ----------
    value : float
        The estimate of ``tr(A)``.
    stderr : float
        Its standard error, estimated from the same products: the sample
        standard deviation of the probes' quadratic forms over the square
        root of their number (for Hutch++, of the probes of the residual
        ``(I - QQ^T) A (I - QQ^T)``; the sketch's part ``tr(Q^T A Q)`` is exact
        given the sketch). 0 when the trace was computed exactly
        (``n_matvecs >= n``). An estimate itself: over repeated seeds it
        matches the spread of ``value`` on average, and ``value`` lies within
        3 of them of the truth in at least 95% of seeds (tested).
    n_matvecs : int
        Products with A used.
    method : str
        ``"hutchinson"``, ``"hutch++"``, or ``"exact"`` (n unit vectors, when
        the budget reached the dimension).
    n_samples : int
        Random probes whose quadratic forms were averaged (the residual's for
        Hutch++); 0 for ``"exact"``.
    seed : int
        Seed of the probes (drawn from OS entropy if none was given).
    """

    value: float
    stderr: float
    n_matvecs: int
    method: str
    n_samples: int
    seed: int


@dataclass(frozen=True, eq=False)
class SpectralDensity:
    """Outcome of :func:`pycurv.spectral_density`: one Gauss quadrature per probe.

    Each probe ``v`` (a normalised Rademacher vector) defines the measure
    ``mu_v = sum_i (u_i^T v)^2 delta(t - lambda_i)`` whose expectation over
    probes is the spectral density ``(1/n) sum_i delta(t - lambda_i)``.
    Lanczos from ``v`` gives its Gauss quadrature: the nodes are the Ritz
    values, the weights the squared first components of the tridiagonal
    matrix's eigenvectors.

    Attributes
    ----------
    nodes : (n_probes, n_steps) float64
        Ritz values of each probe, ascending within the first ``n_nodes[p]``
        entries of row p.
    weights : (n_probes, n_steps) float64
        Quadrature weights; each row sums to 1. When a probe's Krylov space is
        exhausted before ``n_steps`` (``n < n_steps``, or a probe that touches
        fewer than ``n_steps`` distinct eigenvalues) its quadrature has only
        ``n_nodes[p]`` nodes, and exact ones: the row is padded with zero
        weights at the largest node, so the arrays keep their shape.
    n_nodes : (n_probes,) int
        Lanczos steps run for each probe (nodes with their own weight).
    n_matvecs : int
        Products with A used (the sum of ``n_nodes``).
    seed : int
        Seed of the probes (drawn from OS entropy if none was given).
    """

    nodes: np.ndarray
    weights: np.ndarray
    n_nodes: np.ndarray
    n_matvecs: int
    seed: int

    def density(self, grid, sigma: float) -> np.ndarray:
        """The density smoothed by a Gaussian of standard deviation ``sigma``, at the points ``grid``.

        ``mean_p sum_k w_pk N(t; theta_pk, sigma^2)``: a probability density,
        integrating to 1 over the real line (choose ``grid`` wide enough, a few
        ``sigma`` beyond the extreme nodes, to see all of it). ``sigma`` is in
        the units of the eigenvalues; a few times the spacing of the nodes in
        the bulk smooths the quadrature's spikes into the density's shape.
        """
        sigma = _checks.check_positive("sigma", sigma)
        t = _grid(grid)
        th, w = self.nodes.reshape(-1), self.weights.reshape(-1)
        out = np.empty(t.size)
        for lo in range(0, t.size, _BLOCK):  # bounded memory: a block of the grid against every node
            z = (t[lo:lo + _BLOCK, None] - th[None, :]) / sigma
            out[lo:lo + _BLOCK] = np.exp(-0.5 * z * z) @ w
        return out / (sigma * math.sqrt(2.0 * math.pi) * self.nodes.shape[0])

    def cdf(self, grid, sigma: Optional[float] = None) -> np.ndarray:
        """The estimated spectral distribution function (the fraction of eigenvalues <= t) at the points ``grid``.

        ``sigma=None``: the quadrature's own step function, ``mean_p sum_k
        w_pk [theta_pk <= t]``. By the Chebyshev-Markov-Stieltjes inequalities
        its error at any t is at most the weight of the node nearest t (plus
        the probes' sampling error): exact where the spectrum has atoms or
        isolated eigenvalues (repeated and outlying eigenvalues get nodes of
        their own), coarse inside a narrow continuous cluster that only a few
        nodes cover. ``sigma`` > 0: the distribution function of
        :meth:`density` with that ``sigma``, which spreads each node's weight
        over its neighbourhood and follows such clusters better.
        """
        t = _grid(grid)
        th, w = self.nodes.reshape(-1)[None, :], self.weights.reshape(-1)
        if sigma is not None:
            sigma = _checks.check_positive("sigma", sigma)
        out = np.empty(t.size)
        for lo in range(0, t.size, _BLOCK):
            u = t[lo:lo + _BLOCK, None]
            step = (th <= u).astype(np.float64) if sigma is None else 0.5 * _erfc((th - u) / (sigma * math.sqrt(2.0)))
            out[lo:lo + _BLOCK] = step @ w
        return out / self.nodes.shape[0]

    def __repr__(self) -> str:
        return (f"SpectralDensity(n_probes={self.nodes.shape[0]}, n_steps={self.nodes.shape[1]}, "
                f"range=[{float(self.nodes.min()):.6g}, {float(self.nodes.max()):.6g}], n_matvecs={self.n_matvecs})")


def trace(A, *, n_matvecs: int = 100, method: str = "hutch++", seed=None, n: Optional[int] = None) -> TraceEstimate:
    """Estimate ``tr(A)`` of a symmetric operator from ``n_matvecs`` products.

    Parameters
    ----------
    A : array, sparse matrix, LinearOperator, pycurv operator, or callable
        Anything :func:`pycurv.lanczos` accepts, including the torch and JAX
        adapters' Hessians (a callable needs ``n=``).
    n_matvecs : int
        Budget of products. When it reaches the dimension n, the trace is
        computed exactly from the n unit vectors instead (``method="exact"``,
        ``stderr=0``, n products).
    method : {"hutch++", "hutchinson"}
        ``"hutchinson"``: the mean of ``z^T A z`` over ``n_matvecs``
        Rademacher vectors z (needs at least 2). ``"hutch++"`` (Meyer et al.
        2021, Alg. 1): a third of the budget sketches the range, ``Q =
        orth(A S)``; a third gives ``tr(Q^T A Q)`` exactly; the rest runs
        Hutchinson on the deflated ``(I - QQ^T) A (I - QQ^T)`` (needs at least 4;
        holds the n_matvecs/3 sketch vectors, ``8 n n_matvecs / 3`` bytes, on
        the host, orthonormalised by NumPy's QR).
        Its error falls like 1/m instead of 1/sqrt(m) when a few eigenvalues
        dominate, as in the Hessians of trained networks; where none do and the
        budget is small, the two thirds not spent on samples cost more than the
        deflation saves, and Hutchinson is better (bench/RESULTS.md: 30
        products on a small MLP, relative errors 0.34 against 0.60; at 300,
        Hutch++ 0.031 against 0.105).
    seed : int or numpy.random.Generator, optional
        Seed of the probes; the same seed gives the same estimate.
    n : int, optional
        Dimension, required when ``A`` is a plain callable.

    Returns
    -------
    TraceEstimate
        ``value``, ``stderr`` (see :class:`TraceEstimate`), ``n_matvecs``.
    """
    op = as_operator(A, n=n)
    dim = op.shape[0]
    if method not in _METHODS:
        raise ValueError(f"method must be 'hutch++' or 'hutchinson', got method={method!r}")
    budget = _checks.check_int("n_matvecs", n_matvecs)
    least = 4 if method == "hutch++" else 2
    if budget < least and budget < dim:
        raise ValueError(f"n_matvecs must be at least {least} for method={method!r} (a standard error needs two "
                         f"probes), got n_matvecs={budget}")
    seed = _checks.check_seed(seed)
    rng = np.random.default_rng(seed)
    mv = _host_matvec(op)
    try:
        if budget >= dim:
            total = 0.0
            e = np.zeros(dim)
            for i in range(dim):
                e[i] = 1.0
                total += float(mv(e)[i])
                e[i] = 0.0
            return TraceEstimate(total, 0.0, dim, "exact", 0, seed)
        if method == "hutchinson":
            samples = np.empty(budget)
            for i in range(budget):
                z = _rademacher(rng, dim)
                samples[i] = z @ mv(z)
            return _estimate(0.0, samples, budget, method, seed)
        s = budget // 3
        g = budget - 2 * s
        sketch = np.empty((dim, s))
        for i in range(s):
            sketch[:, i] = mv(_rademacher(rng, dim))
        q, _ = np.linalg.qr(sketch)
        low = 0.0
        for i in range(s):
            low += float(q[:, i] @ mv(np.ascontiguousarray(q[:, i])))
        samples = np.empty(g)
        for i in range(g):
            z = _rademacher(rng, dim)
            z -= q @ (q.T @ z)
            samples[i] = z @ mv(z)
        return _estimate(low, samples, budget, method, seed)
    finally:
        _release(op)


def spectral_density(A, *, n_probes: int = 10, n_steps: int = 80, seed=None,
                     n: Optional[int] = None) -> SpectralDensity:
    """The spectral density of a symmetric operator by stochastic Lanczos quadrature.

    For each of ``n_probes`` normalised Rademacher vectors, ``n_steps``
    Lanczos steps run in the compiled core (float64 basis, full
    reorthogonalisation by classical Gram-Schmidt twice, a fixed number of
    steps without restarts); the eigen-decomposition of the tridiagonal
    matrix gives that probe's Gauss quadrature (Golub & Meurant; SLQ as in
    Ghorbani et al. 2019, who use it for neural-network Hessians). A quadrature
    with m nodes integrates polynomials of degree 2m - 1 exactly, so the
    estimate's moments up to that degree are unbiased.

    Parameters
    ----------
    A : array, sparse matrix, LinearOperator, pycurv operator, or callable
        Anything :func:`pycurv.lanczos` accepts (a callable needs ``n=``).
    n_probes : int
        Random probes; the sampling error of the distribution function falls
        like ``1 / sqrt(n_probes * n)``.
    n_steps : int
        Lanczos steps (products) per probe, the nodes of each quadrature.
        Memory: ``8 n (n_steps + 1)`` bytes for one probe's basis. Where a
        probe's Krylov space is exhausted earlier (always when ``n_steps >=
        n``) the quadrature is exact with fewer nodes, and its row is padded
        with zero weights (see :class:`SpectralDensity`).
    seed : int or numpy.random.Generator, optional
        Seed of the probes; the same seed gives bit-identical nodes on the CPU.
    n : int, optional
        Dimension, required when ``A`` is a plain callable.

    Returns
    -------
    SpectralDensity
        ``nodes`` and ``weights`` of shape ``(n_probes, n_steps)``,
        ``n_matvecs``, and ``density(grid, sigma)`` and ``cdf(grid)``.
    """
    op = as_operator(A, n=n)
    dim = op.shape[0]
    n_probes = _checks.check_int("n_probes", n_probes)
    if n_probes < 1:
        raise ValueError(f"n_probes must be >= 1, got n_probes={n_probes}")
    n_steps = _checks.check_int("n_steps", n_steps)
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got n_steps={n_steps}")
    seed = _checks.check_seed(seed)
    rng = np.random.default_rng(seed)
    steps = min(n_steps, dim)
    nodes = np.zeros((n_probes, n_steps))
    weights = np.zeros((n_probes, n_steps))
    counts = np.zeros(n_probes, dtype=np.int64)
    mv = _host_matvec(op)
    total = 0
    try:
        for p in range(n_probes):
            try:
                state = core.TridiagState(n=dim, steps=steps)
            except MemoryError:
                raise MemoryError(
                    f"spectral_density needs {8 * dim * (steps + 1) / 2**30:.3g} GiB for one probe's Krylov basis "
                    f"(n={dim}, n_steps={n_steps}); lower n_steps") from None
            state.start_vector()[:] = _rademacher(rng, dim)
            y = None
            while True:
                try:
                    req = int(state.advance())
                except core.NonFiniteError:
                    raise nonfinite_error(y, total + int(state.n_matvecs)) from None
                if req == DONE:
                    break
                if req != MATVEC:  # pragma: no cover - the tridiagonal state issues two requests only
                    raise RuntimeError(f"unknown request {req} from the tridiagonal state")
                y = mv(state.matvec_input())
                state.set_matvec_output(y)
            k = int(state.steps_done)
            total += int(state.n_matvecs)
            theta, w = _gauss_quadrature(np.asarray(state.alphas()), np.asarray(state.betas()))
            nodes[p, :k] = theta
            nodes[p, k:] = theta[-1]
            weights[p, :k] = w
            counts[p] = k
    finally:
        _release(op)
    for arr in (nodes, weights, counts):
        arr.flags.writeable = False
    return SpectralDensity(nodes=nodes, weights=weights, n_nodes=counts, n_matvecs=total, seed=seed)


# ---- helpers ---------------------------------------------------------------------------------


def _gauss_quadrature(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes (ascending) and weights (summing to 1) of the Jacobi matrix with diagonal alpha, off-diagonal beta."""
    k = alpha.size
    T = np.diag(alpha)
    if k > 1:
        T += np.diag(beta, 1) + np.diag(beta, -1)
    theta, Z = core.symeig(T)
    w = Z[0, :] ** 2
    return np.asarray(theta), w / w.sum()  # the sum is 1 to rounding; exactly 1 keeps the CDF's top at 1


_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def _rademacher(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2, size=n).astype(np.float64) * 2.0 - 1.0


def _estimate(low: float, samples: np.ndarray, budget: int, method: str, seed: int) -> TraceEstimate:
    m = samples.size
    stderr = float(np.std(samples, ddof=1) / math.sqrt(m))
    return TraceEstimate(float(low + samples.mean()), stderr, budget, method, m, seed)


def _grid(grid) -> np.ndarray:
    t = np.asarray(grid, dtype=np.float64)
    if t.ndim > 1:
        raise ValueError(f"grid must be a 1-D array of points, got shape {t.shape}")
    t = np.atleast_1d(t)
    if not np.all(np.isfinite(t)):
        raise ValueError("grid contains NaN or Inf")
    return t


def _release(op) -> None:
    release = getattr(op, "release", None)
    if callable(release):
        release()


def _host_matvec(op) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> A x`` on float64 host vectors, whichever device the operator's products run on (checked, float64)."""
    dim = op.shape[0]
    count = [0]
    if not _gpu.is_gpu(op.device):
        apply = op.matvec
    elif callable(getattr(op, "hvp", None)) and getattr(op, "framework", None) in ("torch", "jax"):
        apply = op.matvec  # the adapters' matvec speaks NumPy on any device
    else:
        to_device = _to_device(op)

        def apply(x):
            return _gpu.to_numpy(op.matvec(to_device(x)))

    def mv(x):
        count[0] += 1
        y = _checks.matvec_output(apply(x), dim, count[0])
        y = np.asarray(y, dtype=np.float64)
        if not np.all(np.isfinite(y)):
            raise nonfinite_error(y, count[0])
        return y

    return mv


def _to_device(op) -> Callable[[np.ndarray], object]:
    """Copies a host float64 vector to the operator's GPU, as an array of its framework."""
    device = _gpu.normalize_device(op.device)
    index = _gpu.device_index(device)
    name = getattr(op, "framework", None)
    if name == "torch":
        torch = _gpu.require("torch", "a torch operator on a CUDA device")
        return lambda x: torch.from_numpy(np.array(x)).to(device)
    if name == "cupy":
        cupy = _gpu.require("cupy", "a CuPy operator")

        def put(x):
            with cupy.cuda.Device(index):
                return cupy.asarray(x)

        return put
    if name == "jax":
        jax = _gpu.require("jax", "a JAX operator on a GPU")
        dev = [d for d in jax.devices() if d.platform == "gpu"][index]
        return lambda x: jax.device_put(np.array(x), dev)
    cuda = _gpu.cuda_module(device)
    return lambda x: cuda.DeviceArray.from_numpy(np.array(x), device=index)
