#!/usr/bin/env bash
# Everything pycurv can check on a machine with a GPU, in one command (at most
# 8 minutes on an H100/H200), ending in a summary to paste into bench/RESULTS.md:
#
#   bench/gpu_check.sh
#
# 1. builds and installs pycurv with its CUDA module, from what is installed
#    (pip install --no-build-isolation . -Ccmake.define.PYCURV_CUDA=ON: needs
#    pybind11, scikit-build-core, CMake and nvcc; nothing is fetched);
# 2. runs the GPU tests, failing rather than skipping if the module or the
#    device is missing (PYCURV_EXPECT_CUDA=1);
# 3. runs bench/gpu_check.py: the core's time per step against the HBM
#    roofline, a torch model's lambda_1 on the GPU and the CPU, and pycurv
#    against cupyx eigsh, torch.lobpcg and scipy eigsh on the same torch HVP.
#
# PYCURV_GPU_CHECK_EMULATE=1 runs the same on a machine without a GPU: the CUDA
# module is built as its CPU emulation (PYCURV_CUDA=EMULATE) into
# build/gpu_check/site, leaving the installed pycurv alone, and the benchmark
# uses small sizes (its times measure the emulation, not a GPU). Output, logs
# and the summary go to build/gpu_check/ (PYCURV_GPU_CHECK_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${PYCURV_GPU_CHECK_DIR:-$PWD/build/gpu_check}"
mkdir -p "$out"
emulate="${PYCURV_GPU_CHECK_EMULATE:-0}"
start=$SECONDS
stamp() { echo "[gpu_check $((SECONDS - start)) s] $*"; }

stamp "building pycurv with PYCURV_CUDA=$([ "$emulate" = 1 ] && echo EMULATE || echo ON)"
if [ "$emulate" = 1 ]; then
  rm -rf "$out/site"
  python -m pip install -q --no-build-isolation --no-deps --target "$out/site" . \
    -Ccmake.define.PYCURV_CUDA=EMULATE -Cbuild-dir="$out/cmake" > "$out/build.log" 2>&1 \
    || { tail -40 "$out/build.log"; exit 1; }
  export PYTHONPATH="$out/site${PYTHONPATH:+:$PYTHONPATH}" PATH="$out/site/bin:$PATH"
  bench_args=(--emulated)
else
  python -m pip install -q --no-build-isolation . -Ccmake.define.PYCURV_CUDA=ON -Cbuild-dir="$out/cmake" \
    > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
  bench_args=()
fi
root=$PWD
cd "$out"  # away from the source tree, whose pycurv/ folder would shadow the installed one
python -m pycurv info | tee "$out/info.txt"

stamp "GPU tests"
PYCURV_EXPECT_CUDA=1 python -m pytest -p no:cacheprovider -q --rootdir="$root" -c "$root/pyproject.toml" \
  "$root/tests/test_gpu.py" "$root/tests/test_cuda_build.py" 2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
# Device time is scarce: a failing test does not cost the benchmark; the exit status says it failed.
[ "$tests_rc" = 0 ] || stamp "GPU tests failed (exit $tests_rc): see $out/tests.log; the benchmark runs all the same"

stamp "benchmark"
python "$root/bench/gpu_check.py" "${bench_args[@]}" --out "$out/summary.md" 2> "$out/bench.log" \
  || { tail -40 "$out/bench.log"; exit 1; }
stamp "done in $((SECONDS - start)) s; summary in $out/summary.md"
exit "$tests_rc"
