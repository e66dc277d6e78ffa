"""backend="auto": which backend steps which tensors. The GPU choice is a pure function of what
is available, so it is checked here without a GPU; tests/test_gpu.py checks it on one."""

from __future__ import annotations

import pytest
import torch

import onepass
from onepass._engine import auto_gpu_backend, resolve_backend


@pytest.mark.parametrize("algorithm", ["adam", "sgd", "lion"])
def test_low_precision_elementwise_steps_pick_triton(algorithm: str) -> None:
    # Measured: AdamW bf16 at 90% of copy in Triton, 71% in CUDA (bench/GPU_RESULTS.md).
    for dtype in (torch.bfloat16, torch.float16):
        assert auto_gpu_backend(algorithm, dtype, False, True, True) == "triton"


@pytest.mark.parametrize("algorithm", ["adam", "sgd", "lion", "novograd", "fadam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_steps_pick_cuda(algorithm: str, dtype: torch.dtype) -> None:
    assert auto_gpu_backend(algorithm, dtype, False, True, True) == "cuda"


@pytest.mark.parametrize("algorithm", ["novograd", "fadam"])
def test_reductions_pick_cuda_in_low_precision_too(algorithm: str) -> None:
    assert auto_gpu_backend(algorithm, torch.bfloat16, False, True, True) == "cuda"


def test_capturable_steps_pick_cuda() -> None:
    assert auto_gpu_backend("adam", torch.bfloat16, True, True, True) == "cuda"


def test_what_is_available_is_used() -> None:
    assert auto_gpu_backend("adam", torch.bfloat16, False, True, False) == "cuda"
    assert auto_gpu_backend("adam", torch.float32, False, False, True) == "triton"
    assert auto_gpu_backend("adam", torch.float32, False, False, False) is None


def test_cpu_tensors_take_the_native_kernels() -> None:
    if not onepass.native_available():
        pytest.skip("onepass._C not built")
    assert resolve_backend("auto", torch.device("cpu"), "adam", torch.bfloat16) == "cpu"
