#!/usr/bin/env bash
# Compile-checks the CUDA backend on a machine with no GPU and no CUDA torch:
#  1. every csrc/cuda/*.cu with plain `nvcc -c` for sm_80 and sm_90 (the .cu files include no torch
#     header, so this needs only the CUDA toolkit);
#  2. the torch glue (csrc/cuda/*.cpp) with `g++ -fsyntax-only` against torch's headers and CUDA's.
#     A CPU torch wheel lacks only c10/cuda/impl/cuda_cmake_macros.h, supplied here.
# Skips (exit 0, with a message) where nvcc is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then
  echo "check_cuda: nvcc not found, CUDA compile check skipped"
  exit 0
fi
out=build/check_cuda
mkdir -p "$out/include/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$out/include/c10/cuda/impl/cuda_cmake_macros.h"
cuda_home=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
[ -f "$cuda_home/include/cuda_runtime.h" ] || cuda_home=/usr/local/cuda
for cu in csrc/cuda/*.cu; do
  echo "check_cuda: nvcc -c $cu (sm_80, sm_90)"
  nvcc -c "$cu" -o "$out/$(basename "$cu").o" -std=c++20 -O3 -Icsrc/include -Icsrc \
    --fmad=false -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
done
torch_includes=$(python3 -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
python_includes=$(python3 -c "import sysconfig; print('-I' + sysconfig.get_paths()['include'])")
for cpp in csrc/cuda/*.cpp; do
  echo "check_cuda: g++ -fsyntax-only $cpp"
  # shellcheck disable=SC2086
  g++ -fsyntax-only -std=c++20 -I"$out/include" $torch_includes -I"$cuda_home/include" \
    -Icsrc/include -Icsrc $python_includes "$cpp"
done
echo "check_cuda: ok"
