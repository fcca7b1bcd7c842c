"""How much memory a computation needs, how much this process may still take, and errors that say both."""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["format_bytes", "available_bytes", "require_bytes", "basis_memory_error"]


def format_bytes(n: float) -> str:
    """``12345678`` -> ``'11.8 MiB'``: binary units, three significant digits."""
    n = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024.0 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1024.0
    return f"{n:.3g} PiB"  # pragma: no cover - the loop returns


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _meminfo_available() -> Optional[int]:
    text = _read("/proc/meminfo")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _cgroup_room() -> Optional[int]:
    """What this process's cgroup (v2, then v1) still allows: its limit less its usage."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read(limit_file), _read(usage_file)
        if limit is None or usage is None:
            continue
        limit = limit.strip()
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - int(usage.strip() or 0))
    return None


def _address_space_room() -> Optional[int]:
    """What ``ulimit -v`` (RLIMIT_AS) still allows this process to map."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    statm = _read("/proc/self/statm")
    used = int(statm.split()[0]) * os.sysconf("SC_PAGE_SIZE") if statm else 0
    return max(0, soft - used)


def available_bytes() -> Optional[int]:
    """Memory this process can still take without swapping or being killed: the least of the
    system's available memory, the cgroup's room and the address-space limit (None if unknown)."""
    known = [x for x in (_meminfo_available(), _cgroup_room(), _address_space_room()) if x is not None]
    return min(known) if known else None


def require_bytes(need: float, what: str, fix: str) -> None:
    """Raises MemoryError naming ``need`` bytes if they are more than :func:`available_bytes`."""
    room = available_bytes()
    if room is not None and need > room:
        raise MemoryError(f"{what} needs about {format_bytes(need)} ({need:.3g} bytes), more than the "
                          f"{format_bytes(room)} this process can still take; {fix}")


def basis_memory_error(n: int, ncv: int, k: int, want_vectors: bool) -> MemoryError:
    """The allocation of a Krylov basis failed: its size, and what to lower."""
    basis = 8 * n * (ncv + 1)
    ritz = 8 * n * k if want_vectors else 0
    extra = f" plus {format_bytes(ritz)} for the {k} returned eigenvector(s)" if ritz else ""
    smallest = f"; at least k + 2 = {k + 2}" if ncv > k + 2 else ""
    return MemoryError(
        f"the Krylov basis does not fit in memory: {ncv + 1} vectors of n={n} float64 need 8·n·(ncv+1) = "
        f"{basis} bytes ({format_bytes(basis)}){extra}. Lower ncv (ncv={ncv} now{smallest}), ask for fewer "
        "eigenvalues or return_eigenvectors=False, or split the basis's rows over processes "
        "(pycurv.distributed.RowShardedOperator, or shard_basis=True in the adapters)"
    )
