"""Compiles every onepass Triton kernel for a Hopper GPU (sm_90) on a machine without one.

The Triton tests run the kernels in the interpreter (TRITON_INTERPRET=1), which executes them
as NumPy and accepts code the compiler refuses; tests/test_triton.py's *_compiles_for_sm90 tests
compile each kernel from a hand-written signature (every pointer of the param's dtype, every int
an i64). This check compiles the kernels as a GPU launch would, through Triton's own JIT path: a
stand-in driver reports an sm_90 target, and every launch becomes a warm-up (compile, no
launch), so the signatures are the ones Triton derives from the launchers' real arguments (an
int that fits 32 bits is an i32), mixed layouts included. The steps themselves compute nothing.
Each algorithm's options, storage layouts, fp32 grads of bf16 params, GradScaler's inputs and an
unaligned param are stepped twice, so every specialization that those select is compiled.

    python tools/check_triton.py            # exits 1 naming what did not compile (~45 s, 2 cores)

tests/test_triton.py runs it (test_launches_compile_for_sm90).

Skipped (exit 0, "check_triton: skipped") where triton or its NVIDIA backend is not installed.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("check_triton: unset TRITON_INTERPRET: the kernels must be created for the compiler")

import torch

# onepass's launches set enable_fp_fusion themselves; this only quiets Triton 3.9's notice.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")
try:
    import triton
    import triton.backends.nvidia  # the backend that compiles for sm_90
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction
except Exception as error:  # no triton, or no NVIDIA backend in it
    print(f"check_triton: skipped ({type(error).__name__}: {error})")
    sys.exit(0)

import onepass

KERNEL_MODULES = ("common", "adam", "sgd", "lion", "novograd", "fadam", "muon")
TARGET = GPUTarget("cuda", 90, 32)


class CompileOnlyDriver:
    """What Triton's JIT asks of the active driver before it compiles: an sm_90 target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return TARGET

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def compile_only(compiled: list[str]) -> None:
    """Every launch compiles (Triton's warm-up path) and records the kernel; none runs."""
    run = JITFunction.run

    def warm_up(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(self.fn.__name__)
        return kernel

    JITFunction.run = warm_up  # type: ignore[method-assign]


def params(dtype: torch.dtype, *, matrices: bool = False, unaligned: bool = False) -> list[Any]:
    """A few CPU params with grads: odd sizes, a zero-size one; 2-D ones for Muon."""
    shapes: list[tuple[int, ...]] = [(5, 3), (33,), (0,), (7,)]
    if matrices:
        shapes = [(6, 4), (3, 9), (8,)]
    out = [torch.randn(s, dtype=dtype).requires_grad_() for s in shapes]
    if unaligned:  # a view one element into its storage: a param address not 16-byte aligned
        out.append(torch.randn(38, dtype=dtype)[1:].detach().requires_grad_())
    for p in out:
        p.grad = torch.randn_like(p)
    return out


Case = tuple[str, Callable[..., torch.optim.Optimizer], dict[str, Any], dict[str, Any]]

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
LOW_PRECISION: list[tuple[str, torch.dtype, dict[str, Any]]] = [
    ("bf16", BF16, {}),
    ("fp16", F16, {}),
    ("fp64", F64, {}),
    ("bf16 state", F32, {"state_dtype": BF16}),
    ("bf16 masters", BF16, {"master_weights": True}),
    ("bf16 sr", BF16, {"stochastic_rounding": True}),
    ("fp16 masters fp32 state", F16, {"master_weights": True, "state_dtype": F32}),
]
ALGORITHMS: list[tuple[str, Callable[..., torch.optim.Optimizer], list[dict[str, Any]]]] = [
    (
        "AdamW",
        onepass.AdamW,
        [{}, {"amsgrad": True, "maximize": True}, {"decay": "independent", "lr": 1e-3}],
    ),
    ("Adam", onepass.Adam, [{"weight_decay": 0.1}]),
    (
        "SGD",
        onepass.SGD,
        [{}, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}, {"momentum": 0.9}],
    ),
    ("SGDW", onepass.SGDW, [{"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1}]),
    ("Lion", onepass.Lion, [{}, {"maximize": True, "weight_decay": 0.1}]),
    ("NovoGrad", onepass.NovoGrad, [{}, {"amsgrad": True, "grad_averaging": True}]),
    ("FAdam", onepass.FAdam, [{}, {"p": 0.25, "clip": 0.5}]),
    ("Muon", onepass.Muon, [{}, {"nesterov": False}]),
]


def cases() -> list[Case]:
    out: list[Case] = []
    for name, cls, options in ALGORITHMS:
        matrices = name == "Muon"
        for extra in options:
            out.append((f"{name} {extra or 'defaults'}", cls, extra, {"matrices": matrices}))
        for label, dtype, extra in LOW_PRECISION:
            out.append((f"{name} {label}", cls, extra, {"dtype": dtype, "matrices": matrices}))
        out.append((f"{name} unaligned", cls, {}, {"unaligned": True, "matrices": matrices}))
        out.append((f"{name} GradScaler", cls, {}, {"amp": True, "matrices": matrices}))
        out.append(
            (f"{name} bf16 params, fp32 grads", cls, {}, {"fp32_grads": True, "matrices": matrices})
        )
    return out


def step(case: Case) -> None:
    _, cls, extra, how = case
    matrices = how.get("matrices", False)
    if how.get("fp32_grads"):
        ps = params(BF16, matrices=matrices)
        for p in ps:
            grad = p.grad.float()
            p.grad = None
            p.grad_dtype = torch.float32  # torch 2.10+: a grad dtype other than the param's
            p.grad = grad
    else:
        ps = params(how.get("dtype", F32), matrices=matrices, unaligned=how.get("unaligned", False))
    opt = cls(ps, backend="triton", **extra)
    if how.get("amp"):  # as GradScaler hands them over
        opt.grad_scale = torch.tensor(0.5)  # type: ignore[attr-defined]
        opt.found_inf = torch.tensor(0.0)  # type: ignore[attr-defined]
    opt.step()
    opt.step()  # a later step (first-step branches are runtime values; cached, cheap)


def main() -> int:
    for module in KERNEL_MODULES:  # created for the compiler, before the engine's gate opens
        importlib.import_module(f"onepass.triton_kernels.{module}")
    from onepass.triton_kernels import common

    common.check_device = lambda device: None  # CPU tensors: nothing is launched on them
    # The engine lets backend="triton" step CPU tensors only when this is set; the kernels above
    # were created without it, so they compile instead of interpreting.
    os.environ["TRITON_INTERPRET"] = "1"
    driver.set_active(CompileOnlyDriver())  # type: ignore[arg-type]
    compiled: list[str] = []
    compile_only(compiled)
    failed: list[str] = []
    start = time.perf_counter()
    for case in cases():
        try:
            step(case)
        except Exception:
            failed.append(case[0])
            print(f"check_triton: {case[0]}: FAILED\n{traceback.format_exc()}", file=sys.stderr)
    kernels = sorted(set(compiled))
    print(
        f"check_triton: {len(cases()) - len(failed)} of {len(cases())} cases compiled for "
        f"sm_90 ({len(kernels)} kernels: {', '.join(kernels)}) in "
        f"{time.perf_counter() - start:.0f} s, triton {triton.__version__}"
    )
    if failed:
        print(f"check_triton: failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
