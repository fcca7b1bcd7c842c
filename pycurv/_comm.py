"""What the solver needs from a process group, and how ranks fail together.

:class:`Communicator` is the protocol the Lanczos driver talks to (sums, a
flag, broadcasts, gathers); :func:`guard` makes an exception on one rank an
exception on every rank. Nothing here knows a framework or a process group:
:mod:`pycurv.distributed` implements the protocol over ``torch.distributed``.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .errors import PycurvError

__all__ = ["Communicator", "PeerError", "guard", "shard_bounds"]


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
