#!/usr/bin/env bash
# The CUDA backend's tests (tests/test_gpu.py) against its CPU emulation.
#
# Builds pycurv._cuda with PYCURV_CUDA=EMULATE (csrc/cuda/emulation.hpp: every
# CUDA thread a fiber on the CPU) into its own folder, build/emulated/, and
# runs the tests with that folder first on the path: the kernels, the
# reduction protocol, the tile staging and the exchange paths are checked on
# machines without a GPU, and the pycurv installed in this environment is left
# as it was. Part of the test command (README, .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${PYCURV_EMULATED_DIR:-$PWD/build/emulated}"
rm -rf "$dest/site"
start=$SECONDS
python -m pip install -q --no-deps --target "$dest/site" . \
  -Ccmake.define.PYCURV_CUDA=EMULATE -Cbuild-dir="$dest/cmake"
echo "emulated CUDA module built in $((SECONDS - start)) s ($dest/site)"
cd tests  # not the repository root: its pycurv/ source folder would shadow the build
export PYTHONPATH="$dest/site${PYTHONPATH:+:$PYTHONPATH}"
python - "$dest/site" <<'PY'
import os, sys
import pycurv, pycurv._cuda as cuda
where = os.path.realpath(os.path.dirname(pycurv.__file__))
if not where.startswith(os.path.realpath(sys.argv[1])) or not cuda.build_info()["emulated"]:
    sys.exit(f"the emulated build is not the pycurv imported: {where}, {cuda.build_info()}")
PY
start=$SECONDS
PYCURV_EXPECT_CUDA=1 python -m pytest -p no:cacheprovider test_gpu.py
echo "emulated GPU suite: $((SECONDS - start)) s"
