"""The core's time per Lanczos step (matvec excluded) against the memory-bandwidth roofline.

Step j reads the j basis vectors in pass 1 and again in pass 2 (a third pass
only when needed), plus the traffic of w: the basis kernels count the bytes
they must move at the least (``bytes_moved``). The roofline time is those bytes
over the machine's read bandwidth, measured with the same threading and memory
layout (``pycurv._core.read_bandwidth``, best of several one-pass reads of
512 MiB). The run spans two restart cycles, so the average includes restarts
(the basis rotation) and the Rayleigh-Ritz work.
"""

from __future__ import annotations

import numpy as np
import pytest

from pycurv import _core
from pycurv.lanczos import drive

SIZES = [1_000_000, 4_000_000]
NCVS = [32, 64, 128]


@pytest.fixture(scope="session")
def bandwidth():
    return max(_core.read_bandwidth(n=1 << 26, repeats=7) for _ in range(3))


@pytest.mark.parametrize("ncv", NCVS)
@pytest.mark.parametrize("n", SIZES)
def test_core_step_vs_roofline(benchmark, bandwidth, n, ncv):
    d = np.linspace(0.0, 1.0, n)  # a spectrum that does not converge within two cycles

    def run():
        st = _core.LanczosState(
            n_local=n, n_global=n, offset=0, k=1, ncv=ncv, which=0, tol=1e-15, max_matvecs=2 * ncv, seed=1,
            start_given=False, check_multiplicity=False, explicit_residuals=False, want_vectors=False,
            yield_reduce=False, unit_roundoff=2.0**-53)
        out = np.empty(n)
        timing = drive(st, lambda x: np.multiply(d, x, out=out), n)
        return st, timing

    benchmark.group = "core time per step vs roofline"
    st, timing = benchmark.pedantic(run, rounds=2, iterations=1)
    steps = int(st.n_matvecs)
    roof = float(st.bytes_moved) / bandwidth
    benchmark.extra_info.update(
        n=n, ncv=ncv, steps=steps, restarts=int(st.n_restarts), core_s=timing["core"],
        core_ms_per_step=1e3 * timing["core"] / steps, roofline_s=roof,
        roofline_ms_per_step=1e3 * roof / steps, ratio=timing["core"] / roof,
        bandwidth_gbs=bandwidth / 1e9, gbytes_moved=float(st.bytes_moved) / 1e9,
    )
