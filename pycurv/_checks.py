"""Validation at the boundary: each check names the offending value."""

from __future__ import annotations

import math
import numbers

import numpy as np

from ._devices import array_device

WHICH = ("LA", "SA", "BE")


def check_which(which) -> str:
    if not isinstance(which, str) or which.upper() not in WHICH:
        raise ValueError(f"which must be one of 'LA', 'SA', 'BE', got which={which!r}")
    return which.upper()


def check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {name}={value!r}")
    return int(value)


def check_k(k, n: int) -> int:
    k = check_int("k", k)
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n, got k={k}, n={n}")
    return k


def default_ncv(k: int, n: int) -> int:
    """Basis size used when ncv is not given: 2k + 1, at least 32, at most n.

    32 rather than ARPACK's 20: where the top eigenvalue is not separated
    (a continuum edge, a uniform spectrum) restarts dominate and 32 vectors
    need about half the products of 20 (bench/RESULTS.md). Where it is
    separated the run ends in the first cycle and the size does not matter;
    on the CPU the basis pages are only committed as the basis fills.
    """
    if k >= n - 1:
        return n
    return min(n, max(2 * k + 1, 32))


def check_ncv(ncv, k: int, n: int) -> int:
    if ncv is None:
        return default_ncv(k, n)
    ncv = check_int("ncv", ncv)
    if k >= n - 1:
        if ncv != n:
            raise ValueError(f"ncv must equal n when k >= n - 1, got ncv={ncv}, k={k}, n={n}")
        return ncv
    if not k + 2 <= ncv <= n:
        raise ValueError(f"ncv must satisfy k + 2 <= ncv <= n, got ncv={ncv}, k={k}, n={n}")
    return ncv


def check_criterion(criterion) -> str:
    if criterion not in ("residual", "eigenvalue"):
        raise ValueError(f"criterion must be 'residual' or 'eigenvalue', got criterion={criterion!r}")
    return criterion


def check_tol(tol) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (0.0 < float(tol) < 1.0):
        raise ValueError(f"tol must be a number with 0 < tol < 1, got tol={tol!r}")
    return float(tol)


# Products before convergence may be declared, by default: fewer Krylov dimensions cannot
# tell an isolated top eigenvalue from a cluster (bench/RESULTS.md, "How often each stopping
# rule returns lambda_1"). ARPACK's first check comes after ncv (20) products.
MIN_MATVECS = 12


def check_min_matvecs(min_matvecs, n: int, max_matvecs: int) -> int:
    if min_matvecs is None:
        return min(MIN_MATVECS, n, max_matvecs)
    min_matvecs = check_int("min_matvecs", min_matvecs)
    if min_matvecs < 0:
        raise ValueError(f"min_matvecs must be >= 0, got min_matvecs={min_matvecs}")
    return min(min_matvecs, max_matvecs)


def check_max_matvecs(max_matvecs, ncv: int, k: int) -> int:
    if max_matvecs is None:
        return max(1000, 30 * ncv, 100 * k)
    max_matvecs = check_int("max_matvecs", max_matvecs)
    if max_matvecs < 1:
        raise ValueError(f"max_matvecs must be >= 1, got max_matvecs={max_matvecs}")
    return max_matvecs


def check_v0(v0, n: int) -> np.ndarray:
    _not_on_device("v0", v0, "pass v0 as a NumPy array")
    try:
        arr = np.asarray(v0)
    except Exception as exc:  # noqa: BLE001 - anything numpy cannot read is a type error here
        raise TypeError(f"v0 must be an array of {n} real numbers, got {type(v0).__name__}") from exc
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"v0 must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.shape != (n,):
        raise ValueError(f"v0 must have shape ({n},) to match A, got shape {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("v0 contains NaN or Inf")
    if not np.any(arr):
        raise ValueError("v0 is the zero vector; pass a nonzero start vector or v0=None for a random one")
    return arr


def check_seed(seed) -> int:
    """A 64-bit seed: drawn from OS entropy when None, recorded in the result."""
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0])
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, 2**63, dtype=np.int64))
    seed = check_int("seed", seed)
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got seed={seed}")
    if seed >= 2**64:  # silently reducing it would give two different seeds the same run
        raise ValueError(f"seed must be below 2**64 (seeds are 64-bit), got seed={seed}")
    return seed


def check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    """A finite real number > 0 (or >= 0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {name}={value!r}")
    value = float(value)
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {name}={value!r}")
    return value


def matvec_output(y, n: int, count: int) -> np.ndarray:
    """Checks what a user's matvec returned (call number ``count``)."""
    if not isinstance(y, np.ndarray):
        _not_on_device(f"matvec call {count} returned an array that", y, "return a NumPy array")
        try:
            y = np.asarray(y)
        except Exception as exc:  # noqa: BLE001
            raise TypeError(
                f"matvec call {count} returned {type(y).__name__}, which is not an array of numbers"
            ) from exc
    if y.dtype.kind == "c":
        raise TypeError(f"matvec call {count} returned complex values (dtype {y.dtype}); A must be real symmetric")
    if y.dtype.kind not in "fiu":
        raise TypeError(f"matvec call {count} returned dtype {y.dtype}; expected real numbers")
    if y.shape != (n,):
        if y.shape == (n, 1):
            y = y[:, 0]
        else:
            raise ValueError(f"matvec call {count} returned shape {y.shape}; expected ({n},), the shape of its input")
    return y


def _not_on_device(what: str, x, fix: str) -> None:
    """A GPU array where the solver runs on the CPU: say so, and how to run on the GPU instead."""
    dev = array_device(x)
    if dev is not None:
        raise TypeError(
            f"{what} lives on {dev}, but the operator runs on the CPU: {fix}, or declare the operator on the GPU "
            f"so the solver keeps its basis there, e.g. pycurv.FunctionOperator(f, n, device='{dev}', "
            "framework='torch')"
        )


# --- real-valued hyper-parameters (stability models and solvers) -------------------------------


def as_real(name: str, value) -> float:
    """A finite real number from a Python number or a 0-d array/tensor (read with ``float()``)."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"{name} must be a real number, got {name}={value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number (or a 0-d array), got {name}={value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be a finite number, got {name}={out!r}")
    return out


def check_interval(name: str, value, lo: float, hi: float, *, lo_open: bool = False,
                   hi_open: bool = False) -> float:
    """A finite real in [lo, hi] (open ends as asked); the message shows the interval."""
    value = as_real(name, value)
    lo_ok = value > lo if lo_open else value >= lo
    hi_ok = value < hi if hi_open else value <= hi
    if not (lo_ok and hi_ok):
        if math.isfinite(hi):
            rule = f"satisfy {lo:g} {'<' if lo_open else '<='} {name} {'<' if hi_open else '<='} {hi:g}"
        else:
            rule = f"be {'>' if lo_open else '>='} {lo:g}"
        raise ValueError(f"{name} must {rule}, got {name}={value!r}")
    return value


def check_lr(value, name: str = "lr") -> float:
    """A learning rate: finite and > 0 (a 0-d tensor is read with ``float()``)."""
    return check_interval(name, value, 0.0, math.inf, lo_open=True)


def check_nonnegative(name: str, value) -> float:
    return check_interval(name, value, 0.0, math.inf)


def check_coefficient(name: str, value) -> float:
    """A momentum-like coefficient: 0 <= value < 1."""
    return check_interval(name, value, 0.0, 1.0, hi_open=True)


def check_flag(name: str, value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {name}={value!r}")
