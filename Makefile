# The two commands of the README. Each installs what it needs and never replaces an installed torch.
PYTHON ?= python3

.PHONY: install bench test lint

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -q setuptools wheel pytest ruff mypy matplotlib
	@# CMake for the C++ unit tests (make test), from PyPI where the machine has none.
	@command -v cmake >/dev/null && command -v ctest >/dev/null || $(PYTHON) -m pip install -q "cmake>=3.18"
	@# The peers the bench compares Lion, NovoGrad and FAdam with (pure Python; torch is kept), at
	@# the versions the tests pin behaviours of and the README's tables name.
	$(PYTHON) -m pip install -q lion-pytorch==0.2.5 pytorch-optimizer==4.1.0
	@# Triton for the Triton backend (its tests run on the CPU under TRITON_INTERPRET=1); a torch
	@# with CUDA pins its own triton, which is kept (the suite also passes under its 3.6). triton
	@# 3.9 needs Python 3.11+: on 3.10 the newest triton there is.
	@$(PYTHON) -c "import triton" 2>/dev/null || $(PYTHON) -m pip install -q \
		"triton==3.9.0; python_version >= '3.11'" "triton; python_version < '3.11'"
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .

# The main job: onepass vs torch.optim on every shape list (CPU here, GPU where there is one).
bench: install
	$(PYTHON) -m bench.run

# C++ unit tests of the shared math (ctest; the kernels need no torch), the CUDA compile check
# (nvcc -c for sm_80/sm_90, skipped without nvcc), then the Python suite.
test: install
	tools/check_cuda.sh
	tools/run_ctest.sh $(PYTHON)
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy
