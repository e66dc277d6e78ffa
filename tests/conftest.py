"""Fixtures shared by the whole suite (helpers live in tests/helpers.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# tests/test_triton.py runs the Triton kernels interpreted on CPU tensors when there is no GPU.
# The interpreter must be chosen before triton is first imported (Triton's own jit'd library
# functions, tl.sum among them, are created then), and another test module may import it first.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import onepass

from helpers import BACKEND_NAMES, Backend, all_backends


@pytest.fixture(autouse=True)
def _seed_and_restore_capability() -> Iterator[None]:
    """Every test starts from the same random state and leaves the CPU capability as it found it."""
    torch.manual_seed(0)
    if not onepass.native_available():
        yield
        return
    original = onepass.cpu_capability()
    yield
    onepass.set_cpu_capability(original)
    assert onepass.cpu_capability() == original


@pytest.fixture(params=all_backends(), ids=lambda b: b.id)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Every backend: "cpu" once per CPU capability this machine runs, and "reference".

    Selects the capability for the test's duration (restored by the autouse fixture above).
    """
    b: Backend = request.param
    if b.capability is not None:
        onepass.set_cpu_capability(b.capability)
        assert onepass.cpu_capability() == b.capability
    yield b


@pytest.fixture(params=BACKEND_NAMES)
def backend_name(request: pytest.FixtureRequest) -> str:
    """The two backends at the widest capability (drop-in behaviour does not depend on the ISA)."""
    return str(request.param)
