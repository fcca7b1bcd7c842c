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
from typing import Callable

import numpy as np

from ._comm import Communicator, PeerError, guard, shard_bounds
from ._sharded import lanczos_sharded
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
