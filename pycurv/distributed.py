"""Lanczos across processes.

Two layouts, one solver (:func:`pycurv.lanczos`):

* **replicated basis** (data parallel): every rank holds whole Lanczos vectors
  and the operator's ``matvec`` returns the same ``A @ x`` on every rank (for
  a Hessian: each rank's HVP on its shard of the data, averaged by an
  all-reduce). Every rank then takes identical steps; the seed and ``v0`` of
  rank 0 are used everywhere. Basis memory per rank: 8 n (ncv + 1) bytes.
* **sharded basis**: rank r holds rows ``[offset, offset + n_local)`` of every
  Lanczos vector; ``matvec`` maps the local rows of x to the local rows of
  A x (gathering what it needs itself), and the core's dot products are summed
  over ranks through its REDUCE requests. Basis memory per rank:
  8 (n / ranks) (ncv + 1) bytes.

An operator opts in by carrying ``comm`` (a :class:`Communicator`) and, when
sharded, ``n_local`` and ``offset``. Errors never leave ranks hanging: before
any collective that follows user code, ranks exchange a failure flag
(:func:`guard`), so an exception on one rank becomes that exception there and
a :class:`PeerError` everywhere else. A rank that dies outright is caught by the
process group's own timeout (``torch.distributed.init_process_group(timeout=...)``).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np

from .errors import PycurvError
from .operators import Operator

__all__ = [
    "lanczos_sharded",
    "Communicator",
    "TorchCommunicator",
    "PeerError",
    "guard",
    "DataParallelOperator",
    "RowShardedOperator",
    "shard_bounds",
    "end_process_group",
]


class PeerError(PycurvError, RuntimeError):
    """Another rank failed; ``ranks`` lists the failed ranks and ``messages`` what they raised."""

    def __init__(self, message: str, ranks=(), messages=()):
        super().__init__(message)
        self.ranks = list(ranks)
        self.messages = list(messages)


class Communicator:
    """What the solver needs from a process group: sums, a flag, broadcasts, gathers."""

    rank: int = 0
    size: int = 1

    def allreduce_sum(self, buf: np.ndarray) -> None:
        """Sums a float64 buffer over ranks, in place."""
        raise NotImplementedError

    def allreduce_max(self, value: int) -> int:
        raise NotImplementedError

    def broadcast(self, buf: np.ndarray, root: int = 0) -> None:
        """Overwrites a float64/int64 buffer with root's, in place."""
        raise NotImplementedError

    def allgather(self, local: np.ndarray, counts) -> np.ndarray:
        """Concatenation over ranks of 1-D float64 pieces of the given lengths."""
        raise NotImplementedError

    def gather_messages(self, text: str) -> list:
        """Every rank's string, on every rank (used only after a failure)."""
        raise NotImplementedError


_SETTLE_S = 10.0  # longest wait for a worker thread to let go of a finished collective's tensors


class TorchCommunicator(Communicator):
    """A ``torch.distributed`` process group (gloo on CPU; NCCL stages buffers through ``device``)."""

    def __init__(self, group=None, device=None):
        from ._optional import require

        torch = require("torch", "pycurv.distributed with torch.distributed")
        dist = torch.distributed
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call torch.distributed.init_process_group(...) "
                "on every rank first"
            )
        self._torch = torch
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        backend = dist.get_backend(group)
        if device is None:
            device = "cuda" if backend == "nccl" else "cpu"
        self.device = torch.device(device)
        # Only gloo runs collectives on worker threads that outlive the call
        # (NCCL's are asynchronous on the GPU by design).
        self._use_counts = backend == "gloo" and hasattr(torch.Tensor, "_use_count")

    def _tensor(self, arr: np.ndarray):
        t = self._torch.from_numpy(arr)
        return t if self.device.type == "cpu" else t.to(self.device)

    def _settle(self, tensors, counts) -> None:
        """Returns once the process group's worker threads hold none of ``tensors``.

        A gloo collective returns when its result is ready, but the worker
        thread that ran it drops its reference to the tensors a moment later.
        Whoever releases a Python-visible tensor last must take the interpreter
        lock; if that is the worker while the interpreter is exiting, the
        process aborts ("terminate called without an active exception"). So
        every collective here ends only when the tensors' use counts are back
        to what they were before it (typically at once; otherwise after one
        yield of the interpreter lock).
        """
        deadline = time.monotonic() + _SETTLE_S
        while any(t._use_count() > c for t, c in zip(tensors, counts)) and time.monotonic() < deadline:
            time.sleep(0)

    def _collective(self, fn, *tensors):
        counts = [t._use_count() for t in tensors] if self._use_counts else None
        fn()
        if counts is not None:
            self._settle(tensors, counts)

    def _back(self, t, arr: np.ndarray) -> None:
        if self.device.type != "cpu":
            arr[...] = t.cpu().numpy()

    def allreduce_sum(self, buf):
        t = self._tensor(buf)
        self._collective(lambda: self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM, group=self.group), t)
        self._back(t, buf)

    def allreduce_max(self, value):
        arr = np.array([value], dtype=np.int64)
        t = self._tensor(arr)
        self._collective(lambda: self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX, group=self.group), t)
        self._back(t, arr)
        return int(arr[0])

    def broadcast(self, buf, root=0):
        t = self._tensor(buf)
        src = self._dist.get_global_rank(self.group, root) if self.group is not None else root
        self._collective(lambda: self._dist.broadcast(t, src=src, group=self.group), t)
        self._back(t, buf)

    def allgather(self, local, counts):
        counts = [int(c) for c in counts]
        width = max(max(counts), 1)
        padded = np.zeros(width, dtype=np.float64)
        padded[: local.size] = local
        out = [self._torch.zeros(width, dtype=self._torch.float64, device=self.device) for _ in range(self.size)]
        mine = self._tensor(padded)
        self._collective(lambda: self._dist.all_gather(out, mine, group=self.group), mine, *out)
        return np.concatenate([o[:c].cpu().numpy() for o, c in zip(out, counts)])

    def allreduce_tensor(self, t) -> None:
        """Sums a torch tensor over the ranks in place, on its own device (no staging)."""
        self._collective(lambda: self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM, group=self.group), t)

    def allgather_tensor(self, parts, t) -> None:
        """Every rank's ``t`` (same shape everywhere) into ``parts``, on the tensors' device."""
        self._collective(lambda: self._dist.all_gather(parts, t, group=self.group), t, *parts)

    def gather_messages(self, text):
        # Not all_gather_object: its internal tensors could not be settled.
        data = np.frombuffer(text.encode("utf-8", "replace"), dtype=np.uint8)
        counts = [0] * self.size
        counts[self.rank] = data.size
        sizes = np.array(counts, dtype=np.float64)
        self.allreduce_sum(sizes)
        codes = self.allgather(data.astype(np.float64), sizes.astype(int))
        out, start = [], 0
        for c in sizes.astype(int):
            out.append(codes[start:start + c].astype(np.uint8).tobytes().decode("utf-8", "replace"))
            start += c
        return out


def end_process_group(group=None) -> None:
    """Ends a ``torch.distributed`` run: every rank meets once more, then ``group`` is destroyed.

    Call it on every rank instead of ``dist.barrier(); dist.destroy_process_group()``.
    With gloo, that pair can abort a process as it exits ("terminate called
    without an active exception"): the barrier holds the earlier collectives'
    tensors, and the group's worker thread may release them only after the
    interpreter has begun to shut down. The last meeting here is an all-reduce
    that returns only once the worker has let go of its tensor
    (:meth:`TorchCommunicator._settle`), so no rank closes its connections
    while a peer still reads them and the worker is left nothing that needs
    the interpreter. ``group=None`` ends the default group (and with it every
    other).
    """
    from ._optional import require

    require("torch", "pycurv.distributed.end_process_group")
    import torch.distributed as dist

    TorchCommunicator(group).allreduce_max(0)  # settled: see TorchCommunicator._settle
    dist.destroy_process_group(group)


_SYNCED = "__pycurv_synchronized__"


def guard(comm: Communicator, fn: Callable, *args, **kwargs):
    """Runs ``fn`` on every rank; if it raises on any rank, every rank raises.

    The failing rank re-raises its own exception; the others raise
    :class:`PeerError` naming the failed ranks and their messages. Call it
    around user code that is followed by a collective (an HVP before its
    all-reduce, a matvec before the next reduction).
    """
    err: Optional[BaseException] = None
    result = None
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - re-raised below, on every rank
        if getattr(exc, _SYNCED, False):
            raise  # already seen by every rank
        err = exc
    if comm.allreduce_max(1 if err is not None else 0):
        msgs = comm.gather_messages("" if err is None else f"{type(err).__name__}: {err}")
        failed = [r for r, m in enumerate(msgs) if m]
        if err is not None:
            try:
                setattr(err, _SYNCED, True)
            except (AttributeError, TypeError):  # pragma: no cover - exceptions without a __dict__
                pass
            raise err
        exc = PeerError(
            f"rank {comm.rank} stopped because rank(s) {', '.join(map(str, failed))} failed: "
            + "; ".join(f"[rank {r}] {msgs[r]}" for r in failed),
            failed,
            [msgs[r] for r in failed],
        )
        setattr(exc, _SYNCED, True)
        raise exc
    return result


def shard_bounds(n: int, size: int, rank: int) -> tuple:
    """Rows [lo, hi) of an n-vector held by ``rank`` when split as evenly as possible."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class RowShardedOperator(Operator):
    """A symmetric matrix split by rows over ranks, for the sharded-basis layout.

    Rank r holds ``A[lo:hi, :]`` (its rows) and the rows [lo, hi) of every
    Lanczos vector; ``matvec`` gathers x and returns its rows of A x.
    """

    exact = False
    dtype = np.dtype(np.float64)

    def __init__(self, rows: np.ndarray, n: int, comm: Communicator):
        rows = np.asarray(rows, dtype=np.float64)
        lo, hi = shard_bounds(n, comm.size, comm.rank)
        if rows.shape != (hi - lo, n):
            raise ValueError(f"rank {comm.rank} must hold rows [{lo}, {hi}) of A, i.e. shape {(hi - lo, n)}, "
                             f"got {rows.shape}")
        self._rows = rows
        self.comm = comm
        self.shape = (n, n)
        self.n_local = hi - lo
        self.offset = lo
        self._counts = [shard_bounds(n, comm.size, r)[1] - shard_bounds(n, comm.size, r)[0] for r in range(comm.size)]

    def matvec(self, x_local):
        return self._rows @ self.comm.allgather(np.asarray(x_local, dtype=np.float64), self._counts)


class DataParallelOperator(Operator):
    """The weighted mean over ranks of each rank's own operator (replicated-basis layout).

    For a Hessian averaged over a dataset split across ranks, rank r passes its
    shard's HVP and ``weight`` = its number of samples: the result is the HVP of
    the mean loss over the union of the shards, identical on every rank.
    """

    def __init__(self, local_matvec: Callable, n: int, comm: Communicator, *, weight: float = 1.0, dtype=None,
                 exact: bool = False):
        if not callable(local_matvec):
            raise TypeError(f"local_matvec must be callable, got {type(local_matvec).__name__}")
        self._local = local_matvec
        self.comm = comm
        self.shape = (int(n), int(n))
        self.dtype = dtype
        self.exact = exact
        total = np.array([float(weight)])
        comm.allreduce_sum(total)
        if not total[0] > 0:
            raise ValueError(f"the weights of the ranks must sum to a positive number, got {total[0]}")
        self._scale = float(weight) / float(total[0])

    def matvec(self, x):
        y = guard(self.comm, lambda: np.asarray(self._local(x), dtype=np.float64) * self._scale)
        y = np.ascontiguousarray(y)
        self.comm.allreduce_sum(y)
        return y


def lanczos_sharded(matvec: Callable, bounds, k: int = 1, *, which: str = "LA", tol: float = 1e-6, ncv=None,
                    max_matvecs=None, v0=None, seed=None, return_eigenvectors: bool = True, callback=None,
                    check_multiplicity=None, exact: bool = False, dtype=None):
    """Lanczos with the basis split into row shards held in one process (e.g. one per device).

    ``bounds`` lists the shards' row ranges ``[(0, n1), (n1, n2), ...]`` covering
    0..n. ``matvec(xs)`` takes the list of shards of x (float64, read-only) and
    returns the list of shards of A x. One core state holds each shard; the
    states are driven in lockstep and their partial dot products are summed in
    shard order, exactly as ranks of a process group would through REDUCE. The
    eigenvectors are returned whole (rows concatenated in shard order).
    """
    import time
    import warnings

    from . import _checks
    from ._native import DONE, MATVEC, REDUCE, STEP, WHICH_CODE, core
    from .errors import ConvergenceWarning
    from .lanczos import _nonfinite, collect
    from .operators import unit_roundoff
    from .results import LanczosProgress

    bounds = [(int(lo), int(hi)) for lo, hi in bounds]
    if not bounds or bounds[0][0] != 0 or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])) or any(
            hi <= lo for lo, hi in bounds):
        raise ValueError(f"bounds must be consecutive non-empty row ranges starting at 0, got {bounds}")
    n = bounds[-1][1]
    k = _checks.check_k(k, n)
    which = _checks.check_which(which)
    tol = _checks.check_tol(tol)
    ncv = _checks.check_ncv(ncv, k, n)
    max_matvecs = _checks.check_max_matvecs(max_matvecs, ncv, k)
    v0 = None if v0 is None else _checks.check_v0(v0, n)
    seed = _checks.check_seed(seed)
    if check_multiplicity is None:
        check_multiplicity = k >= 2
    states = [core.LanczosState(
        n_local=hi - lo, n_global=n, offset=lo, k=k, ncv=ncv, which=WHICH_CODE[which], tol=tol,
        max_matvecs=max_matvecs, seed=seed, start_given=v0 is not None, check_multiplicity=bool(check_multiplicity),
        explicit_residuals=not exact, want_vectors=bool(return_eigenvectors), yield_reduce=True,
        unit_roundoff=unit_roundoff(dtype)) for lo, hi in bounds]
    if v0 is not None:
        for st, (lo, hi) in zip(states, bounds):
            st.start_vector()[:] = v0[lo:hi]
    t_start = time.perf_counter()
    t_mv = t_core = 0.0
    count = 0
    ys = None
    while True:
        t0 = time.perf_counter()
        try:
            reqs = {int(st.advance()) for st in states}
        except core.NonFiniteError:
            raise _nonfinite(None if ys is None else np.concatenate(ys), count) from None
        t_core += time.perf_counter() - t0
        if len(reqs) != 1:  # pragma: no cover - identical reduced values give identical decisions
            raise RuntimeError(f"the shards' Lanczos states diverged: {sorted(reqs)}")
        req = reqs.pop()
        if req == MATVEC:
            xs = [st.matvec_input() for st in states]
            count += 1
            t0 = time.perf_counter()
            ys = list(matvec(xs))
            t_mv += time.perf_counter() - t0
            if len(ys) != len(states):
                raise ValueError(f"matvec call {count} returned {len(ys)} shards, expected {len(states)}")
            for i, (st, y, (lo, hi)) in enumerate(zip(states, ys, bounds)):
                y = _checks.matvec_output(y, hi - lo, count)
                if dtype is None and count == 1:
                    st.set_unit_roundoff(unit_roundoff(y.dtype))
                ys[i] = y
                st.set_matvec_output(y)
        elif req == REDUCE:
            bufs = [st.reduce_buffer() for st in states]
            total = bufs[0].copy()
            for b in bufs[1:]:
                total += b
            for b in bufs:
                b[:] = total
        elif req == STEP:
            if callback is not None and callback(LanczosProgress(int(states[0].n_matvecs),
                                                                  states[0].current_values(),
                                                                  states[0].current_residuals())) is True:
                for st in states:
                    st.stop()
        elif req == DONE:
            break
    timing = {"matvec": t_mv, "core": t_core, "total": time.perf_counter() - t_start}
    res = collect(states[0], timing, which=which, tol=tol, ncv=ncv, seed=seed, max_matvecs=max_matvecs,
                  want_vectors=False)
    if return_eigenvectors:
        import dataclasses

        vecs = np.concatenate([np.asarray(st.eigenvectors()).T for st in states], axis=0)
        res = dataclasses.replace(res, eigenvectors=vecs)
    if not res.converged:
        warnings.warn(res.message, ConvergenceWarning, stacklevel=2)
    return res
