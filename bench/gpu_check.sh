#!/usr/bin/env bash
# The GPU check: on a bare GPU machine (torch + CUDA, triton, nvcc, ninja; no network) build the
# CUDA kernels for sm_90, run the GPU tests and the GPU benchmark, and write logs and a results
# table to the folder given. Ends in under 8 minutes on an H100/H200.
#
#   bench/gpu_check.sh OUT_DIR
#
# OUT_DIR gets: env.txt (card, driver, versions), build.log, tests.log, junit.xml,
# bench.log, latest.md / latest.csv / latest.png (the benchmark table). Copy latest.md into
# bench/GPU_RESULTS.md with the card and date.
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
start=$(date +%s)
elapsed() { echo "[gpu_check $(($(date +%s) - start))s] $*"; }

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

elapsed "build (sm_90, CUDA kernels required)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} ONEPASS_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
if ! python3 -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  elapsed "BUILD FAILED"
  exit 1
fi
python3 -c "import onepass; from onepass._engine import cuda_kernels_built; print('cuda kernels:', cuda_kernels_built())" | tee -a "$out/env.txt"

elapsed "GPU tests"
# tests/test_gpu.py runs everything on the GPU; the CPU suite is CI's. test_triton.py runs
# compiled (not interpreted) on CUDA tensors when a GPU is present.
timeout 300 python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_gpu.py tests/test_triton.py --junitxml="$out/junit.xml" > "$out/tests.log" 2>&1
tests_rc=$?
tail -25 "$out/tests.log"

elapsed "GPU benchmark"
timeout 240 python3 -m bench.run --device cuda --out "$out" > "$out/bench.log" 2>&1
bench_rc=$?
tail -60 "$out/bench.log"

elapsed "done: tests rc=$tests_rc, bench rc=$bench_rc"
exit $((tests_rc != 0 || bench_rc != 0))
