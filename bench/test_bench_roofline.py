"""The core's time per Lanczos step (matvec excluded) against the memory-bandwidth roofline.

Step j reads the j basis vectors in pass 1 and again in pass 2 (a third pass
only when needed), plus the traffic of w: the basis kernels count the bytes
they must move at the least (``bytes_moved``). The roofline time is those bytes
over the machine's read bandwidth, measured with the same threading and memory
layout (``pycurv._core.read_bandwidth``, best of three one-pass reads of 1 GiB,
right before and after each round). The run spans two restart cycles, so the average includes restarts
(the basis rotation) and the Rayleigh-Ritz work.
"""

from __future__ import annotations

import numpy as np
import pytest

from pycurv import _core
from pycurv.lanczos import drive

SIZES = [1_000_000, 4_000_000]
NCVS = [32, 64, 128]


def _bandwidth():
    """Read bandwidth beyond the caches (1 GiB), best of three passes."""
    return _core.read_bandwidth(n=1 << 27, repeats=3)


@pytest.mark.parametrize("ncv", NCVS)
@pytest.mark.parametrize("n", SIZES)
def test_core_step_vs_roofline(benchmark, n, ncv):
    """The machine's bandwidth drifts (a shared host): it is probed right before and after every
    round, and each round is compared with the higher of its two probes (the stricter roofline)."""
    d = np.linspace(0.0, 1.0, n)  # a spectrum that does not converge within two cycles
    rounds = []

    def run():
        bw = _bandwidth()
        st = _core.LanczosState(
            n_local=n, n_global=n, offset=0, k=1, ncv=ncv, which=0, tol=1e-15, max_matvecs=2 * ncv, seed=1,
            start_given=False, check_multiplicity=False, explicit_residuals=False, want_vectors=False,
            yield_reduce=False, unit_roundoff=2.0**-53)
        out = np.empty(n)
        timing = drive(st, lambda x: np.multiply(d, x, out=out), n)
        bw = max(bw, _bandwidth())
        rounds.append((timing["core"], float(st.bytes_moved) / bw, bw, int(st.n_matvecs), int(st.n_restarts),
                       float(st.bytes_moved)))
        return st

    benchmark.group = "core time per step vs roofline"
    benchmark.pedantic(run, rounds=3, iterations=1)
    ratios = [core / roof for core, roof, *_ in rounds]
    i = int(np.argsort(ratios)[len(ratios) // 2])  # the median round
    core, roof, bw, steps, restarts, moved = rounds[i]
    benchmark.extra_info.update(
        n=n, ncv=ncv, steps=steps, restarts=restarts, core_s=core, core_ms_per_step=1e3 * core / steps,
        roofline_s=roof, roofline_ms_per_step=1e3 * roof / steps, ratio=ratios[i], ratios=ratios,
        bandwidth_gbs=bw / 1e9, bandwidths_gbs=[r[2] / 1e9 for r in rounds], gbytes_moved=moved / 1e9,
    )
