"""backend="auto": which backend steps which tensors. The GPU choice is a pure function of what
is available and of the bucket's layout, so it is checked here without a GPU; tests/test_gpu.py
checks it on one. The measurements behind each rule are in bench/GPU_RESULTS.md."""

from __future__ import annotations

import warnings

import pytest
import torch

import onepass
from onepass._engine import TRITON_MIN_MEAN_NUMEL, auto_gpu_backend, resolve_backend

LARGE = float(TRITON_MIN_MEAN_NUMEL)  # gpt2-small's mean tensor: 840K elements
SMALL = 2560.0  # many-small's tensors


@pytest.mark.parametrize("algorithm", ["adam", "sgd", "lion"])
def test_16_bit_elementwise_steps_on_large_tensors_pick_triton(algorithm: str) -> None:
    # All-bf16 AdamW at 90-91% of copy in Triton, 61-71% in CUDA (runs 2, 4, 5).
    for dtype in (torch.bfloat16, torch.float16):
        assert auto_gpu_backend(algorithm, dtype, False, True, True) == "triton"
        assert auto_gpu_backend(algorithm, dtype, False, True, True, mean_numel=LARGE) == "triton"
    # fp32 params with bf16 state: 85% against 81% (run 5).
    fp32_bf16_state = auto_gpu_backend(
        algorithm, torch.float32, False, True, True, state_dtype=torch.bfloat16, mean_numel=LARGE
    )
    assert fp32_bf16_state == "triton"


@pytest.mark.parametrize("algorithm", ["adam", "sgd", "lion"])
def test_16_bit_steps_on_small_tensors_pick_cuda(algorithm: str) -> None:
    # Host-bound: on many-small CUDA was 29-47x torch fused, Triton 2.1-3.5x (run 5).
    for dtype in (torch.bfloat16, torch.float16):
        assert auto_gpu_backend(algorithm, dtype, False, True, True, mean_numel=SMALL) == "cuda"
    below = auto_gpu_backend(algorithm, torch.bfloat16, False, True, True, mean_numel=LARGE - 1)
    assert below == "cuda"


@pytest.mark.parametrize("algorithm", ["adam", "sgd", "lion"])
def test_master_weights_pick_cuda(algorithm: str) -> None:
    # bf16 params + fp32 masters: 92% of copy in CUDA, 85% in Triton (run 5).
    for dtype in (torch.bfloat16, torch.float16):
        choice = auto_gpu_backend(
            algorithm, dtype, False, True, True, state_dtype=torch.float32, master=True
        )
        assert choice == "cuda"


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
    assert (
        auto_gpu_backend("adam", torch.bfloat16, False, False, True, mean_numel=SMALL) == "triton"
    )
    assert auto_gpu_backend("adam", torch.float32, False, False, False) is None


def test_cpu_tensors_take_the_native_kernels() -> None:
    if not onepass.native_available():
        pytest.skip("onepass._C not built")
    assert resolve_backend("auto", torch.device("cpu"), "adam", torch.bfloat16) == "cpu"


def test_auto_warns_when_it_falls_back_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without onepass._C, backend="auto" still steps CPU tensors (the reference), and says
    why; tensors on a device only the reference serves take it silently."""
    monkeypatch.setattr(onepass._ops, "NATIVE_ERROR", "onepass._C could not be imported (test)")
    expected = r"pure-torch reference.*could not be imported \(test\)"
    with pytest.warns(RuntimeWarning, match=expected):
        assert resolve_backend("auto", torch.device("cpu"), "adam", torch.float32) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", torch.device("meta"), "adam", torch.float32) == "reference"


def test_the_engine_passes_each_bucket_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan hands resolve_backend each bucket's state dtype and master weights (and, on a
    GPU, its mean tensor size: tests/test_gpu.py)."""
    seen: list[dict] = []

    def record(requested: str, device: torch.device, *args: object, **layout: object) -> str:
        seen.append(layout)
        return "reference"

    monkeypatch.setattr(onepass._engine, "resolve_backend", record)
    half = [torch.randn(3, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    full = [torch.randn(4, requires_grad=True)]
    optimizer = onepass.AdamW(
        [{"params": half, "master_weights": True}, {"params": full, "state_dtype": torch.bfloat16}]
    )
    for p in half + full:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert seen == [
        {"state_dtype": torch.float32, "master": True, "mean_numel": None},
        {"state_dtype": torch.bfloat16, "master": False, "mean_numel": None},
    ]
