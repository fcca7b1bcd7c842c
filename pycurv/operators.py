"""One operator protocol for everything the Lanczos solver accepts.

An operator has ``shape`` (n, n), ``dtype`` (the arithmetic its ``matvec`` runs
in, or None if unknown) and ``matvec(x) -> A @ x`` for a float64 vector ``x`` of
length n. :func:`as_operator` normalises what users pass (NumPy arrays, SciPy
sparse matrices and ``LinearOperator``\\ s, objects with ``shape`` and
``matvec``, plain callables, and torch/CuPy/JAX matrices on a GPU) once, at the
boundary.

Where the vectors live is the operator's ``device``: ``"cpu"`` (``x`` is a
read-only NumPy vector) or ``"cuda:N"``, where the solver keeps its basis on
that GPU and ``x`` is a zero-copy float64 array of the operator's
``framework`` (``"torch"``, ``"cupy"``, ``"jax"``, or None for
``pycurv._cuda.DeviceArray``, which every framework reads through DLPack).
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional

import numpy as np

from . import _gpu

__all__ = [
    "Operator",
    "MatrixOperator",
    "FunctionOperator",
    "DeviceMatrixOperator",
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
    solver's residual estimates need no confirmation. For other operators the
    residuals also count the Gram-Schmidt coefficients of the products that
    the Lanczos recurrence leaves out (their rounding and asymmetry), and are
    confirmed with extra products only where those cannot vouch for ``tol``.
    ``device`` says where the vectors live (``"cpu"`` or ``"cuda:N"``) and, on
    a GPU, ``framework`` which array type ``matvec`` takes: ``"torch"``,
    ``"cupy"``, ``"jax"`` or None (``pycurv._cuda.DeviceArray``). On a GPU,
    ``matvec`` may return a device array in float64, float32, float16 or
    bfloat16 (cast to float64 by the solver) or a host array (copied up).
    """

    shape: tuple[int, int]
    dtype: object = None
    exact: bool = False
    device: str = "cpu"
    framework: Optional[str] = None

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
    """Wraps ``f(x) -> A @ x`` with the dimension ``n`` and, if known, the dtype of f's arithmetic.

    ``device="cuda:0"`` runs the solver on that GPU: ``f`` then receives a
    zero-copy float64 vector of ``framework`` (``"torch"``: a CUDA tensor,
    ``"cupy"``: a ``cupy.ndarray``, ``"jax"``: a ``jax.Array``; None: a
    ``pycurv._cuda.DeviceArray``, readable by any of them through DLPack or
    ``__cuda_array_interface__``). ``f`` must not write to it, and may return
    a device array in float64, float32, float16 or bfloat16.
    """

    def __init__(self, f: Callable, n: int, *, dtype=None, device="cpu", framework: Optional[str] = None):
        if not callable(f):
            raise TypeError(f"f must be callable, got {type(f).__name__}")
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n must be a positive integer, got n={n!r}")
        device = _gpu.normalize_device(device)
        if device != "cpu" and not _gpu.is_gpu(device):
            raise ValueError(f"device must be 'cpu' or 'cuda:N', got device={device!r}")
        _gpu.check_framework(framework)
        if framework is not None and device == "cpu":
            raise ValueError("framework= applies to operators on a GPU (device='cuda:N'); on the CPU, f receives "
                             "NumPy arrays")
        self._f = f
        self.shape = (int(n), int(n))
        self.dtype = dtype
        self.device = device
        self.framework = framework

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
        device = getattr(obj, "device", None)
        if device is not None and _gpu.is_gpu(device):
            self.device = _gpu.normalize_device(device)
            self.framework = _gpu.check_framework(getattr(obj, "framework", None))

    def matvec(self, x):
        return self._obj.matvec(x)


class DeviceMatrixOperator(Operator):
    """A symmetric matrix on a GPU: a torch CUDA tensor, a CuPy array or a JAX GPU array.

    Products run on the matrix's device in its dtype (``A @ x`` with ``x`` cast
    to it); a float64 matrix is ``exact``. Validated once, on the device:
    square, real, finite, symmetric to within 1e-8 relative (then symmetrised).
    """

    def __init__(self, A, *, name: str = "A"):
        self.device = _gpu.array_device(A)
        if self.device is None:
            raise TypeError(f"{name} is not an array on a CUDA device")
        fw = _gpu.array_framework(A)
        if fw is None:
            raise TypeError(
                f"{name} is a CUDA array of type {type(A).__name__}, which pycurv cannot multiply; pass "
                "pycurv.FunctionOperator(f, n, device='cuda:N', framework=...) with f(x) = A @ x")
        self.framework = fw
        _check_square(tuple(A.shape), name)
        dtype = _gpu.dtype_name(A.dtype)
        if "complex" in dtype:
            raise TypeError(f"{name} must be real symmetric, got complex dtype {dtype}")
        fwk = _gpu.framework(fw)
        if dtype not in ("float64", "float32", "float16", "bfloat16"):
            A = fwk.astype(A, "float64")
            dtype = "float64"
        xp = fwk.namespace()
        if not bool(xp.all(xp.isfinite(A))):
            raise ValueError(f"{name} contains NaN or Inf")
        amax = float(xp.max(xp.abs(A)))
        asym = float(xp.max(xp.abs(A - A.T)))
        _check_symmetric(asym, amax, name)
        self._A = (A + A.T) * 0.5 if asym > 0 else A
        self._fw = fwk
        self.shape = (int(A.shape[0]), int(A.shape[1]))
        self.dtype = dtype
        self.exact = dtype == "float64"

    def matvec(self, x):
        return self._A @ (x if self.dtype == "float64" else self._fw.astype(x, self.dtype))


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
    ``LinearOperator`` or any object with ``shape`` and ``matvec`` (and
    optionally ``device`` and ``framework``), a callable ``f(x) -> A @ x``
    given together with ``n``, or a symmetric matrix on a GPU (torch CUDA
    tensor, CuPy array, JAX GPU array: solved on that GPU).
    """
    if isinstance(A, Operator):
        if n is not None and n != A.shape[0]:
            raise ValueError(f"n={n} does not match the operator's shape {A.shape}")
        return A
    if _gpu.array_device(A) is not None:
        if n is not None and tuple(A.shape)[:1] != (n,):
            raise ValueError(f"n={n} does not match A's shape {tuple(A.shape)}")
        return DeviceMatrixOperator(A)
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
