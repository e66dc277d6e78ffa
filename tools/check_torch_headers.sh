#!/usr/bin/env bash
# Syntax-checks every C++ source against the headers of another torch release: by default
# 2.11.0+cu130, the GPU machine's, whose headers differ from the 2.13 CPU wheel's that CI builds
# with (GPU run 4 lost its first call to one such difference: StorageImpl::has_materializer).
# The wheel (~530 MB) is downloaded from PyPI once; only its include/ is kept, under
# build/torch-headers-<version>/. The CUDA glue (csrc/cuda/*.cpp) is checked where nvcc is
# installed (its CUDA headers); the .cu files include no torch header (tools/check_cuda.sh).
#   tools/check_torch_headers.sh [VERSION]
# Where the wheel cannot be downloaded (no network): exit 0 with a message, checking nothing,
# except in CI (CI set, as CI services set it), where a check that did not run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-2.11.0}
dir=build/torch-headers-$version
if [ ! -f "$dir/ok" ]; then
  rm -rf "$dir" && mkdir -p "$dir"
  if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
      --platform manylinux_2_28_x86_64 -d "$dir" "torch==$version" >"$dir/pip.log" 2>&1; then
    echo "check_torch_headers: torch $version could not be downloaded, check skipped:"
    tail -n 3 "$dir/pip.log"
    [ -z "${CI:-}" ] || { echo "check_torch_headers: CI is set: failing"; exit 1; }
    exit 0
  fi
  python3 - "$dir" <<'EOF'
import pathlib
import sys
import zipfile

folder = pathlib.Path(sys.argv[1])
(wheel,) = folder.glob("torch-*.whl")
with zipfile.ZipFile(wheel) as z:
    z.extractall(folder, [n for n in z.namelist() if n.startswith("torch/include/")])
wheel.unlink()
EOF
  touch "$dir/ok"
fi
inc=$dir/torch/include
python_includes=$(python3 -c "import sysconfig; print('-I' + sysconfig.get_paths()['include'])")
flags=(-fsyntax-only -std=c++20 -fopenmp -Wall -Wno-unknown-pragmas -Werror
  -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
  -I"$inc" -I"$inc/torch/csrc/api/include" -Icsrc/include -Icsrc "$python_includes")
sources=(csrc/ops.cpp csrc/cpu/*.cpp)
if command -v nvcc >/dev/null; then
  cuda_home=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
  [ -f "$cuda_home/include/cuda_runtime.h" ] || cuda_home=/usr/local/cuda
  flags+=(-DONEPASS_WITH_CUDA=1 -I"$cuda_home/include")
  sources+=(csrc/cuda/*.cpp)
else
  echo "check_torch_headers: nvcc not found, the CUDA glue is not checked"
fi
for src in "${sources[@]}"; do
  echo "check_torch_headers: torch $version: g++ -fsyntax-only $src"
  g++ "${flags[@]}" "$src"
done
echo "check_torch_headers: ok"
