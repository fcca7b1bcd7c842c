"""The Hessian of a JAX loss as a pycurv operator: :class:`HessianOperator`.

Products apply each batch's jitted ``jax.linearize`` of the gradient (built
once per solve, under a memory budget), or jitted ``jax.jvp(jax.grad(f))``,
over the raveled parameter vector, compiled once per loss function and layout.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Any, Callable, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .. import _adapter
from .._adapter import HVPOperator
from .._comm import shard_bounds
from .._devices import jax_device_name, jax_local_device
from .preconditioners import _preconditioner_diagonal

__all__ = ["HessianOperator"]


def _x64() -> bool:
    return bool(jax.config.jax_enable_x64)


def _resolve_dtype(dtype, params_dtype):
    if dtype is None:
        return jnp.dtype(params_dtype)
    try:
        dt = jnp.dtype(str(dtype).replace("jnp.", "").replace("jax.numpy.", ""))
    except TypeError:
        raise ValueError(f"dtype must be a floating-point dtype such as 'float32' or 'float64', got dtype={dtype!r}") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"dtype must be a floating-point dtype such as 'float32' or 'float64', got dtype={dtype!r}")
    if dt == jnp.float64 and not _x64():
        raise ValueError(
            "dtype='float64' needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) before building "
            "the operator (without it JAX computes in float32)"
        )
    return dt


def _leading(batch) -> Optional[int]:
    for leaf in jax.tree_util.tree_leaves(batch):
        shape = getattr(leaf, "shape", ())
        if len(shape) > 0:
            return int(shape[0])
    return None


def _is_batch_list(data) -> bool:
    """Several batches: a list, or a re-iterable that is not itself a pytree node (tuple, dict, array)."""
    if isinstance(data, list):
        return True
    if isinstance(data, (tuple, dict)) or hasattr(data, "shape"):
        return False
    leaves, treedef = jax.tree_util.tree_flatten(data)
    if treedef.num_nodes > 1:  # a registered pytree (namedtuple, dataclass, flax struct): one batch
        return False
    try:
        iter(data)
    except TypeError:
        return False
    return True


class HessianOperator(HVPOperator):
    """The Hessian of a JAX loss (optionally preconditioned) as a pycurv operator.

    Built by :func:`hessian`. ``matvec`` takes and returns float64 NumPy vectors;
    ``hvp`` takes and returns flat ``jax.Array`` vectors in :attr:`jax_dtype`.

    Attributes
    ----------
    unravel : callable
        Flat vector -> parameter pytree (``jax.flatten_util.ravel_pytree``'s).
    dtype : str
        Arithmetic of the products (``"float32"``, ``"float64"``).
    device : str
        ``"cpu:0"``, ``"cuda:0"``, ...
    preconditioned : bool
        True for P^{-1/2} H P^{-1/2}; ``preconditioner_diagonal`` holds P.
    """

    framework = "jax"

    def __init__(self, loss_fn, params, data, *, preconditioner, dtype, reduction, check_determinism, probe_rtol,
                 l2, jit, mesh=None, data_axis=None, shard_basis=False, hvp="auto", cache=None):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(params, batch) -> scalar, got {type(loss_fn).__name__}")
        self.reduction = _adapter.check_reduction(reduction)
        if isinstance(l2, bool) or not isinstance(l2, numbers.Real) or not math.isfinite(float(l2)):
            raise ValueError(f"l2 must be a finite number, got l2={l2!r}")
        leaves = jax.tree_util.tree_leaves(params)
        if not leaves:
            raise ValueError("params has no arrays; pass the pytree of parameters the loss is differentiated by")
        bad = [i for i, a in enumerate(leaves) if not jnp.issubdtype(jnp.result_type(a), jnp.floating)]
        if bad:
            raise TypeError(f"params leaves {bad} are not floating point; the Hessian needs floating-point parameters "
                            "(keep integer state out of params)")
        params_dtype = jnp.result_type(*leaves)
        self.jax_dtype = _resolve_dtype(dtype, params_dtype)
        self.dtype = str(self.jax_dtype)
        cast = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=self.jax_dtype), params)
        flat, unravel = ravel_pytree(cast)
        self.unravel = unravel
        self._treedef = jax.tree_util.tree_structure(params)
        n = int(flat.shape[0])
        self.shape = (n, n)
        self._cast_data = self.jax_dtype != jnp.dtype(params_dtype)

        _adapter.check_one_shot(data)
        self._single = not _is_batch_list(data)
        if not self._single and isinstance(data, list) and not data:
            raise ValueError("data is empty; pass a batch or a non-empty list of batches")
        self.mesh = mesh
        self._replicated = None
        if mesh is None:
            if shard_basis:
                raise ValueError("shard_basis=True splits the basis over the devices of a mesh: pass mesh= too")
            if data_axis is not None:
                raise ValueError("data_axis names an axis of mesh=; pass the mesh too")
        else:
            data, flat = self._place_on_mesh(mesh, data_axis, data, flat)
        self._data = data
        self._flat = flat
        dev = next(iter(flat.devices())) if mesh is None else jax_local_device(mesh.devices.flat)
        self._jax_device = dev
        self.device = jax_device_name(dev)
        if shard_basis:
            ndev = int(mesh.devices.size)
            self.shard_bounds = [shard_bounds(n, ndev, i) for i in range(ndev)]
        self._loss_fn = loss_fn
        self.l2 = float(l2)
        self._allreduce: Optional[Callable] = None  # hook for multi-process sums (scale-out)

        (self._batch_loss, self._batch_hvp, self._batch_grad, self._linearize,
         self._apply) = _compiled(loss_fn, cast, self.jax_dtype, jit)
        if hvp not in ("auto", "forward"):
            raise ValueError(f"hvp must be 'auto' (jax.linearize once per batch, cached) or 'forward' "
                             f"(jvp of grad in every product), got hvp={hvp!r}")
        # per batch: the gradient linearised at the parameters (a jax.tree_util.Partial)
        self._init_cache(_adapter.cache_budget(cache, lambda: _free_bytes(self._jax_device)))
        self.hvp_method = "linearized" if hvp == "auto" and self.cache_budget > 0 else "forward-over-reverse"

        self.preconditioned = preconditioner is not None
        self.preconditioner_diagonal = None
        self._scale = None
        if preconditioner is not None:
            P = _preconditioner_diagonal(preconditioner, params, n)
            self.preconditioner_diagonal = P
            self._scale = (1.0 / jnp.sqrt(P)).astype(self.jax_dtype)
        super().__init__(check_determinism=check_determinism, probe_rtol=probe_rtol)

    @property
    def function(self) -> str:
        """The loss this operator differentiates, in words (every report names it).

        JAX losses are the user's function: batch statistics, dropout keys and
        the like are whatever ``loss_fn`` computes. Pass the loss that training
        differentiates (for flax batch norm, ``apply(..., mutable=["batch_stats"])``
        with the updated statistics discarded).
        """
        where = "1 batch" if self._single else (f"{len(self._data)} batches" if hasattr(self._data, "__len__")
                                                 else "the data's batches")
        if self.n_samples is not None:
            where += f", {self.n_samples:,} samples"
        return f"loss_fn(params, batch) as given; {where}"

    # -- several devices ---------------------------------------------------
    def _place_on_mesh(self, mesh, data_axis, data, flat):
        """Data parallelism inside one process: batches split over ``data_axis`` of ``mesh``.

        The parameters and every product's input are replicated; each batch's
        leading dimension is sharded, so the jitted product's sum over the batch
        is computed on every device for its part and combined by XLA. (No
        shard_map with an explicit pmean here: that would add a sum the mean
        already contains.)
        """
        from jax.sharding import NamedSharding, PartitionSpec

        axis = data_axis if data_axis is not None else mesh.axis_names[0]
        if axis not in mesh.axis_names:
            raise ValueError(f"data_axis={axis!r} is not an axis of the mesh; its axes are {mesh.axis_names}")
        ways = int(mesh.shape[axis])
        self._replicated = NamedSharding(mesh, PartitionSpec())
        split = NamedSharding(mesh, PartitionSpec(axis))

        def place(batch):
            def leaf(a):
                a = jnp.asarray(a)
                if a.ndim == 0:
                    return jax.device_put(a, self._replicated)
                if a.shape[0] % ways:
                    raise ValueError(f"a batch with {a.shape[0]} samples cannot be split evenly over the {ways} "
                                     f"devices of mesh axis {axis!r}; use batches whose size is a multiple of {ways}")
                return jax.device_put(a, split)
            return jax.tree_util.tree_map(leaf, batch)

        placed = place(data) if self._single else [place(b) for b in data]
        return placed, jax.device_put(flat, self._replicated)

    def matvec_shards(self, xs):
        """Shards of ``A x`` from the shards of x (``shard_bounds``): the basis split over the mesh's devices."""
        y = self.matvec(np.concatenate([np.asarray(x) for x in xs]))
        return [y[lo:hi] for lo, hi in self.shard_bounds]

    # -- boundary ----------------------------------------------------------
    def _from_numpy(self, x):
        target = self._replicated if self._replicated is not None else self._jax_device
        return jax.device_put(np.asarray(x, dtype=self.jax_dtype), target)

    def _to_numpy(self, y) -> np.ndarray:
        return np.asarray(y, dtype=np.float64)

    def _count_nonfinite(self, y) -> int:
        return int(np.count_nonzero(~np.isfinite(np.asarray(y, dtype=np.float64))))

    def _rel_diff(self, a, b) -> float:
        a64 = np.asarray(a, dtype=np.float64)
        b64 = np.asarray(b, dtype=np.float64)
        den = float(np.linalg.norm(a64))
        num = float(np.linalg.norm(a64 - b64))
        return num / den if den > 0 else (0.0 if num == 0 else math.inf)

    def from_vector(self, x):
        """A flat vector as the parameter pytree (in the HVP dtype)."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.shape[0],):
            raise ValueError(f"vector must have shape ({self.shape[0]},), got {x.shape}")
        return self.unravel(jnp.asarray(x, dtype=self.jax_dtype))

    def to_vector(self, tree) -> np.ndarray:
        """A pytree shaped like ``params`` as a float64 NumPy vector."""
        if jax.tree_util.tree_structure(tree) != self._treedef:
            raise ValueError("to_vector needs a pytree with the structure of params")
        flat, _ = ravel_pytree(tree)
        return np.asarray(flat, dtype=np.float64)

    def parameters_vector(self) -> np.ndarray:
        return np.asarray(self._flat, dtype=np.float64)

    # -- data --------------------------------------------------------------
    def batches(self) -> Iterator[Tuple[Any, int]]:
        """Yields ``(batch, n_samples)``; floating leaves cast to the HVP dtype when it differs from the params'."""
        source = [self._data] if self._single else self._data
        for batch in source:
            if self._cast_data:
                batch = jax.tree_util.tree_map(
                    lambda a: jnp.asarray(a, self.jax_dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a,
                    batch)
            n_b = _leading(batch)
            yield batch, (1 if n_b is None else n_b)

    def count_samples(self) -> int:
        """Samples in the data (leading dimensions summed), without computing anything."""
        source = [self._data] if self._single else self._data
        return sum((_leading(b) or 1) for b in source)

    # -- cached linearisations -----------------------------------------------
    def _entry_bytes(self, entry) -> int:
        return _nbytes(entry)

    def _batch_product(self, index: int, v, batch):
        if self.hvp_method == "linearized" and not self._bypass_cache:
            lin = self._cached(index, lambda: self._linearize(self._flat, batch))
            if lin is not None:
                return self._apply(lin, v)
        return self._batch_hvp(self._flat, v, batch)

    @property
    def host_threads(self):
        """XLA's CPU backend uses every core: on the CPU the solver's core then takes one thread."""
        import os

        return (os.cpu_count() or 1) if self._jax_device.platform == "cpu" else None

    # -- products ----------------------------------------------------------
    def _raw_hvp(self, v):
        total = None
        count = 0
        for i, (batch, n_b) in enumerate(self.batches()):
            hv = self._batch_product(i, v, batch)
            w = _adapter.batch_weight(self.reduction, n_b)
            total = hv * w if total is None else total + hv * w
            count += n_b
        if total is None:
            raise ValueError("data yielded no batches; pass a batch or a non-empty list of batches")
        if self._allreduce is not None:
            total, count = self._allreduce(total, count)
        if self.n_samples is not None and count != self.n_samples:
            raise ValueError(f"the data changed size between passes ({self.n_samples} then {count} samples)")
        self.n_samples = count
        total = total / count
        if self.l2:
            total = total + self.l2 * v
        return total

    def hvp(self, v):
        """``A v`` for a flat ``jax.Array`` (A = H, or P^{-1/2} H P^{-1/2}); counts in ``n_hvps``."""
        if self._scale is not None:
            out = self._raw_hvp(v * self._scale) * self._scale
        else:
            out = self._raw_hvp(v)
        self.n_hvps += 1
        return out

    def batch_gradients(self) -> Iterator[Tuple[int, Any]]:
        """Yields ``(n_samples, flat gradient of the batch's mean loss)`` (P^{-1/2} g when preconditioned)."""
        for batch, n_b in self.batches():
            g = self._batch_grad(self._flat, batch)
            if self.reduction == "sum":
                g = g / n_b
            if self._scale is not None:
                g = g * self._scale
            yield n_b, g

    def batch_hvps(self, v) -> Iterator[Tuple[int, Any]]:
        """Yields ``(n_samples, A_b v)`` per batch, A_b the Hessian of the batch's mean loss."""
        x = v * self._scale if self._scale is not None else v
        for i, (batch, n_b) in enumerate(self.batches()):
            hv = self._batch_product(i, x, batch)
            if self.reduction == "sum":
                hv = hv / n_b
            if self.l2:
                hv = hv + self.l2 * x
            if self._scale is not None:
                hv = hv * self._scale
            yield n_b, hv

    def loss(self) -> float:
        """Mean loss over the data at the parameters."""
        total, count = 0.0, 0
        for batch, n_b in self.batches():
            val = float(self._batch_loss(self._flat, batch))
            total += val * n_b if self.reduction == "mean" else val
            count += n_b
        return total / count

    def _nondeterminism_advice(self) -> str:
        return ("A JAX loss is deterministic unless it draws random numbers from changing keys or the data "
                "changes between passes: fix the PRNG key used for dropout inside loss_fn and the data; or "
                "pass check_determinism=False to accept it.")

    def __repr__(self) -> str:
        kind = "P^-1/2 H P^-1/2" if self.preconditioned else "H"
        return f"<pycurv.jax.HessianOperator {kind} n={self.shape[0]} dtype={self.dtype} device={self.device} hvps={self.n_hvps}>"


# compiled products, shared by operators with the same loss and parameter layout

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled(loss_fn, params, dtype, jit: bool):
    """(loss, hvp, grad) of ``loss_fn`` over the flat vector of ``params``, jitted once per layout.

    A tracker builds a new operator at every measurement; without this cache each
    would compile again. The key is the loss function (held weakly) and the
    parameters' structure, shapes and dtype, which fix ``unravel``.
    """
    key = (jax.tree_util.tree_structure(params),
           tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree_util.tree_leaves(params)), str(dtype), bool(jit),
           bool(jax.config.jax_enable_x64))
    try:
        per_fn = _CACHE.setdefault(loss_fn, {})
    except TypeError:  # not weakly referenceable (a builtin, a functools.partial of one): no cache
        per_fn = {}
    if key in per_fn:
        return per_fn[key]
    _, unravel = ravel_pytree(params)

    def batch_loss(p, batch):
        val = loss_fn(unravel(p), batch)
        if jnp.ndim(val) != 0 and jnp.size(val) != 1:
            raise TypeError(f"loss_fn(params, batch) must return a scalar, got shape {jnp.shape(val)}")
        return jnp.reshape(val, ()).astype(dtype)

    def batch_hvp(p, v, batch):
        return jax.jvp(jax.grad(lambda q: batch_loss(q, batch)), (p,), (v,))[1]

    def batch_grad(p, batch):
        return jax.grad(lambda q: batch_loss(q, batch))(p)

    def linearize(p, batch):
        # The residuals of the forward pass are the Partial's leaves: jitted, it is built once per
        # batch and applied by one compiled function for every batch.
        return jax.linearize(lambda q: batch_grad(q, batch), p)[1]

    def apply(lin, v):
        return lin(v)

    wrap = jax.jit if jit else (lambda f: f)
    per_fn[key] = fns = (wrap(batch_loss), wrap(batch_hvp), wrap(batch_grad), wrap(linearize), wrap(apply))
    return fns


def _nbytes(tree) -> int:
    return int(sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree_util.tree_leaves(tree)))


def _free_bytes(device) -> int:
    """Free memory of a JAX device: its allocator's limit less what it holds, or the host's."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - CPU devices and some backends report nothing
        stats = None
    if stats and "bytes_limit" in stats:
        return int(max(0, stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
    return _adapter.host_free_bytes()
