"""One operator protocol for everything the Lanczos solver accepts.

An operator has ``shape`` (n, n), ``dtype`` (the arithmetic its ``matvec`` runs
in, or None if unknown) and ``matvec(x) -> A @ x`` for a float64 vector ``x`` of
length n. :func:`as_operator` normalises what users pass (NumPy arrays, SciPy
sparse matrices and ``LinearOperator``\\ s, objects with ``shape`` and
``matvec``, plain callables) once, at the boundary.
"""

from __future__ import annotations

import numbers
from typing import Callable

import numpy as np

__all__ = [
    "Operator",
    "MatrixOperator",
    "FunctionOperator",
    "ShiftedOperator",
    "as_operator",
    "unit_roundoff",
]

# Largest |A - A^T| / max|A| accepted as rounding noise (then symmetrised).
_SYMMETRY_RTOL = 1e-8


def unit_roundoff(dtype) -> float:
    """Unit roundoff of an arithmetic type: 2**-53 for float64, 2**-24 for float32.

    Accepts NumPy dtypes, names such as ``"bfloat16"``, and torch/JAX dtypes.
    Unknown arithmetic is taken to be float64.
    """
    if dtype is None:
        return 2.0**-53
    name = str(dtype).replace("torch.", "").replace("jnp.", "").lower()
    if "bfloat16" in name:
        return 2.0**-8
    try:
        dt = np.dtype(name)
    except TypeError:
        return 2.0**-53
    if dt.kind != "f":
        return 2.0**-53
    return float(np.finfo(dt).eps) / 2.0


class Operator:
    """Base class of pycurv operators: a symmetric linear map R^n -> R^n.

    Subclasses set ``shape`` and ``dtype`` and implement ``matvec``. ``exact``
    is True when ``matvec`` is float64 arithmetic on a stored matrix, so the
    solver's residual estimates need no confirmation with extra products.
    """

    shape: tuple[int, int]
    dtype: object = None
    exact: bool = False
    device: str = "cpu"

    def matvec(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def __matmul__(self, x):
        return self.matvec(x)

    @property
    def unit_roundoff(self) -> float:
        return unit_roundoff(self.dtype)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} shape={self.shape} dtype={self.dtype}>"


class MatrixOperator(Operator):
    """A stored symmetric matrix (dense NumPy array or SciPy sparse matrix), in float64.

    The matrix is validated once: square, real, finite, symmetric to within
    1e-8 relative (then symmetrised exactly, so rounding in how it was built
    does not break the symmetric solver).
    """

    exact = True

    def __init__(self, A, *, name: str = "A"):
        sparse = _scipy_sparse(A)
        if sparse is not None:
            self._init_sparse(A, name)
        else:
            self._init_dense(A, name)
        self.dtype = np.dtype(np.float64)

    def _init_dense(self, A, name):
        arr = np.asarray(A)
        if arr.dtype.kind == "c":
            raise TypeError(f"{name} must be real symmetric, got complex dtype {arr.dtype}")
        if arr.dtype.kind not in "fiub":
            raise TypeError(f"{name} must be a numeric matrix, got dtype {arr.dtype}")
        _check_square(arr.shape, name)
        arr = np.asarray(arr, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or Inf")
        amax = float(np.max(np.abs(arr))) if arr.size else 0.0
        asym = float(np.max(np.abs(arr - arr.T))) if arr.size else 0.0
        _check_symmetric(asym, amax, name)
        self._A = (arr + arr.T) * 0.5 if asym > 0 else np.ascontiguousarray(arr)
        self.shape = arr.shape

    def _init_sparse(self, A, name):
        if np.dtype(A.dtype).kind == "c":
            raise TypeError(f"{name} must be real symmetric, got complex dtype {A.dtype}")
        if np.dtype(A.dtype).kind not in "fiub":
            raise TypeError(f"{name} must be a numeric matrix, got dtype {A.dtype}")
        _check_square(A.shape, name)
        M = A.tocsr().astype(np.float64)
        if M.nnz and not np.all(np.isfinite(M.data)):
            raise ValueError(f"{name} contains NaN or Inf")
        D = M - M.T
        amax = float(np.max(np.abs(M.data))) if M.nnz else 0.0
        asym = float(np.max(np.abs(D.data))) if D.nnz else 0.0
        _check_symmetric(asym, amax, name)
        self._A = ((M + M.T) * 0.5).tocsr() if asym > 0 else M
        self.shape = tuple(M.shape)

    def matvec(self, x):
        return self._A @ x


class FunctionOperator(Operator):
    """Wraps ``f(x) -> A @ x`` with the dimension ``n`` and, if known, the dtype of f's arithmetic."""

    def __init__(self, f: Callable, n: int, *, dtype=None):
        if not callable(f):
            raise TypeError(f"f must be callable, got {type(f).__name__}")
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n must be a positive integer, got n={n!r}")
        self._f = f
        self.shape = (int(n), int(n))
        self.dtype = dtype

    def matvec(self, x):
        return self._f(x)


class _Wrapped(Operator):
    """An object with ``shape`` and ``matvec`` (a SciPy LinearOperator, or duck-typed)."""

    def __init__(self, obj, name: str):
        shape = tuple(getattr(obj, "shape"))
        _check_square(shape, name)
        self._obj = obj
        self.shape = (int(shape[0]), int(shape[1]))
        dt = getattr(obj, "dtype", None)
        if dt is not None:
            try:
                kind = np.dtype(dt).kind
            except TypeError:
                kind = None
            if kind == "c":
                raise TypeError(f"{name} must be real symmetric, got complex dtype {dt}")
        self.dtype = dt

    def matvec(self, x):
        return self._obj.matvec(x)


class ShiftedOperator(Operator):
    """``A - sigma * I``."""

    def __init__(self, A, sigma: float):
        self.base = as_operator(A)
        self.sigma = float(sigma)
        self.shape = self.base.shape
        self.dtype = self.base.dtype
        self.exact = self.base.exact

    def matvec(self, x):
        return np.asarray(self.base.matvec(x), dtype=np.float64) - self.sigma * x


def as_operator(A, *, n: int | None = None, dtype=None) -> Operator:
    """Normalises anything the solver accepts into an :class:`Operator`.

    ``A`` may be a pycurv operator, a symmetric NumPy array (or anything
    ``numpy.asarray`` reads as a 2-D array), a SciPy sparse matrix, a SciPy
    ``LinearOperator`` or any object with ``shape`` and ``matvec``, or a
    callable ``f(x) -> A @ x`` given together with ``n``.
    """
    if isinstance(A, Operator):
        if n is not None and n != A.shape[0]:
            raise ValueError(f"n={n} does not match the operator's shape {A.shape}")
        return A
    if callable(A) and not hasattr(A, "matvec") and not hasattr(A, "shape"):
        if n is None:
            raise TypeError("A is a callable: pass its dimension too, e.g. pycurv.lanczos(f, n=1000)")
        return FunctionOperator(A, n, dtype=dtype)
    if n is not None and hasattr(A, "shape") and tuple(A.shape)[:1] != (n,):
        raise ValueError(f"n={n} does not match A's shape {tuple(A.shape)}")
    if isinstance(A, np.ndarray) or _scipy_sparse(A) is not None:
        return MatrixOperator(A)
    if hasattr(A, "matvec") and hasattr(A, "shape"):
        return _Wrapped(A, "A")
    if hasattr(A, "__array__") or isinstance(A, (list, tuple)):
        return MatrixOperator(A)
    raise TypeError(
        "A must be a symmetric matrix (NumPy array or SciPy sparse), an object with "
        f"shape and matvec (e.g. scipy.sparse.linalg.LinearOperator), or a callable with n=; got {type(A).__name__}"
    )


def _check_square(shape, name):
    if len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D square matrix, got shape {tuple(shape)}")
    if shape[0] != shape[1]:
        raise ValueError(f"{name} must be square, got shape {tuple(shape)}")
    if shape[0] < 1:
        raise ValueError(f"{name} must have at least one row, got shape {tuple(shape)}")


def _check_symmetric(asym: float, amax: float, name: str):
    if asym > _SYMMETRY_RTOL * amax:
        raise ValueError(
            f"{name} is not symmetric: max |{name} - {name}.T| = {asym:.3g} "
            f"({asym / amax:.2g} of max |{name}|); pycurv solves symmetric eigenproblems"
        )


def _scipy_sparse(A):
    """scipy.sparse if A is a sparse matrix/array (without importing scipy otherwise)."""
    import sys

    sp = sys.modules.get("scipy.sparse")
    if sp is not None and sp.issparse(A):
        return sp
    return None
