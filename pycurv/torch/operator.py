"""The Hessian of a PyTorch loss as a pycurv operator: :class:`HessianOperator`.

The products use a snapshot of the parameters and buffers taken when the
operator is built and a structural copy of the module whose training flags are
set by ``mode``; the user's model, buffers and optimizer are never written.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import _adapter
from .._adapter import HVPOperator
from ..errors import NonDeterministicOperatorError
from ..distributed import TorchCommunicator, guard, shard_bounds
from ._data import FrozenLoader, _call_args, _is_pair, _leading, _map, _split, fixed_batches
from .preconditioners import _preconditioner_diagonal

__all__ = ["HessianOperator", "ParameterLayout"]

_HVP_METHODS = ("auto", "forward", "reverse")
_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class ParameterLayout(NamedTuple):
    """Where each parameter sits in the flat vector the operator acts on.

    ``names[i]`` occupies ``[offsets[i], offsets[i] + sizes[i])`` and has shape ``shapes[i]``.
    """

    names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    sizes: Tuple[int, ...]
    offsets: Tuple[int, ...]

    @property
    def n(self) -> int:
        return int(sum(self.sizes))

    def slice(self, name: str) -> slice:
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i] + self.sizes[i])


def _unwrap_data_parallel(model, distributed, process_group):
    """(module, process group or None): unwraps DistributedDataParallel and resolves the group."""
    ddp = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    group = process_group
    if ddp is not None and isinstance(model, ddp):
        if group is None and distributed is not False:
            group = model.process_group
        model = model.module
    if group is None and distributed:
        group = torch.distributed.group.WORLD
    if distributed is False:
        group = None
    if group is not None:
        dist = torch.distributed
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("distributed=True needs torch.distributed: call torch.distributed.init_process_group "
                               "on every rank first")
    return model, group


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def _resolve_dtype(dtype, model_dtype):
    if dtype is None:
        return model_dtype
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got dtype={dtype}")
        return dtype
    name = str(dtype).replace("torch.", "")
    if name == "double":
        name = "float64"
    if name == "float":
        name = "float32"
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)} (or None: the model's dtype), got dtype={dtype!r}")
    return _DTYPES[name]


class HessianOperator(HVPOperator):
    """The Hessian of a PyTorch loss (optionally preconditioned) as a pycurv operator.

    Built by :func:`hessian`; see there for the arguments. ``matvec`` takes and
    returns float64 NumPy vectors of length ``n`` (the trainable parameters in
    :attr:`layout` order); ``hvp`` takes and returns flat tensors on
    :attr:`device` in :attr:`torch_dtype`.

    Attributes
    ----------
    layout : ParameterLayout
        Names, shapes and offsets of the parameters in the flat vector.
    dtype : str
        The arithmetic of the products (``"float32"``, ``"float64"``, ...).
    device : str
        Where the products run (``"cpu"``, ``"cuda:0"``).
    hvp_method : str
        How products are computed: ``"cached reverse-over-reverse"`` (the
        default: each batch's gradient graph is built once and every product
        is one backward pass through it), ``"reverse-over-reverse"`` (double
        backward recomputed per product) or ``"forward-over-reverse"``. On the
        CPU, normalisation layers that use batch statistics run as plain tensor
        operations in the products (the same function; its second derivative
        costs less than that of torch's batch-norm kernel).
    cache_batches, cache_bytes, cache_budget : int
        Batches whose gradient graph is held now, the bytes it holds (tensors
        saved for the backward passes, measured as the graph is built), and
        the budget; batches past it are recomputed in every product.
    preconditioned : bool
        True for P^{-1/2} H P^{-1/2}; then ``preconditioner_diagonal`` holds P.
    n_hvps, n_samples
        Products computed (one pass over the data each) and samples per pass.
    """

    framework = "torch"

    def __init__(self, model, loss_fn, data, *, preconditioner, dtype, mode, seed, microbatch_size,
                 reduction, hvp, check_determinism, probe_rtol, l2, params, device, cache=None,
                 distributed=None, process_group=None, shard_basis=False):
        model, group = _unwrap_data_parallel(model, distributed, process_group)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets) -> scalar, got {type(loss_fn).__name__}")
        self.mode = _adapter.check_mode(mode)
        self.reduction = _adapter.check_reduction(reduction)
        if hvp not in _HVP_METHODS:
            raise ValueError(f"hvp must be 'auto', 'forward' or 'reverse', got hvp={hvp!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got seed={seed!r}")
        if microbatch_size is not None and (isinstance(microbatch_size, bool) or not isinstance(microbatch_size, numbers.Integral) or microbatch_size < 1):
            raise ValueError(f"microbatch_size must be a positive integer or None, got microbatch_size={microbatch_size!r}")
        if isinstance(l2, bool) or not isinstance(l2, numbers.Real) or not math.isfinite(float(l2)):
            raise ValueError(f"l2 must be a finite number, got l2={l2!r}")

        named = list(model.named_parameters())
        if params is None:
            chosen = [(k, p) for k, p in named if p.requires_grad]
        else:
            wanted = [params] if isinstance(params, str) else list(params)
            lookup = dict(named)
            missing = [w for w in wanted if w not in lookup]
            if missing:
                raise ValueError(f"params names {missing} are not parameters of the model; it has {list(lookup)[:8]}...")
            chosen = [(k, lookup[k]) for k in wanted]
        if not chosen:
            raise ValueError("the model has no trainable parameters (none with requires_grad=True); pass params= to choose some")
        floating = [p for _, p in chosen if p.is_floating_point()]
        if len(floating) != len(chosen):
            bad = [k for k, p in chosen if not p.is_floating_point()]
            raise TypeError(f"parameters {bad} are not floating point; the Hessian needs real floating-point parameters")
        model_dtype = chosen[0][1].dtype
        self.torch_dtype = _resolve_dtype(dtype, model_dtype)
        self.dtype = _dtype_name(self.torch_dtype)
        dev = torch.device(device) if device is not None else chosen[0][1].device
        self.torch_device = dev
        self.device = str(dev)
        self._cast_data = self.torch_dtype != model_dtype

        sizes = tuple(int(p.numel()) for _, p in chosen)
        self.layout = ParameterLayout(
            names=tuple(k for k, _ in chosen),
            shapes=tuple(tuple(p.shape) for _, p in chosen),
            sizes=sizes,
            offsets=tuple(int(o) for o in np.cumsum((0,) + sizes[:-1])),
        )
        n = self.layout.n
        self.shape = (n, n)

        # Snapshot of everything the products read; the user's tensors are never written.
        with torch.no_grad():
            chosen_ids = {id(p) for _, p in chosen}
            self._params = {k: p.detach().to(dev, self.torch_dtype, copy=True) for k, p in chosen}
            consts = {}
            for k, p in named:
                if id(p) not in chosen_ids and k not in self._params:
                    consts[k] = p.detach().to(dev, self.torch_dtype if (self._cast_data and p.is_floating_point()) else p.dtype, copy=True)
            for k, b in model.named_buffers():
                cast = self._cast_data and b.is_floating_point()
                consts[k] = b.detach().to(dev, self.torch_dtype if cast else b.dtype, copy=True)
        self._consts = consts
        self._module = _structural_copy(model, self.mode)
        self._n_batch_stats, self._n_dropout = _layer_census(self._module, self.mode)
        # Batch statistics through plain tensor operations (see _PlainBatchNorm): measured faster on the CPU only.
        self._plain_batch_norm = self._n_batch_stats > 0 and self.mode != "eval" and dev.type == "cpu"
        self._loss_fn = loss_fn

        _adapter.check_one_shot(data)
        self._data = fixed_batches(data)
        self._single = _is_pair(data)
        if not self._single and isinstance(data, (tuple, list)) and len(data) == 0:
            raise ValueError("data is empty; pass an (inputs, targets) pair or a non-empty iterable of pairs")
        self._microbatch_size = None if microbatch_size is None else int(microbatch_size)
        self.seed = seed
        self.l2 = float(l2)
        self._init_cache(_adapter.cache_budget(cache, lambda: _free_bytes(dev)))
        if hvp == "forward":
            self.hvp_method = "forward-over-reverse"
        elif hvp == "reverse" or self.cache_budget == 0:
            self.hvp_method = "reverse-over-reverse"
        else:
            self.hvp_method = CACHED
        self.fallback_reason = None  # kept for compatibility: products no longer fall back between methods
        self._cache_complete = False  # every batch is cached: passes need not read the data
        # A hook for data parallelism: sums a tensor over processes in place (None: one process).
        self._allreduce: Optional[Callable] = None
        self.comm = None
        if group is not None:
            self._setup_distributed(group, shard_basis)
        elif shard_basis:
            raise ValueError("shard_basis=True needs torch.distributed: pass distributed=True or process_group=")

        self.preconditioned = preconditioner is not None
        self.preconditioner_diagonal = None
        self._scale = None
        if preconditioner is not None:
            P = _preconditioner_diagonal(preconditioner, chosen, self.layout, dev)
            self.preconditioner_diagonal = P  # float64, on the device
            self._scale = torch.rsqrt(P).to(self.torch_dtype)
        self._first_losses: dict = {}  # batch index -> its loss in the first product, for the determinism probe
        super().__init__(check_determinism=check_determinism, probe_rtol=probe_rtol)

    @property
    def function(self) -> str:
        """The loss this operator differentiates, in words: layer modes, dropout, batches.

        E.g. ``"training loss: 2 normalisation layers use each batch's statistics,
        dropout off; 2 fixed batches, 64 samples"``. Every report names it.
        """
        norm = self._n_batch_stats
        layers = f"{norm} normalisation layer{'s' if norm != 1 else ''}"
        if self.mode == "eval":
            text = "eval-mode loss: " + (f"{layers} {'use their' if norm != 1 else 'uses its'} running statistics"
                                         if norm else
                                         "no batch-statistics layers") + ", dropout off"
        else:
            head = "training loss" if self.mode == "batch_stats" else "train-mode loss"
            text = f"{head}: " + (f"{layers} use{'' if norm != 1 else 's'} each batch's statistics" if norm else
                                  "no batch-statistics layers")
            if self.mode == "train" and self._n_dropout:
                text += ", dropout on, " + ("masks seeded" if self.seed is not None else "fresh masks in every product")
            else:
                text += ", dropout off"
            if norm and self._microbatch_size is not None:
                text += f", statistics per microbatch of at most {self._microbatch_size}"
        if self._single:
            where = "1 batch"
        elif isinstance(self._data, FrozenLoader):
            where = (f"{len(self._data)} fixed batches of a "
                     + ("shuffled " if self._data.shuffled else "") + "DataLoader (one epoch, replayed)")
        else:
            where = f"{len(self._data)} batches" if hasattr(self._data, "__len__") else "the data's batches"
        if self.n_samples is not None:
            where += f", {self.n_samples:,} samples"
        return f"{text}; {where}"

    # -- scale-out ---------------------------------------------------------
    def _setup_distributed(self, group, shard_basis: bool):
        """Data parallelism over ``group``: every rank's HVP on its data, summed on the device.

        The local pass runs under :func:`pycurv.distributed.guard`, so a rank that
        raises stops every rank at once instead of leaving them in the all-reduce.
        With ``shard_basis`` this rank also holds only rows [offset, offset + n_local)
        of every Lanczos vector.
        """
        dist = torch.distributed
        backend = dist.get_backend(group)
        self.comm = TorchCommunicator(group if group is not dist.group.WORLD else None,
                                      device=self.torch_device if backend == "nccl" else "cpu")

        def allreduce(total, count):
            self.comm.allreduce_tensor(total)
            c = torch.tensor([float(count)], dtype=torch.float64, device=total.device)
            self.comm.allreduce_tensor(c)
            return total, int(round(float(c.item())))

        self._allreduce = allreduce
        if shard_basis:
            n, size = self.shape[0], self.comm.size
            self._bounds = [shard_bounds(n, size, r) for r in range(size)]
            self.offset, hi = self._bounds[self.comm.rank]
            self.n_local = hi - self.offset

    def _gather(self, v_local):
        """The whole vector from every rank's rows (on the device)."""
        counts = [hi - lo for lo, hi in self._bounds]
        width = max(counts)
        buf = torch.zeros(width, dtype=v_local.dtype, device=v_local.device)
        buf[: v_local.numel()] = v_local
        parts = [torch.empty_like(buf) for _ in counts]
        self.comm.allgather_tensor(parts, buf)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    def matvec(self, x):
        """``A @ x`` for a float64 NumPy vector; with a sharded basis, x and the result are this rank's rows."""
        if getattr(self, "n_local", None) is None:
            return super().matvec(x)
        v = self._gather(guard(self.comm, self._from_numpy, x))
        y = self._product(v)
        return self._to_numpy(y[self.offset: self.offset + self.n_local])

    # -- boundary ----------------------------------------------------------
    def _from_numpy(self, x):
        """float64 NumPy -> flat tensor on the device in the HVP dtype (a view on CPU in float64)."""
        return _as_tensor(x).to(device=self.torch_device, dtype=self.torch_dtype)

    def _to_numpy(self, y) -> np.ndarray:
        return y.detach().to(device="cpu", dtype=torch.float64).numpy()

    def _count_nonfinite(self, y) -> int:
        return int(torch.count_nonzero(~torch.isfinite(y)))

    def _rel_diff(self, a, b) -> float:
        a64, b64 = a.double(), b.double()
        den = float(torch.linalg.vector_norm(a64))
        num = float(torch.linalg.vector_norm(a64 - b64))
        return num / den if den > 0 else (0.0 if num == 0 else math.inf)

    # -- layout helpers ----------------------------------------------------
    def from_vector(self, x) -> Dict[str, Any]:
        """A flat vector (NumPy or tensor) as ``{name: tensor}`` on the device in the HVP dtype."""
        t = x if isinstance(x, torch.Tensor) else _as_tensor(np.asarray(x, dtype=np.float64))
        if t.shape != (self.shape[0],):
            raise ValueError(f"vector must have shape ({self.shape[0]},), got {tuple(t.shape)}")
        t = t.to(device=self.torch_device, dtype=self.torch_dtype)
        return self._unflatten(t)

    def to_vector(self, tensors) -> np.ndarray:
        """``{name: tensor}``, a sequence of tensors in layout order, or a model -> float64 NumPy vector."""
        if isinstance(tensors, torch.nn.Module):
            lookup = dict(tensors.named_parameters())
            tensors = [lookup[k] for k in self.layout.names]
        elif isinstance(tensors, dict):
            missing = [k for k in self.layout.names if k not in tensors]
            if missing:
                raise KeyError(f"to_vector: missing parameters {missing}")
            tensors = [tensors[k] for k in self.layout.names]
        tensors = list(tensors)
        if len(tensors) != len(self.layout.names):
            raise ValueError(f"to_vector needs {len(self.layout.names)} tensors, got {len(tensors)}")
        flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors])
        return flat.numpy()

    def parameters_vector(self) -> np.ndarray:
        """The parameters the Hessian is taken at, flat, as float64."""
        return self.to_vector(self._params)

    def _unflatten(self, flat) -> Dict[str, Any]:
        return {k: piece.view(shape) for k, piece, shape in
                zip(self.layout.names, torch.split(flat, self.layout.sizes), self.layout.shapes)}

    def _flatten(self, tensors: Sequence) -> Any:
        return torch.cat([t.reshape(-1) for t in tensors])

    # -- data --------------------------------------------------------------
    def batches(self) -> Iterator[Tuple[Any, Any, int]]:
        """Yields ``(inputs, targets, n_samples)`` per microbatch, on the device (and in the HVP dtype if cast)."""
        source = [self._data] if self._single else self._data
        for item in source:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(
                    f"each batch must be an (inputs, targets) pair, got {type(item).__name__}"
                    + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
                    + "; for a model with several positional inputs pass [((x1, x2), targets), ...]"
                )
            inputs, targets = item
            pieces = [(inputs, targets)]
            if self._microbatch_size is not None:
                n = _leading(inputs)
                if n is not None and n > self._microbatch_size:
                    pieces = list(zip(_split(inputs, self._microbatch_size), _split(targets, self._microbatch_size)))
            for inp, tgt in pieces:
                inp = _map(inp, self._place)
                tgt = _map(tgt, self._place)
                n_b = _leading(tgt)
                if n_b is None:
                    n_b = _leading(inp)
                yield inp, tgt, (1 if n_b is None else n_b)

    def count_samples(self) -> int:
        """Samples in the data, by one pass that neither computes nor moves anything to the device.

        E.g. the ``weight`` of this rank's operator in
        ``pycurv.distributed.DataParallelOperator(H.matvec, n, comm, weight=H.count_samples())``.
        """
        source = [self._data] if self._single else self._data
        total = 0
        for item in source:
            inputs, targets = item
            n_b = _leading(targets)
            n_b = _leading(inputs) if n_b is None else n_b
            total += 1 if n_b is None else n_b
        return total

    def _place(self, t):
        if self._cast_data and t.is_floating_point():
            return t.to(device=self.torch_device, dtype=self.torch_dtype, non_blocking=True)
        return t.to(device=self.torch_device, non_blocking=True)

    # -- the loss and its derivatives --------------------------------------
    def _loss(self, params: Dict[str, Any], inputs, targets):
        args, kwargs = _call_args(inputs)
        # Attention on the math backend: the fused kernels have no second derivative.
        with _math_attention(), (_PlainBatchNorm() if self._plain_batch_norm else _nullcontext()):
            out = torch.func.functional_call(self._module, (params, self._consts), args, kwargs)
        loss = self._loss_fn(out, targets)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(
                "loss_fn(outputs, targets) must return a scalar tensor, got "
                + (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__)
            )
        return loss.reshape(())

    def _rng(self, index: int):
        """Same dropout masks in every product when mode='train' and seed= is given."""
        if self.mode != "train" or self.seed is None:
            return _nullcontext()
        return _seeded(self.seed + index, self.torch_device)

    def _batch_hvp_forward(self, tangents: Dict[str, Any], inputs, targets):
        _prepare_forward_ad()

        def g(p):
            return torch.func.grad(lambda q: self._loss(q, inputs, targets))(p)

        _, hv = torch.func.jvp(g, (self._params,), (tangents,))
        return [hv[k] for k in self.layout.names]


    def _entry_bytes(self, entry) -> int:
        return entry.nbytes

    @property
    def host_threads(self):
        """torch's intra-op threads when the products run on the CPU (the solver leaves them those cores)."""
        return torch.get_num_threads() if self.torch_device.type == "cpu" else None

    def release(self) -> None:
        super().release()
        self._cache_complete = False

    def _batch_product(self, index: int, tangents, inputs, targets, n_b: int, method: str):
        if method == "forward-over-reverse":
            return self._batch_hvp_forward(tangents, inputs, targets)
        entry = None
        if method == CACHED and not self._bypass_cache:
            entry = self._cached(index, lambda: _Linearised(self, inputs, targets, n_b, measure=True))
        if entry is None:  # not cached: the graph for this product only
            entry = _Linearised(self, inputs, targets, 0, measure=False)
        if self._probed_pass:
            self._first_losses[index] = entry.loss  # what the probe evaluates again
        return entry.product(tangents)

    def default_start(self, seed: int) -> Optional[np.ndarray]:
        """Where :func:`pycurv.lanczos` starts the search for the top eigenvalues when no ``v0`` is given.

        The loss gradient, which the top of a network's Hessian spectrum holds much
        of (Gur-Ari et al. 2018), plus a random vector from ``seed`` of equal norm,
        so that every eigenvector keeps a share; on a BatchNorm convnet it reaches
        λ1 to 1e-4 in about a fifth fewer products than a random start. The
        gradient comes from the graphs the products are then taken on (one
        backward per batch beyond what the first product does). None, for the
        random start, where the products keep no graph, with a preconditioner, a
        GPU or a process group, and where the gradient is zero or not finite.
        """
        if (self.hvp_method != CACHED or self._scale is not None or self.comm is not None
                or self.torch_device.type != "cpu"):
            return None
        total, count = None, 0
        for i, (inputs, targets, n_b) in enumerate(self.batches()):
            with self._rng(i):
                entry = self._cached(i, lambda: _Linearised(self, inputs, targets, n_b, measure=True))
                if entry is None:
                    entry = _Linearised(self, inputs, targets, 0, measure=False)
            flat = torch.zeros(self.shape[0], dtype=torch.float64)
            for j, g in zip(entry.live, entry.grads):
                flat[self.layout.slice(self.layout.names[j])] = g.detach().reshape(-1).to("cpu", torch.float64)
            w = _adapter.batch_weight(self.reduction, n_b)
            total = flat.mul_(w) if total is None else total.add_(flat, alpha=w)
            count += n_b
        if total is None:
            return None
        g = total.numpy()
        norm = float(np.linalg.norm(g))
        if not (np.isfinite(norm) and norm > 0.0):
            return None
        r = np.random.default_rng(seed).standard_normal(g.size)
        return g / norm + r / np.linalg.norm(r)

    def _probe(self, v, y) -> None:
        """After the first product, each batch's loss evaluated again (one forward pass per batch) must
        equal the loss whose graph gave the product: randomness (dropout masks, augmentations) or data
        that change between passes change it. Far cheaper than recomputing the product, which is what
        forward-over-reverse products (no graph kept, no loss recorded) still do."""
        if not self._first_losses:
            return super()._probe(v, y)
        self._check_finite(y)
        first, self._first_losses = [self._first_losses[i] for i in sorted(self._first_losses)], {}
        diff = guard(self.comm, self._loss_difference, first) if self.comm is not None else \
            self._loss_difference(first)
        if self.comm is not None:  # every rank decides alike
            buf = np.array([diff], dtype=np.float64)
            self.comm.allreduce_sum(buf)
            diff = float(buf[0])
        self.last_probe = diff
        if not diff <= self.probe_rtol:  # also catches NaN
            raise NonDeterministicOperatorError(
                f"two evaluations of the loss at the same parameters differ by {diff:.3g} relative (more than the "
                f"{self.probe_rtol:.2g} that {self.dtype} rounding allows; the determinism probe evaluates every "
                f"batch's loss again after the first product): the loss is not a fixed function of the "
                f"parameters. {self._nondeterminism_advice()}"
            )

    def _loss_difference(self, first) -> float:
        """||l2 - l1|| / ||l1|| over the batches' losses l1 (recorded) and l2 (evaluated now)."""
        again = []
        with torch.no_grad():
            for i, (inputs, targets, _) in enumerate(self.batches()):
                with self._rng(i):
                    again.append(self._loss(self._params, inputs, targets).detach())
        if len(again) != len(first):
            return math.inf  # the data yielded another number of batches
        a = torch.stack([t.to(torch.float64) for t in first])
        b = torch.stack([t.to(torch.float64) for t in again])
        den = float(torch.linalg.vector_norm(a))
        num = float(torch.linalg.vector_norm(a - b))
        return num / den if den > 0 else (0.0 if num == 0 else math.inf)

    def _items(self, method: str):
        """``(index, inputs, targets, n_samples)`` per microbatch; once every batch's graph is cached,
        from the cache alone (the data are not read again)."""
        if method == CACHED and self._cache_complete and not self._bypass_cache:
            for i, entry in enumerate(self._cache):
                yield i, None, None, entry.n_samples
            return
        for i, (inputs, targets, n_b) in enumerate(self.batches()):
            yield i, inputs, targets, n_b

    def _pass(self, tangents: Dict[str, Any], method: str):
        total = None
        count = 0
        try:
            for i, inputs, targets, n_b in self._items(method):
                with self._rng(i):
                    parts = self._batch_product(i, tangents, inputs, targets, n_b, method)
                flat = self._flatten(parts)  # a new tensor: scaled in place
                w = _adapter.batch_weight(self.reduction, n_b)
                total = flat.mul_(w) if total is None else total.add_(flat, alpha=w)
                count += n_b
        except (RuntimeError, NotImplementedError) as exc:
            raise _second_derivative_error(exc) from exc
        if total is None:
            raise ValueError("data yielded no batches; pass an (inputs, targets) pair or a non-empty iterable of pairs")
        if method == CACHED and not self._bypass_cache and self._cache and all(e is not None for e in self._cache):
            self._cache_complete = True
        return total, count

    def _local_pass(self, tangents):
        """This process's weighted sum of per-batch HVPs and its sample count."""
        return self._pass(tangents, self.hvp_method)

    def _raw_hvp(self, v):
        """H v (no preconditioning) for a flat tensor on the device in the HVP dtype."""
        tangents = self._unflatten(v)
        if self.comm is not None:
            total, count = guard(self.comm, self._local_pass, tangents)
        else:
            total, count = self._local_pass(tangents)
        if self._allreduce is not None:
            total, count = self._allreduce(total, count)
        if self.n_samples is not None and count != self.n_samples:
            raise ValueError(
                f"the data changed size between passes ({self.n_samples} then {count} samples); every product "
                "must see the same data set (a DataLoader with drop_last=True and shuffle=True does not)"
            )
        self.n_samples = count
        total = total.div_(count)
        if self.l2:
            total = total.add_(v, alpha=self.l2)
        return total

    def hvp(self, v):
        """``A v`` for a flat tensor ``v`` (on :attr:`device`, in :attr:`torch_dtype`); counts in ``n_hvps``.

        A = H, or P^{-1/2} H P^{-1/2} when preconditioned; H is the Hessian of the
        mean loss over all samples (plus ``l2`` times the identity).
        """
        with torch.no_grad():
            if self._scale is not None:
                out = self._raw_hvp(v * self._scale) * self._scale
            else:
                out = self._raw_hvp(v)
        self.n_hvps += 1
        return out

    # -- per-batch quantities (gradient noise, curvature variance) ---------
    def batch_gradients(self) -> Iterator[Tuple[int, Any]]:
        """Yields ``(n_samples, flat gradient)`` of each microbatch's loss (P^{-1/2} g when preconditioned)."""
        for i, (inputs, targets, n_b) in enumerate(self.batches()):
            with self._rng(i):
                g = torch.func.grad(lambda q: self._loss(q, inputs, targets))(self._params)
            flat = self._flatten([g[k] for k in self.layout.names]).detach()
            if self.reduction == "sum":
                flat = flat / n_b
            if self._scale is not None:
                flat = flat * self._scale
            yield n_b, flat

    def batch_hvps(self, v) -> Iterator[Tuple[int, Any]]:
        """Yields ``(n_samples, flat A_b v)`` per microbatch, A_b the Hessian of that batch's mean loss."""
        x = v * self._scale if self._scale is not None else v
        tangents = self._unflatten(x)
        for i, inputs, targets, n_b in self._items(self.hvp_method):
            with torch.no_grad(), self._rng(i):
                try:
                    parts = self._batch_product(i, tangents, inputs, targets, n_b, self.hvp_method)
                except (RuntimeError, NotImplementedError) as exc:
                    raise _second_derivative_error(exc) from exc
                flat = self._flatten(parts)
                if self.reduction == "sum":
                    flat = flat / n_b
                if self.l2:
                    flat = flat.add(x, alpha=self.l2)
                if self._scale is not None:
                    flat = flat * self._scale
            yield n_b, flat

    def loss(self) -> float:
        """The mean loss over the data at the snapshot parameters."""
        total, count = 0.0, 0
        with torch.no_grad():
            for i, (inputs, targets, n_b) in enumerate(self.batches()):
                with self._rng(i):
                    val = float(self._loss(self._params, inputs, targets))
                total += val * n_b if self.reduction == "mean" else val
                count += n_b
        return total / count

    def _nondeterminism_advice(self) -> str:
        causes = []
        if self.mode == "train" and self._n_dropout and self.seed is None:
            layers = f"{self._n_dropout} dropout layer" + ("s" if self._n_dropout != 1 else "")
            causes.append(f"dropout is on (mode='train', {layers}) with fresh masks in "
                          "every product: pass seed= to draw the same masks each time, or use "
                          "mode='batch_stats' (dropout off)")
        if isinstance(self._data, FrozenLoader):
            causes.append("the DataLoader's batches are replayed with the same samples and torch RNG seeds, so "
                          "its dataset draws random numbers elsewhere (augmentations using numpy or random): "
                          "make them deterministic or pass precomputed batches")
        elif not self._single and not isinstance(self._data, (list, tuple)):
            causes.append(f"the data ({type(self._data).__name__}) yields different batches in each pass "
                          "(an IterableDataset, or shuffling): pass a list of batches")
        if self.torch_device.type == "cuda":
            causes.append("non-deterministic GPU kernels (atomic adds): raise probe_rtol=, or compute in float64")
        if not causes:
            causes.append("the model or loss_fn draws random numbers or keeps state between calls")
        return ("Likely cause: " + "; or ".join(causes)
                + ". Pass check_determinism=False to accept the difference.")

    def __repr__(self) -> str:
        kind = "P^-1/2 H P^-1/2" if self.preconditioned else "H"
        return (f"<pycurv.torch.HessianOperator {kind} n={self.shape[0]} dtype={self.dtype} device={self.device} "
                f"mode={self.mode!r} hvp={self.hvp_method!r} cache={self.cache_batches} batches, "
                f"{self.cache_bytes / 2**20:.1f} MiB hvps={self.n_hvps}>")


CACHED = "cached reverse-over-reverse"


class _Linearised:
    """One batch's loss and gradient with its autograd graph kept: each product is one backward pass.

    H v = d(g · v)/dθ = ``torch.autograd.grad(g, θ, grad_outputs=v, retain_graph=True)``
    with g = ∇L built once with ``create_graph=True``. ``nbytes`` counts the
    tensors the graph saves for its backward passes (activations, the batch,
    the gradient), each storage once, not the parameters themselves: read off
    the graph once it is built (saved-tensor hooks would put a Python call on
    every saved tensor of every later product).
    """

    __slots__ = ("names", "leaves", "grads", "live", "n_samples", "nbytes", "loss")

    def __init__(self, op, inputs, targets, n_samples: int, *, measure: bool):
        self.n_samples = n_samples
        self.names = names = op.layout.names
        with torch.enable_grad():
            ps = {k: v.detach().requires_grad_(True) for k, v in op._params.items()}
            leaves = [ps[k] for k in names]
            loss = op._loss(ps, inputs, targets)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        self.loss = loss.detach()
        self.live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.leaves = leaves
        self.grads = [grads[i] for i in self.live]
        self.nbytes = _graph_bytes(self.grads, exclude=op._params.values()) if measure else 0

    def product(self, tangents: Dict[str, Any]) -> list:
        if not self.live:
            return [torch.zeros_like(v) for v in self.leaves]
        with torch.enable_grad():
            out = torch.autograd.grad(self.grads, self.leaves, grad_outputs=[tangents[self.names[i]] for i in self.live],
                                      retain_graph=True, allow_unused=True)
        return [torch.zeros_like(v) if o is None else o for o, v in zip(out, self.leaves)]


_SAVED_NAMES: Dict[type, Tuple[str, ...]] = {}


def _graph_bytes(roots, exclude) -> int:
    """Bytes of the distinct storages that the autograd graph behind ``roots`` saves (and of the roots)."""
    storages: Dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta":
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()

    for g in roots:
        add(g)
    seen = set()
    stack = [g.grad_fn for g in roots if g.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names = _SAVED_NAMES.get(type(fn))
        if names is None:
            names = _SAVED_NAMES[type(fn)] = tuple(a for a in dir(fn) if a.startswith("_saved_"))
        for name in names:
            try:
                value = getattr(fn, name)
            except (RuntimeError, AttributeError):  # freed, or not a tensor
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                add(t)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    for t in exclude:
        storages.pop(t.untyped_storage().data_ptr(), None)
    return int(sum(storages.values()))


def _free_bytes(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return _adapter.host_free_bytes()


def _math_attention():
    """Scaled-dot-product attention on its math backend (twice differentiable), where torch has the switch."""
    attention = getattr(torch.nn, "attention", None)
    if attention is None or not hasattr(attention, "sdpa_kernel"):  # pragma: no cover - old torch
        return _nullcontext()
    return attention.sdpa_kernel([attention.SDPBackend.MATH])


def _batch_norm_args(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                     eps=1e-5):
    return input, weight, bias, training, eps


class _PlainBatchNorm(torch.overrides.TorchFunctionMode):
    """``F.batch_norm`` with batch statistics as plain tensor operations, in float32 and float64.

    The same function (the biased variance of each channel over the batch and
    the spatial dimensions; on the convnet of bench/test_bench_peers.py the
    products agree with torch's kernel to 1e-6 in float32, and values and
    derivatives to 1e-12 in float64 in the tests), with a cheaper second derivative: torch differentiates its
    batch-norm backward kernel by a composite formula of many passes over the
    activations. On that convnet on the CPU the backward pass through the
    gradient graph is 10-15% faster, pycurv's products 5-8% (interleaved); on
    a GPU torch's fused kernels are kept until measured there. The price is
    memory: the gradient graph keeps more activation-sized tensors (the
    convnet's cached graph holds 25 MiB instead of 15), which ``cache_bytes``
    reports and the cache budget counts. Running statistics are not updated
    (the operator's snapshot of them is never read in batch-statistics mode).
    Other dtypes, eval mode and anything else go to torch.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.batch_norm:
            x, weight, bias, training, eps = _batch_norm_args(*args, **kwargs)
            if (training and isinstance(x, torch.Tensor) and x.dtype in (torch.float32, torch.float64)
                    and x.dim() >= 2 and x.numel() > x.shape[1]):
                dims = [0] + list(range(2, x.dim()))
                shape = [1, -1] + [1] * (x.dim() - 2)
                centred = x - x.mean(dims, keepdim=True)
                scale = torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)
                if weight is not None:
                    scale = scale * weight.reshape(shape)
                if bias is None:
                    return centred * scale
                return torch.addcmul(bias.reshape(shape), centred, scale)
        return func(*args, **kwargs)


def _second_derivative_error(exc):
    """An autograd error naming an operation without a second derivative, said in pycurv's words."""
    import re

    text = str(exc)
    m = re.search(r"derivative for (\S+) is not implemented", text)
    if not m:
        return exc
    return RuntimeError(
        f"the loss uses {m.group(1)}, which has no derivative of the order a Hessian-vector product needs: "
        f"torch cannot differentiate it twice. Replace that operation with a twice-differentiable one (for "
        f"attention, torch.nn.functional.scaled_dot_product_attention or an eager implementation, e.g. "
        f"attn_implementation='eager' in transformers), or pass hvp='forward' or hvp='reverse' to try the other "
        f"way of forming the product. torch said: {text.splitlines()[0]}"
    )


def _as_tensor(x):
    """A zero-copy tensor view of a (possibly read-only) NumPy array.

    DLPack carries the read-only flag without the warning ``torch.as_tensor``
    gives; NumPy versions that cannot export read-only arrays get a copy.
    """
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.from_dlpack(x)
    except (BufferError, TypeError, RuntimeError):
        return torch.from_numpy(np.array(x, dtype=np.float64, copy=True))


_FORWARD_AD_READY = False


def _prepare_forward_ad():
    """Loads torch's forward-mode decompositions once, without their DeprecationWarning.

    The first forward-mode product imports ``torch._decomp.decompositions_for_jvp``,
    which calls the deprecated ``torch.jit.script`` internally; under
    ``-W error`` that import would fail half-way. It is torch's warning, not the user's.
    """
    global _FORWARD_AD_READY
    if _FORWARD_AD_READY:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fwAD = torch.autograd.forward_ad
        with fwAD.dual_level():
            fwAD.make_dual(torch.zeros(1), torch.zeros(1))
    _FORWARD_AD_READY = True


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _seeded:
    """Forks torch's RNG, seeds it, and restores it on exit (the user's RNG stream is untouched)."""

    def __init__(self, seed: int, device):
        self.seed = seed
        self.devices = [device] if device.type == "cuda" else []

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


def _layer_census(module, mode: str) -> Tuple[int, int]:
    """(normalisation layers whose statistics depend on ``mode``, dropout layers active) of a prepared copy.

    In eval mode the first count is of the layers that hold running statistics
    (and use them); otherwise of every batch/instance-norm layer (they normalise
    by the batch's own statistics).
    """
    norm_base = torch.nn.modules.batchnorm._NormBase
    norms = [m for m in module.modules() if isinstance(m, norm_base)]
    if mode == "eval":
        norms = [m for m in norms if getattr(m, "running_mean", None) is not None]
    dropout = sum(1 for m in module.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training)
    return len(norms), dropout


def _structural_copy(model, mode: str):
    """A copy of the module tree that shares its tensors with ``model``, with training flags set by ``mode``.

    ``torch.func.functional_call`` swaps our own parameter and buffer copies into
    it for each call, so the user's module is never touched, not even temporarily.
    """
    memo = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    try:
        module = copy.deepcopy(model, memo)
    except Exception as exc:  # noqa: BLE001 - any failure to copy is reported the same way
        raise TypeError(
            f"pycurv.torch could not copy the module structure of {type(model).__name__} ({exc}); "
            "the model must support copy.deepcopy"
        ) from exc
    module.train(mode == "train")
    norm_base = torch.nn.modules.batchnorm._NormBase
    for m in module.modules():
        if isinstance(m, norm_base) and mode in ("batch_stats", "train"):
            # Batch statistics without updating running statistics.
            m.train(True)
            m.track_running_stats = False
    return module
