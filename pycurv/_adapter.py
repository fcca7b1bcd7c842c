"""What the torch and JAX adapters share: the operator base class, the determinism probe,
batch weighting and tolerance defaults. No framework is imported here.

A framework adapter subclasses :class:`HVPOperator` and provides four things:
``hvp(v)`` on a flat vector in the framework's own array type (on the model's
device, in the HVP's dtype), ``_from_numpy`` / ``_to_numpy`` (the one place
where a float64 NumPy vector crosses into the framework and back), and
``_rel_diff`` for the probe. Everything the Lanczos driver sees is the
float64 ``matvec`` built on those.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Optional

import numpy as np

from .errors import NonDeterministicOperatorError, NonFiniteMatvecError
from .operators import Operator, unit_roundoff

MODES = ("eval", "batch_stats", "train")
REDUCTIONS = ("mean", "sum")


def default_tol(dtype) -> float:
    """Residual tolerance that a HVP in ``dtype`` can reach with room to spare.

    sqrt(unit roundoff), clamped to [1e-6, 1e-2]: 1e-6 for float64, 2.4e-4 for
    float32, 1e-2 for bfloat16/float16. The eigenvalue error is about
    residual**2 / gap, far below the residual itself once the top eigenvalue is
    separated from the rest.
    """
    return float(min(1e-2, max(1e-6, math.sqrt(unit_roundoff(dtype)))))


def default_probe_rtol(dtype) -> float:
    """Largest relative difference between two HVPs of one vector taken as rounding.

    1000 unit roundoffs (reduction order on GPUs, threads), at most 1e-2.
    """
    return float(min(1e-2, 1e3 * unit_roundoff(dtype)))


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(
            f"mode must be one of 'eval' (dropout off, running statistics), 'batch_stats' "
            f"(normalisation layers use each batch's statistics) or 'train' (every layer in training "
            f"mode, dropout on), got mode={mode!r}"
        )
    return mode


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction must be 'mean' (loss_fn averages over its batch) or 'sum' (loss_fn sums over "
            f"its batch), got reduction={reduction!r}"
        )
    return reduction


def batch_weight(reduction: str, n_b: int) -> float:
    """Weight of one batch's loss in ``sum_b w_b L_b`` before dividing by the sample count.

    With ``reduction="mean"`` a batch of n_b samples counts n_b times, so that the
    total over batches, divided by N = sum n_b, is the mean over all samples.
    """
    return float(n_b) if reduction == "mean" else 1.0


def cache_budget(cache, free_bytes) -> int:
    """Bytes of per-batch linearisations an operator may hold.

    ``cache``: None or True for a quarter of ``free_bytes()`` (the device's free
    memory), False or 0 for none, or a budget in bytes.
    """
    if cache is None or cache is True:
        return int(free_bytes() // 4)
    if cache is False:
        return 0
    if isinstance(cache, bool) or not isinstance(cache, numbers.Real) or not cache >= 0 or not math.isfinite(cache):
        raise ValueError(f"cache must be True, False, None (a quarter of the free memory) or a budget in bytes >= 0, "
                         f"got cache={cache!r}")
    return int(cache)


def host_free_bytes() -> int:
    """Free host memory in bytes (8 GiB where the system does not say)."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        return 8 * 2**30


def check_one_shot(data, name: str = "data"):
    """Rejects iterators that can be consumed only once: each HVP passes over the data again.

    An iterator has ``__next__``; a re-iterable (a list, a ``DataLoader``) does
    not. Nothing is iterated here: creating an iterator of a ``DataLoader``
    would draw from its generator and start its workers.
    """
    if callable(getattr(data, "__next__", None)):
        raise TypeError(
            f"{name} is a one-shot iterator ({type(data).__name__}); every Hessian-vector product "
            f"passes over the data again, so pass a list of batches or a re-iterable such as a DataLoader"
        )


class HVPOperator(Operator):
    """Base class of the framework adapters' Hessian operators.

    ``matvec`` takes a read-only float64 NumPy vector and returns a float64
    NumPy vector; ``hvp`` is the same product in the framework's arrays.

    Attributes
    ----------
    n_hvps : int
        Hessian-vector products computed so far (each is one pass over the data),
        including the determinism probe's where it recomputes a product.
    n_samples : int or None
        Samples in the data set (known after the first pass).
    """

    exact = False
    framework = "?"

    def __init__(self, *, check_determinism: bool, probe_rtol: Optional[float]):
        if not hasattr(self, "_cache"):  # an adapter without per-batch linearisations
            self._init_cache(0)
        self.n_hvps = 0
        self.n_samples = None
        self._probe_pending = bool(check_determinism)
        self._probed_pass = False
        self.probe_rtol = default_probe_rtol(self.dtype) if probe_rtol is None else float(probe_rtol)
        self.last_probe = None

    # -- to be provided by the framework adapter ---------------------------
    def hvp(self, v):  # pragma: no cover - abstract
        raise NotImplementedError

    def _from_numpy(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _to_numpy(self, y) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rel_diff(self, a, b) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _count_nonfinite(self, y) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- the float64 NumPy boundary ----------------------------------------
    def matvec(self, x):
        """``A @ x`` for a float64 vector: cast to the HVP's dtype on its device, and back.

        With ``check_determinism`` the first call computes the product twice and
        raises :class:`pycurv.NonDeterministicOperatorError` if they differ.
        """
        return self._to_numpy(self._product(self._from_numpy(x)))

    def _product(self, v):
        """``hvp(v)``, computed twice on the first call when the determinism probe is pending."""
        if not self._probe_pending:
            return self.hvp(v)
        self._probed_pass = True  # an adapter may record what its probe needs during this pass
        try:
            y = self.hvp(v)
        finally:
            self._probed_pass = False
        self._probe_pending = False
        self._probe(v, y)
        return y

    def _probe(self, v, y) -> None:
        """The automatic determinism probe after the first product ``y = hvp(v)``: the product recomputed."""
        self._compare(y, self._probe_hvp(v))

    def check_determinism(self, v=None, *, rtol: Optional[float] = None, seed: int = 0) -> float:
        """Applies the operator twice to one vector; raises if the two products differ.

        Parameters
        ----------
        v : float64 array of shape (n,), optional
            The vector (default: a random one from ``seed``).
        rtol : float, optional
            Largest accepted ``||y1 - y2|| / ||y1||`` (default :attr:`probe_rtol`,
            1000 unit roundoffs of the HVP's dtype, at most 1e-2).

        Returns
        -------
        float
            The relative difference found.
        """
        if v is None:
            v = np.random.default_rng(seed).standard_normal(self.shape[0])
        v = np.asarray(v, dtype=np.float64)
        if v.shape != (self.shape[0],):
            raise ValueError(f"v must have shape ({self.shape[0]},), got shape {v.shape}")
        t = self._from_numpy(v)
        return self._compare(self.hvp(t), self._probe_hvp(t), rtol=rtol)

    def _probe_hvp(self, v):
        """The probe's second product: recomputed from scratch, not through the cached linearisations."""
        self._bypass_cache = True
        try:
            return self.hvp(v)
        finally:
            self._bypass_cache = False

    # -- per-batch linearisations held for a solve --------------------------
    def _init_cache(self, budget: int) -> None:
        self.cache_budget = int(budget)
        self._cache: list = []        # per batch index: the framework's linearisation, or None past the budget
        self._cache_full = False      # the budget is spent: later batches are recomputed in every product
        self._bypass_cache = False    # set while the probe recomputes

    def _entry_bytes(self, entry) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _cached(self, index: int, build):
        """Batch ``index``'s linearisation: held, or ``build()`` now. Past the budget it is returned for
        this one product and not kept, and later batches are not built (None: recompute)."""
        if index < len(self._cache):
            return self._cache[index]
        if self._cache_full:
            self._cache.append(None)
            return None
        entry = build()
        if self.cache_bytes + self._entry_bytes(entry) > self.cache_budget:
            self._cache_full = True
            self._cache.append(None)
        else:
            self._cache.append(entry)
        return entry

    @property
    def cache_batches(self) -> int:
        """Batches whose linearisation is held now."""
        return sum(1 for e in self._cache if e is not None)

    @property
    def cache_bytes(self) -> int:
        """Bytes the held linearisations take."""
        return int(sum(self._entry_bytes(e) for e in self._cache if e is not None))

    def release(self) -> None:
        """Frees the held linearisations (the solver calls it when a solve ends; the next product rebuilds them)."""
        self._cache = []
        self._cache_full = False

    def _compare(self, y1, y2, rtol: Optional[float] = None) -> float:
        rtol = self.probe_rtol if rtol is None else float(rtol)
        self._check_finite(y1)
        diff = float(self._rel_diff(y1, y2))
        self.last_probe = diff
        if not diff <= rtol:  # also catches NaN
            raise NonDeterministicOperatorError(
                f"two Hessian-vector products of the same vector differ by {diff:.3g} relative "
                f"(more than the {rtol:.2g} that {self.dtype} rounding allows): the loss is not a fixed "
                f"function of the parameters. {self._nondeterminism_advice()}"
            )
        return diff

    def _check_finite(self, y1) -> None:
        bad = self._count_nonfinite(y1)
        if bad:
            # NaN differs from itself: without this the probe would blame randomness for it.
            raise NonFiniteMatvecError(
                f"the Hessian-vector product has {bad} non-finite values (NaN or Inf) out of {self.shape[0]} "
                f"({self._loss_text()}); the loss or its derivatives are not finite at these parameters: look "
                "for NaN or Inf parameters, inputs or targets, or a loss that overflows (e.g. log of 0)",
                matvec=self.n_hvps,
            )

    def _loss_text(self) -> str:
        try:
            return f"the loss is {self.loss():.6g}"
        except Exception as exc:  # noqa: BLE001 - only for the message
            return f"the loss could not be evaluated: {type(exc).__name__}"

    def _nondeterminism_advice(self) -> str:
        return ("Random numbers drawn by the model or loss, or data that changes between passes, cause this; "
                "pass check_determinism=False to accept it.")
