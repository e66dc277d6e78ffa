#!/usr/bin/env bash
# The C++ unit tests of the shared math (CMakeLists.txt's test_math; the kernels need no torch),
# built and run with ctest. Uses the cmake and ctest on PATH, or where the machine has none, those
# of the `cmake` package that `make install` puts into PYTHON's environment from PyPI.
#   tools/run_ctest.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
if command -v cmake >/dev/null && command -v ctest >/dev/null; then
  cmake=$(command -v cmake) ctest=$(command -v ctest)
else
  bin=$("$python" -c "import cmake; print(cmake.CMAKE_BIN_DIR)")
  cmake=$bin/cmake ctest=$bin/ctest
fi
"$cmake" -S . -B build/ctest -DCMAKE_BUILD_TYPE=Release -DCMAKE_DISABLE_FIND_PACKAGE_Torch=ON > /dev/null
"$cmake" --build build/ctest -j2 --target test_math
"$ctest" --test-dir build/ctest --output-on-failure
