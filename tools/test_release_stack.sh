#!/usr/bin/env bash
# Runs the CPU test suite under the GPU machine's releases (default: Python 3.12, torch 2.11.0
# from PyPI and the triton it pins) without touching this checkout's build: a venv and a copy of
# the working tree (tracked and untracked, not ignored, files) under build/stack-<py>-<torch>/,
# onepass built CPU-only there. Run it before a GPU run: it found 44 Triton tests failing under
# triton 3.6's interpreter that passed under 3.9 (bench/GPU_RESULTS.md).
#   tools/test_release_stack.sh [PYTHON] [TORCH_VERSION] [pytest args...]
# e.g. tools/test_release_stack.sh python3.12 2.11.0 -k triton (PYTHON may be a path)
# First run: ~4 GB of downloads into the venv; the suite ~10 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3.12}
torch_version=${2:-2.11.0}
shift $(($# < 2 ? $# : 2))
"$python" -c "" 2>/dev/null || { echo "test_release_stack: $python does not run"; exit 1; }
py_version=$("$python" -c "import sys; print('%d.%d' % sys.version_info[:2])")
root=build/stack-py$py_version-torch$torch_version
venv=$root/venv
if [ ! -f "$venv/ok" ]; then
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$torch_version" pytest numpy matplotlib setuptools wheel
  # The bench's peers, without their dependencies (torch is the one above).
  "$venv/bin/pip" install -q --no-deps lion-pytorch==0.2.5 pytorch-optimizer==4.1.0
  touch "$venv/ok"
fi
# A fresh copy of the tree as it is now (uncommitted changes included); the venv stays.
tree=$root/tree
rm -rf "$tree" && mkdir -p "$tree"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | tar --null -T - -cf - | tar -xf - -C "$tree"
cd "$tree"
ONEPASS_BUILD_CUDA=0 "../venv/bin/pip" install -q --no-build-isolation --no-deps -e .
"../venv/bin/python" -c "import sys, torch, triton; print('test_release_stack: Python',
  sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
"../venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
