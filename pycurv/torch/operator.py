"""Hessians of PyTorch losses as pycurv operators.

``hessian(model, loss_fn, data)`` returns an operator whose ``matvec`` is the
Hessian-vector product of the mean loss over ``data`` with respect to the
model's trainable parameters, for :func:`pycurv.lanczos` and
:func:`pycurv.sharpness`::

    import pycurv, pycurv.torch
    H = pycurv.torch.hessian(model, torch.nn.functional.cross_entropy, (x, y))
    lam1 = pycurv.sharpness(H, tol=1e-6, seed=0)

Products are forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``
through ``torch.func.functional_call``), falling back to reverse-over-reverse
(double backward) where an operation has no forward-mode derivative. They run
on the model's device, in the model's dtype unless ``dtype=`` says otherwise;
only the float64 Lanczos vector crosses to the host.

The model, its buffers and any optimizer passed are never modified: the
products use a copy of the parameters and buffers taken when the operator is
built, and a structural copy of the module whose training flags are set by
``mode`` (the parameter tensors are shared with it, not copied twice).
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ._optional import require

torch = require("torch", "pycurv.torch")

from . import _adapter  # noqa: E402
from ._adapter import HVPOperator  # noqa: E402

__all__ = [
    "hessian",
    "sharpness",
    "stability_report",
    "HessianOperator",
    "ParameterLayout",
    "adam_preconditioner",
    "rmsprop_preconditioner",
    "Tracker",
]

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


# ---------------------------------------------------------------------------
# data


def _is_tensor_like(x) -> bool:
    return isinstance(x, torch.Tensor) or isinstance(x, dict)


def _is_pair(data) -> bool:
    """An ``(inputs, targets)`` pair: a 2-tuple/list whose first item is a tensor or a dict of inputs."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and _is_tensor_like(data[0])


def _map(x, fn):
    """Applies fn to every tensor in a nested tuple/list/dict."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_map(v, fn) for v in x)
    return x


def _leading(x) -> Optional[int]:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() > 0 else None
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        for v in x:
            n = _leading(v)
            if n is not None:
                return n
    return None


def _split(x, size: int):
    """Splits every tensor of a nested structure along dim 0 into chunks of ``size``."""
    n = _leading(x)
    if n is None:
        return [x]
    starts = range(0, n, size)
    return [_map(x, lambda t, s=s: t[s:s + size] if t.dim() > 0 and t.shape[0] == n else t) for s in starts]


def _call_args(inputs):
    """How inputs are passed to the model: a tensor as one argument, a dict as keywords."""
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


# ---------------------------------------------------------------------------
# the operator


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
        ``"forward-over-reverse"`` or ``"reverse-over-reverse"`` (set by the
        first product when ``hvp="auto"``); ``fallback_reason`` says why.
    preconditioned : bool
        True for P^{-1/2} H P^{-1/2}; then ``preconditioner_diagonal`` holds P.
    n_hvps, n_samples
        Products computed (one pass over the data each) and samples per pass.
    """

    framework = "torch"

    def __init__(self, model, loss_fn, data, *, preconditioner, dtype, mode, seed, microbatch_size,
                 reduction, hvp, check_determinism, probe_rtol, l2, params, device,
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
        self._loss_fn = loss_fn

        _adapter.check_one_shot(data)
        self._data = data
        self._single = _is_pair(data)
        if not self._single and isinstance(data, (tuple, list)) and len(data) == 0:
            raise ValueError("data is empty; pass an (inputs, targets) pair or a non-empty iterable of pairs")
        self._microbatch_size = None if microbatch_size is None else int(microbatch_size)
        self.seed = seed
        self.l2 = float(l2)
        self._hvp_choice = hvp
        self.hvp_method = {"forward": "forward-over-reverse", "reverse": "reverse-over-reverse"}.get(hvp)
        self.fallback_reason = None
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
        super().__init__(check_determinism=check_determinism, probe_rtol=probe_rtol)

    # -- scale-out ---------------------------------------------------------
    def _setup_distributed(self, group, shard_basis: bool):
        """Data parallelism over ``group``: every rank's HVP on its data, summed on the device.

        The local pass runs under :func:`pycurv.distributed.guard`, so a rank that
        raises stops every rank at once instead of leaving them in the all-reduce.
        With ``shard_basis`` this rank also holds only rows [offset, offset + n_local)
        of every Lanczos vector.
        """
        from .distributed import TorchCommunicator, shard_bounds

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
        from .distributed import guard

        v = self._gather(guard(self.comm, self._from_numpy, x))
        y = self._product(v)
        return self._to_numpy(y[self.offset: self.offset + self.n_local])

    # -- boundary ----------------------------------------------------------
    def _from_numpy(self, x):
        """float64 NumPy -> flat tensor on the device in the HVP dtype (a view on CPU in float64)."""
        return _as_tensor(x).to(device=self.torch_device, dtype=self.torch_dtype)

    def _to_numpy(self, y) -> np.ndarray:
        return y.detach().to(device="cpu", dtype=torch.float64).numpy()

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

    def _batch_hvp_reverse(self, tangents: Dict[str, Any], inputs, targets):
        with torch.enable_grad():
            ps = {k: v.detach().requires_grad_(True) for k, v in self._params.items()}
            loss = self._loss(ps, inputs, targets)
            leaves = [ps[k] for k in self.layout.names]
            gs = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            pairs = [(g, v, t) for g, v, t in zip(gs, leaves, (tangents[k] for k in self.layout.names))]
            live = [i for i, (g, _, _) in enumerate(pairs) if g is not None and g.requires_grad]
            hv = [torch.zeros_like(v) for v in leaves]
            if live:
                out = torch.autograd.grad([pairs[i][0] for i in live], leaves,
                                          grad_outputs=[pairs[i][2] for i in live], allow_unused=True)
                hv = [torch.zeros_like(v) if o is None else o for o, v in zip(out, leaves)]
        return [h.detach() for h in hv]

    def _pass(self, tangents: Dict[str, Any], method: str):
        total = None
        count = 0
        for i, (inputs, targets, n_b) in enumerate(self.batches()):
            with self._rng(i):
                if method == "forward-over-reverse":
                    parts = self._batch_hvp_forward(tangents, inputs, targets)
                else:
                    parts = self._batch_hvp_reverse(tangents, inputs, targets)
            flat = self._flatten(parts)
            w = _adapter.batch_weight(self.reduction, n_b)
            total = flat * w if total is None else total.add_(flat, alpha=w)
            count += n_b
        if total is None:
            raise ValueError("data yielded no batches; pass an (inputs, targets) pair or a non-empty iterable of pairs")
        return total, count

    def _local_pass(self, tangents):
        """This process's weighted sum of per-batch HVPs and its sample count."""
        if self.hvp_method is None:  # hvp="auto", first product
            try:
                out = self._pass(tangents, "forward-over-reverse")
                self.hvp_method = "forward-over-reverse"
            except (RuntimeError, NotImplementedError) as exc:
                out = self._pass(tangents, "reverse-over-reverse")
                self.hvp_method = "reverse-over-reverse"
                self.fallback_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return out
        return self._pass(tangents, self.hvp_method)

    def _raw_hvp(self, v):
        """H v (no preconditioning) for a flat tensor on the device in the HVP dtype."""
        tangents = self._unflatten(v)
        if self.comm is not None:
            from .distributed import guard

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
        total = total / count
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
        method = self.hvp_method or "forward-over-reverse"
        x = v * self._scale if self._scale is not None else v
        tangents = self._unflatten(x)
        for i, (inputs, targets, n_b) in enumerate(self.batches()):
            with torch.no_grad(), self._rng(i):
                if method == "forward-over-reverse":
                    try:
                        parts = self._batch_hvp_forward(tangents, inputs, targets)
                    except (RuntimeError, NotImplementedError):
                        method = "reverse-over-reverse"
                        parts = self._batch_hvp_reverse(tangents, inputs, targets)
                else:
                    parts = self._batch_hvp_reverse(tangents, inputs, targets)
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

    def __repr__(self) -> str:
        kind = "P^-1/2 H P^-1/2" if self.preconditioned else "H"
        return (f"<pycurv.torch.HessianOperator {kind} n={self.shape[0]} dtype={self.dtype} device={self.device} "
                f"mode={self.mode!r} hvps={self.n_hvps}>")


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


# ---------------------------------------------------------------------------
# preconditioners


def _scalar(x) -> float:
    return float(x.item() if isinstance(x, torch.Tensor) else x)


def _is_adam_like(opt) -> bool:
    return (hasattr(opt, "param_groups") and hasattr(opt, "state")
            and all("betas" in g and "eps" in g for g in opt.param_groups))


def adam_preconditioner(optimizer, params: Optional[Sequence] = None, *, names: Optional[Sequence[str]] = None):
    """Adam's preconditioner P = (1 - beta1^t) * (sqrt(v_hat) + eps), flat, float64.

    v_hat = exp_avg_sq / (1 - beta2^t) (``max_exp_avg_sq`` with ``amsgrad=True``),
    t the optimizer's step count: Adam's update is then theta -= lr * P^{-1} m with
    m the first-moment EMA, so the preconditioned Hessian P^{-1/2} H P^{-1/2} is
    stable below (2 + 2 beta1) / ((1 - beta1) lr) = 38 / lr at beta1 = 0.9
    (Kalra & Barkeshli 2024, eq. 6; Cohen et al. 2022). Parameters in groups
    whose ``lr`` differs from group 0's are scaled by lr_0 / lr_g, so that group
    0's threshold applies to the whole operator.

    Parameters
    ----------
    optimizer : torch.optim.Adam or torch.optim.AdamW (or an optimizer with the same state)
    params : sequence of tensors, optional
        The parameters, in the order of the flat vector (default: every
        parameter of the optimizer, in group order).
    names : sequence of str, optional
        Names of ``params`` for error messages.

    Returns
    -------
    torch.Tensor
        The diagonal of P, float64, on the parameters' device.
    """
    if not _is_adam_like(optimizer):
        raise TypeError(
            f"preconditioner must be a torch.optim.Adam, AdamW or RMSprop, or a 1-D tensor holding the "
            f"diagonal of P; got {type(optimizer).__name__}"
        )
    beta1_0 = _scalar(optimizer.param_groups[0]["betas"][0])

    def diagonal(g, st):
        b1, b2 = (_scalar(b) for b in g["betas"])
        if b1 != beta1_0:
            raise ValueError(
                f"parameter groups have different beta1 ({beta1_0} and {b1}); one threshold "
                "(2 + 2 beta1) / ((1 - beta1) lr) cannot cover them"
            )
        t = _scalar(st["step"])
        v = st["max_exp_avg_sq"] if g.get("amsgrad", False) else st["exp_avg_sq"]
        v_hat = v.detach().to(torch.float64).reshape(-1) / (1.0 - b2**t)
        return (1.0 - b1**t) * (torch.sqrt(v_hat) + _scalar(g["eps"]))

    return _per_parameter_diagonal(optimizer, params, names, "exp_avg_sq", diagonal)


def _is_rmsprop_like(opt) -> bool:
    return (hasattr(opt, "param_groups") and hasattr(opt, "state")
            and all("alpha" in g and "eps" in g for g in opt.param_groups))


def rmsprop_preconditioner(optimizer, params: Optional[Sequence] = None, *, names: Optional[Sequence[str]] = None):
    """RMSprop's preconditioner P = sqrt(v) + eps (v - g_avg^2 with ``centered=True``), flat, float64.

    PyTorch's RMSprop divides the gradient by P without bias correction; its
    stability bound is on λ1(P^{-1/2} H P^{-1/2}) (see :mod:`pycurv.stability`).
    Groups with another ``lr`` than group 0's are rescaled as in :func:`adam_preconditioner`.
    """
    if not _is_rmsprop_like(optimizer):
        raise TypeError(f"expected a torch.optim.RMSprop (param_groups with 'alpha' and 'eps'), got {type(optimizer).__name__}")

    def diagonal(g, st):
        v = st["square_avg"].detach().to(torch.float64).reshape(-1)
        if g.get("centered", False):
            v = v - st["grad_avg"].detach().to(torch.float64).reshape(-1) ** 2
        return torch.sqrt(v) + _scalar(g["eps"])

    return _per_parameter_diagonal(optimizer, params, names, "square_avg", diagonal)


def _per_parameter_diagonal(optimizer, params, names, state_key: str, diagonal: Callable):
    """Concatenates diagonal(group, state) over params (default: every optimised
    parameter, in group order), each scaled by lr_0 / lr of its group."""
    group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
    if params is None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
    params = list(params)
    names = list(names) if names is not None else [f"parameter {i}" for i in range(len(params))]
    kind = type(optimizer).__name__
    lr0 = _scalar(optimizer.param_groups[0]["lr"])
    parts = []
    for name, p in zip(names, params):
        if id(p) not in group_of:
            raise ValueError(f"{name} is not optimised by the {kind} passed as preconditioner")
        g = optimizer.param_groups[group_of[id(p)]]
        st = optimizer.state.get(p, {})
        if state_key not in st or _scalar(st.get("step", 0)) < 1:
            raise ValueError(
                f"the {kind} passed as preconditioner has taken no step yet (no {state_key} for {name}); "
                f"its preconditioner exists after the first optimizer.step()"
            )
        P = diagonal(g, st)
        lr = _scalar(g["lr"])
        if lr != lr0:
            if lr <= 0:
                raise ValueError(f"parameter group of {name} has lr={lr}; the preconditioned operator needs lr > 0")
            P = P * (lr0 / lr)
        parts.append(P)
    return torch.cat(parts)


def _preconditioner_diagonal(pre, chosen, layout: ParameterLayout, device):
    if isinstance(pre, (torch.Tensor, np.ndarray)):
        P = torch.as_tensor(pre).to(device=device, dtype=torch.float64).reshape(-1)
        if P.numel() != layout.n:
            raise ValueError(f"preconditioner diagonal must have {layout.n} entries (one per parameter), got {P.numel()}")
    elif _is_rmsprop_like(pre) and not _is_adam_like(pre):
        P = rmsprop_preconditioner(pre, [p for _, p in chosen], names=[k for k, _ in chosen]).to(device)
    else:
        P = adam_preconditioner(pre, [p for _, p in chosen], names=[k for k, _ in chosen]).to(device)
    if not bool(torch.all(torch.isfinite(P))) or not bool(torch.all(P > 0)):
        bad = int(torch.count_nonzero(~(torch.isfinite(P) & (P > 0))))
        raise ValueError(f"the preconditioner diagonal must be finite and > 0; {bad} entries are not (is eps = 0?)")
    return P


# ---------------------------------------------------------------------------
# public functions


def hessian(
    model,
    loss_fn: Callable,
    data,
    *,
    preconditioner=None,
    dtype=None,
    mode: str = "eval",
    seed: Optional[int] = None,
    microbatch_size: Optional[int] = None,
    reduction: str = "mean",
    hvp: str = "auto",
    check_determinism: bool = True,
    probe_rtol: Optional[float] = None,
    l2: float = 0.0,
    params: Optional[Sequence[str]] = None,
    device=None,
    distributed: Optional[bool] = None,
    process_group=None,
    shard_basis: bool = False,
) -> HessianOperator:
    """The Hessian of ``loss_fn`` over ``data`` at ``model``'s parameters, as a pycurv operator.

    Parameters
    ----------
    model : torch.nn.Module
        Called as ``model(inputs)`` (``model(*inputs)`` for a tuple, ``model(**inputs)``
        for a dict). Never modified.
    loss_fn : callable
        ``loss_fn(outputs, targets) -> scalar tensor``, the mean over the batch
        (``reduction="mean"``, e.g. ``torch.nn.functional.cross_entropy``) or the sum
        (``reduction="sum"``).
    data : (inputs, targets) or iterable of (inputs, targets)
        One batch, or several (a list, a DataLoader; not a one-shot generator).
        A single batch is a 2-tuple/list whose first item is a tensor or a dict.
        The loss is the mean over *all samples*: batches are weighted by their
        size. Batches are moved to the model's device one at a time, so data
        larger than device memory works.
    preconditioner : torch.optim.Adam / AdamW / RMSprop, or 1-D tensor, optional
        Gives the symmetric P^{-1/2} H P^{-1/2} instead of H: from the optimizer's
        state (see :func:`adam_preconditioner`, :func:`rmsprop_preconditioner`) or
        the diagonal of P given directly. For Adam compare its top eigenvalue with
        (2 + 2 beta1) / ((1 - beta1) lr).
    dtype : torch.dtype or str, optional
        Arithmetic of the products; default the model's dtype. ``"float64"``
        casts a copy of the parameters, buffers and floating-point data.
    mode : {"eval", "batch_stats", "train"}
        ``"eval"`` (default): every layer in eval mode (dropout off, batch norm
        uses running statistics). ``"batch_stats"``: normalisation layers use
        each batch's statistics, the rest in eval mode. ``"train"``: every layer
        in training mode, dropout on. Running statistics are never updated.
    seed : int, optional
        With ``mode="train"``, draws the same dropout masks in every product
        (seed + batch index; the global RNG is restored afterwards). Without it
        dropout makes each product different and the determinism probe raises.
    microbatch_size : int, optional
        Splits each batch into chunks of this many samples (less memory; with
        batch statistics, each chunk normalises by its own statistics).
    reduction : {"mean", "sum"}
        What ``loss_fn`` does over a batch; either way the operator is the
        Hessian of the mean loss over all samples.
    hvp : {"auto", "forward", "reverse"}
        ``"auto"`` tries forward-over-reverse on the first product and falls back
        to reverse-over-reverse if an operation lacks forward-mode support
        (e.g. ``F.mse_loss``, pytorch#123996); ``hvp_method`` records the choice.
    check_determinism : bool
        Computes the first product twice and raises
        :class:`pycurv.NonDeterministicOperatorError` if the two differ by more
        than ``probe_rtol`` (default 1000 unit roundoffs of ``dtype``). Costs
        one extra product. :meth:`HessianOperator.check_determinism` runs it on demand.
    l2 : float
        Adds ``l2 * v`` (the Hessian of ``l2/2 * ||theta||^2``; torch's coupled
        ``weight_decay``).
    params : sequence of str, optional
        Names of the parameters to differentiate (default: all with ``requires_grad``).
    device : torch.device or str, optional
        Where the products run (default: the parameters' device).
    distributed : bool, optional
        Data parallelism over ``torch.distributed`` (default group, or
        ``process_group``): each rank passes *its shard* of the data; the products
        are summed over ranks on the device (gloo on CPU, NCCL on GPU), so every
        rank gets the Hessian of the mean loss over the union of the shards and
        :func:`pycurv.lanczos` takes identical steps everywhere (rank 0's seed and
        ``v0``). Default: on for a model wrapped in ``DistributedDataParallel``
        (its process group), off otherwise. A rank whose product raises makes
        every rank raise (:class:`pycurv.distributed.PeerError` on the others).
    process_group : torch.distributed.ProcessGroup, optional
        The group for ``distributed`` (implies ``distributed=True``).
    shard_basis : bool
        Each rank holds only its rows of every Lanczos vector (an even split of
        the flat parameter vector): basis memory 8 (n / ranks) (ncv + 1) bytes per
        rank instead of 8 n (ncv + 1); dot products are summed through the
        core's REDUCE requests, and ``matvec`` gathers the whole vector for each
        product. The eigenvectors returned are this rank's rows.

    Returns
    -------
    HessianOperator
        ``shape == (n, n)``, ``dtype`` the products' arithmetic, ``exact=False``.
        Memory: one copy of the parameters and buffers, plus the products' own.
    """
    return HessianOperator(model, loss_fn, data, preconditioner=preconditioner, dtype=dtype, mode=mode, seed=seed,
                           microbatch_size=microbatch_size, reduction=reduction, hvp=hvp,
                           check_determinism=check_determinism, probe_rtol=probe_rtol, l2=l2, params=params,
                           device=device, distributed=distributed, process_group=process_group,
                           shard_basis=shard_basis)


def sharpness(model, loss_fn: Callable, data, *, tol: Optional[float] = None, seed: int = 0, v0=None,
              max_matvecs: Optional[int] = None, progress: Optional[bool] = None, **hessian_kwargs) -> float:
    """The largest algebraic eigenvalue of :func:`hessian` (``preconditioner=`` for Adam's).

    ``tol`` defaults to what the products' dtype can reach (1e-6 in float64,
    2.4e-4 in float32). Raises :class:`pycurv.NoConvergence` if it is not met.
    ``progress`` shows a progress line on stderr (default: when stderr is a terminal).
    """
    from ._progress import measure_top

    op = hessian(model, loss_fn, data, **hessian_kwargs)
    res = measure_top(op, tol=tol, seed=seed, v0=v0, max_matvecs=max_matvecs, progress=progress)
    if not res.converged:
        from .errors import NoConvergence

        raise NoConvergence(res.message, result=res)
    return float(res.eigenvalues[0])


def stability_report(model, loss_fn: Callable, data, optimizer, *, tol: Optional[float] = None, seed: int = 0,
                     progress: Optional[bool] = None, group: int = 0, **hessian_kwargs):
    """Sharpness against ``optimizer``'s stability threshold, in one call.

    For Adam/AdamW and RMSprop the preconditioned sharpness (the optimizer is
    the preconditioner; their coupled ``weight_decay`` is added to H) is compared
    with their threshold, e.g. (2 + 2 beta1) / ((1 - beta1) lr) for Adam; for SGD
    (with or without momentum) the sharpness (see :mod:`pycurv.stability`). Returns a
    :class:`pycurv.stability.MarginReport` (``value``, ``threshold``, ``margin``,
    ``stable``, ``quantity``); its ``text`` reads like ``"λ1 = 19.7 is at 0.99 of 2/η = 20"``.
    """
    from .stability import margin_report, threshold_from_optimizer
    from ._progress import measure_top

    from .track import operator_options

    thr = threshold_from_optimizer(optimizer, group=group)
    for key, value in operator_options(thr, optimizer).items():
        hessian_kwargs.setdefault(key, value)
    op = hessian(model, loss_fn, data, **hessian_kwargs)
    res = measure_top(op, tol=tol, seed=seed, progress=progress)
    return margin_report(float(res.eigenvalues[0]), thr)


from .track import TorchTracker as Tracker  # noqa: E402  (the tracker needs hessian() above)
