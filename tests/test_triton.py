"""The Triton backend (onepass.triton_kernels) against the float64 reference.

Without a CUDA device the kernels run on CPU tensors under Triton's interpreter: TRITON_INTERPRET
is set here, at collection, before any test runs (the kernels are created when the backend is
first used, and @triton.jit reads the variable then). With a CUDA device they run compiled, on
CUDA tensors (set TRITON_INTERPRET=1 yourself to run the interpreter there).

The interpreter is slow (milliseconds per program): sizes are small, and the multi-tile path of
the GPU configuration is exercised once by shrinking BLOCK.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
tl = triton.language

import onepass  # noqa: E402
from onepass.algorithms import (  # noqa: E402
    AdamScalars,
    FAdamScalars,
    LionScalars,
    NovoGradScalars,
    SgdScalars,
    adam_reference,
    fadam_reference,
    lion_reference,
    novograd_reference,
    sgd_reference,
)
from onepass.algorithms.base import scalar_slot_dtype  # noqa: E402
from onepass.triton_kernels.common import sum_partials  # noqa: E402

from helpers import assert_all_close  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")

#: (rtol, atol) of float32 / float64 storage against the float64 reference over all the steps.
#: bfloat16 / float16 are checked step by step instead (lockstep: ``Reference.sync``) against the
#: reference run in the storage dtype (float32 math, rounded to storage after every step: the
#: kernels' own rounding path), in storage ulps (``helpers.assert_within_ulps``): see LOCKSTEP_ULPS.
LOW_PRECISION = (torch.bfloat16, torch.float16)
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-14),
    torch.float32: (1.3e-6, 1e-5),
}
#: Lockstep bound: every element of every param and state tensor within one ulp of its own storage
#: dtype (a bf16 / fp16 ulp; NovoGrad's fp32 scalar sums: fp32 TOLERANCES), no atol, and (1,000
#: elements or more) at most helpers.MAX_FRACTION_OFF of them not equal. The kernels follow the
#: reference's operation order almost everywhere: measured over every low-precision case, all
#: elements are bitwise equal except Adam's fp16 exp_avg_sq (and max), up to 22 of 43,036 one ulp
#: off: the kernel computes (1 - beta2) * (g * g), the reference ((1 - beta2) * g) * g, and the
#: fp32 results' last-bit difference now and then crosses an fp16 rounding boundary (fp16's 11
#: bits make that ~8x likelier than bf16's 8). So 0 ulp is too tight, and 1 ulp with the fraction
#: bound catches a rounding mode that is not round-to-nearest-even (e.g. bf16 by truncation: one
#: ulp off on about half the elements).
LOCKSTEP_ULPS = 1.0
LOCKSTEP_ATOL = 0.0
STEPS = 7


def _ref_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float64


# ------------------------------------------------------------------------------------------------
# A reference run: the same steps, tensor by tensor, with the pure-torch references
# ------------------------------------------------------------------------------------------------


class Reference:
    """Copies of the params stepped by ``adam_reference`` / ``sgd_reference`` /
    ``lion_reference`` with their own
    per-tensor step counts and state."""

    def __init__(self, family: str, params: list[torch.Tensor], dtype: torch.dtype) -> None:
        self.family = family
        self.params = [p.detach().to("cpu", dtype).clone() for p in params]
        self.slots: list[dict[str, torch.Tensor]] = [{} for _ in params]
        self.steps = [0] * len(params)

    def step(self, group: dict[str, Any], grads: list[torch.Tensor | None], scale: float) -> None:
        for i, g in enumerate(grads):
            if g is None:
                continue
            p, slots = self.params[i], self.slots[i]
            g = g.detach().to("cpu", p.dtype)
            self.steps[i] += 1
            if self.family == "adam":
                s = AdamScalars.from_group(group)
                if not slots:
                    names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if s.amsgrad else [])
                    slots.update({n: torch.zeros_like(p) for n in names})
                adam_reference(
                    p,
                    g,
                    slots["exp_avg"],
                    slots["exp_avg_sq"],
                    slots.get("max_exp_avg_sq"),
                    self.steps[i],
                    s,
                    scale,
                )
            elif self.family == "novograd":
                ns = NovoGradScalars.from_group(group)
                if not slots:
                    scalar = torch.float64 if p.dtype == torch.float64 else torch.float32
                    slots["exp_avg"] = torch.zeros_like(p)
                    for name in ("exp_avg_sq", "max_exp_avg_sq")[: 1 + ns.amsgrad]:
                        slots[name] = torch.zeros((), dtype=scalar)
                novograd_reference(
                    p,
                    g,
                    slots["exp_avg"],
                    slots["exp_avg_sq"],
                    slots.get("max_exp_avg_sq"),
                    self.steps[i],
                    ns,
                    scale,
                )
            elif self.family == "fadam":
                fs = FAdamScalars.from_group(group)
                if not slots:
                    slots.update({n: torch.zeros_like(p) for n in ("fim", "momentum")})
                fadam_reference(
                    p, g, slots["fim"], slots["momentum"], self.steps[i], fs, scale
                )  # fmt: skip
            elif self.family == "lion":
                ls = LionScalars.from_group(group)
                if not slots:
                    slots["exp_avg"] = torch.zeros_like(p)
                lion_reference(p, g, slots["exp_avg"], ls, scale)
            else:
                s = SgdScalars.from_group(group)
                first = s.momentum != 0 and not slots
                if first:
                    slots["momentum_buffer"] = torch.zeros_like(p)
                sgd_reference(p, g, slots.get("momentum_buffer"), first, s, scale)

    def sync(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        """Starts the next reference step from the kernel's params and state (low precision):
        each step is then checked on its own, as a storage rounding that fp32 operation order
        (an FMA on the GPU) moved by one ulp would otherwise compound over the steps."""
        for i, p in enumerate(params):
            self.params[i].copy_(p.detach().to("cpu"))
            entry = optimizer.state.get(p, {})
            for name, value in self.slots[i].items():
                value.copy_(entry[name].detach().to("cpu"))

    def check(
        self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], dtype: torch.dtype
    ) -> None:
        """Every param, every state tensor (its storage dtype too) and every step count, element
        by element: float32 / float64 within TOLERANCES of the float64 run (NaN matches NaN);
        bfloat16 / float16 (lockstep) within LOCKSTEP_ULPS storage ulps."""
        triples: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        sums: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        for i, p in enumerate(params):
            triples.append((f"param {i}", p.detach().cpu(), self.params[i]))
            entry = optimizer.state.get(p, {})
            if self.steps[i] == 0:
                assert not entry, f"param {i} never had a grad but has state {sorted(entry)}"
                continue
            with_step = self.family in ("adam", "novograd", "fadam")
            expected = set(self.slots[i]) | ({"step"} if with_step else set())
            assert set(entry) == expected, f"param {i}: state {sorted(entry)}"
            for name, value in self.slots[i].items():
                # the param's dtype; NovoGrad's per-tensor scalars: float32 (float64 for float64)
                scalar = self.family == "novograd" and name in onepass.NovoGrad.spec.scalar_slots
                storage = scalar_slot_dtype(p.dtype) if scalar else p.dtype
                assert entry[name].dtype == storage, f"state[{i}][{name!r}] is {entry[name].dtype}"
                what = f"state[{i}][{name!r}]"
                if scalar and dtype in LOW_PRECISION:
                    # A sum over the tensor, in the kernel's order (a compiled GPU kernel's
                    # tree differs from the interpreter's): fp32 tolerances, not one fp32 ulp.
                    sums.append((what, entry[name].detach().cpu(), value))
                    continue
                triples.append((what, entry[name].detach().cpu(), value))
            if with_step:
                assert entry["step"].dtype == torch.float32
                assert float(entry["step"]) == self.steps[i], f"param {i}: step"
        if dtype in LOW_PRECISION:
            triples = [(what, *_nan_matched(a, e, what)) for what, a, e in triples]
            assert_all_close(triples, 0.0, LOCKSTEP_ATOL, ulps=LOCKSTEP_ULPS)
            if sums:
                sums = [(what, *_nan_matched(a, e, what)) for what, a, e in sums]
                assert_all_close(sums, *TOLERANCES[torch.float32])
        else:
            assert_all_close(triples, *TOLERANCES[dtype])


def _nan_matched(
    actual: torch.Tensor, expected: torch.Tensor, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN exactly where the reference has NaN; then both with those NaNs set to 0, so the
    ulp check's not-equal fraction does not count them (a NaN is not equal to itself)."""
    nan = expected.isnan()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.equal(actual.isnan(), nan), f"{what}: NaN at other elements than the reference"
    return actual.masked_fill(nan, 0.0), expected.masked_fill(nan, 0.0)


# ------------------------------------------------------------------------------------------------
# Params, grads, runs
# ------------------------------------------------------------------------------------------------


def _params(dtype: torch.dtype, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """Random leaf params of the given sizes, a matrix, a non-contiguous (transposed) one and,
    last, a frozen one."""
    params = [torch.randn(n).to(DEVICE, dtype) for n in sizes]
    params.append(torch.randn(3, 5).to(DEVICE, dtype))
    params.append(torch.randn(6, 5).to(DEVICE, dtype).t())
    params = [p.requires_grad_() for p in params]
    params.append(torch.randn(4).to(DEVICE, dtype))  # frozen
    return params


def _grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor | None]:
    """Random grads (never zero); every third param has none on even steps, params 2, 7, 12...
    none on their first two steps (they start later: first momentum step, bias corrections)."""
    grads: list[torch.Tensor | None] = []
    for i, p in enumerate(params):
        if not p.requires_grad or (i % 3 == 1 and step % 2 == 0) or (i % 5 == 2 and step < 3):
            grads.append(None)
        else:
            grads.append(torch.randn(p.shape).to(DEVICE, p.dtype))
    return grads


def _run(
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    family: str,
    dtype: torch.dtype,
    sizes: tuple[int, ...] = (0, 1, 7, 4097, 2000),
    scale: float = 1.0,
    steps: int = STEPS,
) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    params = _params(dtype, sizes)
    optimizer = make(params)
    reference = Reference(family, params, _ref_dtype(dtype))
    for step in range(1, steps + 1):
        grads = _grads(params, step)
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g * scale
        if scale != 1.0:
            optimizer.grad_scale = torch.tensor(scale, device=DEVICE)  # as a GradScaler does
            optimizer.found_inf = torch.tensor(0.0, device=DEVICE)
        if dtype in LOW_PRECISION:
            reference.sync(optimizer, params)
        optimizer.step()
        reference.step(optimizer.param_groups[0], grads, 1.0)
        reference.check(optimizer, params, dtype)
    return optimizer, params


ADAM_CASES = {
    "adam": lambda ps: onepass.Adam(ps, lr=1e-2, backend="triton"),
    "adam-l2-amsgrad-maximize": lambda ps: onepass.Adam(
        ps, lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True, backend="triton"
    ),
    "adamw-betas-eps": lambda ps: onepass.AdamW(
        ps, lr=2e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, backend="triton"
    ),
    "adamw-independent-amsgrad": lambda ps: onepass.AdamW(
        ps, lr=1e-2, weight_decay=0.2, decay="independent", amsgrad=True, backend="triton"
    ),
}
SGD_CASES = {
    "sgd": lambda ps: onepass.SGD(ps, lr=0.1, backend="triton"),
    "sgd-l2-maximize": lambda ps: onepass.SGD(
        ps, lr=0.1, weight_decay=0.1, maximize=True, backend="triton"
    ),
    "sgd-momentum-dampening": lambda ps: onepass.SGD(
        ps, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.1, backend="triton"
    ),
    "sgd-nesterov-maximize": lambda ps: onepass.SGD(
        ps, lr=0.1, momentum=0.9, nesterov=True, maximize=True, backend="triton"
    ),
    "sgdw-momentum": lambda ps: onepass.SGDW(
        ps, lr=0.1, momentum=0.9, weight_decay=0.1, backend="triton"
    ),
    "sgdw-independent-nesterov": lambda ps: onepass.SGDW(
        ps,
        lr=0.1,
        momentum=0.8,
        nesterov=True,
        weight_decay=0.1,
        decay="independent",
        backend="triton",
    ),
}
LION_CASES = {
    "lion": lambda ps: onepass.Lion(ps, lr=1e-2, backend="triton"),
    "lion-decoupled-betas": lambda ps: onepass.Lion(
        ps, lr=1e-2, betas=(0.95, 0.98), weight_decay=0.1, backend="triton"
    ),
    "lion-l2-maximize": lambda ps: onepass.Lion(
        ps, lr=1e-2, weight_decay=0.1, decay="l2", maximize=True, backend="triton"
    ),
    "lion-independent": lambda ps: onepass.Lion(
        ps, lr=1e-2, weight_decay=0.5, decay="independent", backend="triton"
    ),
}
NOVOGRAD_CASES = {
    "novograd": lambda ps: onepass.NovoGrad(ps, lr=1e-2, backend="triton"),
    "novograd-wd-averaging-amsgrad-maximize": lambda ps: onepass.NovoGrad(
        ps,
        lr=1e-2,
        weight_decay=0.1,
        grad_averaging=True,
        amsgrad=True,
        maximize=True,
        backend="triton",
    ),
}
FADAM_CASES = {
    "fadam": lambda ps: onepass.FAdam(ps, lr=1e-2, backend="triton"),
    "fadam-clip-p-maximize": lambda ps: onepass.FAdam(
        ps, lr=1e-2, clip=0.5, p=0.25, weight_decay=0.2, maximize=True, backend="triton"
    ),
}
CASES = [("adam", name, make) for name, make in ADAM_CASES.items()]
CASES += [("sgd", name, make) for name, make in SGD_CASES.items()]
CASES += [("lion", name, make) for name, make in LION_CASES.items()]
CASES += [("novograd", name, make) for name, make in NOVOGRAD_CASES.items()]
CASES += [("fadam", name, make) for name, make in FADAM_CASES.items()]
#: Every case in float32; one or two per algorithm in each other dtype ...
NARROW = (
    "adam-l2-amsgrad-maximize",
    "adamw-independent-amsgrad",
    "sgd-nesterov-maximize",
    "lion-l2-maximize",
    "novograd-wd-averaging-amsgrad-maximize",
    "fadam-clip-p-maximize",
)
#: ... and these in bfloat16 and float16 too: AdamW's default (decoupled) decay, SGD's momentum
#: with dampening, SGDW, Lion's decoupled and independent decay.
SIXTEEN_BIT_TOO = (
    "adamw-betas-eps",
    "sgd-momentum-dampening",
    "sgdw-momentum",
    "lion-decoupled-betas",
    "lion-independent",
)


#: One case per family for the AMP tests.
AMP_CASES = {
    "adam": ADAM_CASES["adam-l2-amsgrad-maximize"],
    "sgd": SGD_CASES["sgd-momentum-dampening"],
    "lion": LION_CASES["lion-l2-maximize"],
    "novograd": NOVOGRAD_CASES["novograd-wd-averaging-amsgrad-maximize"],
    "fadam": FADAM_CASES["fadam-clip-p-maximize"],
}


def _cases() -> Iterator[Any]:
    for family, name, make in CASES:
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            if (
                dtype == torch.float32
                or name in NARROW
                or (dtype in LOW_PRECISION and name in SIXTEEN_BIT_TOO)
            ):
                dtype_id = str(dtype).removeprefix("torch.")
                yield pytest.param(family, make, dtype, id=f"{name}-{dtype_id}")


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "make", "dtype"), list(_cases()))
def test_matches_reference(family: str, make: Callable, dtype: torch.dtype) -> None:
    """7 steps: odd and zero sizes, a matrix, a non-contiguous param, a frozen one, None grads."""
    optimizer, params = _run(make, family, dtype)
    bucket = optimizer._engine.plans[0].buckets[0]
    assert bucket.backend == "triton"
    assert bucket.step.device == params[0].device


def test_many_tensors() -> None:
    """1,000 tensors in one bucket (odd and even sizes up to 40, zero-size ones, one of two
    chunks, a matrix and a transposed one), one launch per step: every param and state tensor
    and the per-tensor step counts against the reference. 3 steps (the interpreter costs ~15 ms
    per program, 1,000 programs a step) cover the None-grad pattern: every third tensor idle on
    step 2, every fifth starting on step 3."""
    sizes = [int(n) for n in torch.randint(0, 40, (997,))]
    sizes[::50] = [0] * len(sizes[::50])
    make = ADAM_CASES["adamw-independent-amsgrad"]
    optimizer, params = _run(make, "adam", torch.float32, sizes=(*sizes, 4100), steps=3)
    assert len(optimizer._engine.plans[0].buckets[0].params) == 1000
    steps = [int(optimizer.state[p]["step"]) for p in params if p.requires_grad]
    assert sorted(set(steps)) == [1, 2, 3]  # (each one checked against the reference's)


def test_multi_tile_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU configuration: CHUNK / BLOCK tiles per program, unmasked full chunks."""
    from onepass.triton_kernels import common

    monkeypatch.setattr(common, "BLOCK", 1024)
    for family, name in (
        ("adam", "adam-l2-amsgrad-maximize"),
        ("sgd", "sgd-momentum-dampening"),
        ("lion", "lion-decoupled-betas"),
        ("novograd", "novograd-wd-averaging-amsgrad-maximize"),
        ("fadam", "fadam-clip-p-maximize"),
    ):
        make = {**ADAM_CASES, **SGD_CASES, **LION_CASES, **NOVOGRAD_CASES, **FADAM_CASES}[name]
        _run(make, family, torch.float32, sizes=(1, 1500, 4096, 9000))


@triton.jit
def _sum_partials_kernel(
    partial_ptr, out_ptr, first, count, STRIDE: tl.constexpr, BLOCK: tl.constexpr
):
    tl.store(out_ptr, sum_partials(partial_ptr + 1, first, count, STRIDE, BLOCK))


@pytest.mark.parametrize("count", [1, 63, 64, 1000])
def test_sum_partials_reads_every_partial_of_the_tensor(count: int) -> None:
    """NovoGrad's and FAdam's last program sums its tensor's partials BLOCK at a time: every one
    of them (several blocks, a masked tail), every STRIDE-th value, none of its neighbours'."""
    first = 5
    partials = torch.randn(2 * (first + count + 5), dtype=torch.float64, device=DEVICE)
    out = torch.zeros(1, dtype=torch.float64, device=DEVICE)
    _sum_partials_kernel[(1,)](partials, out, first, count, STRIDE=2, BLOCK=64)
    want = partials[1::2][first : first + count].sum()
    torch.testing.assert_close(out[0], want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("shift", [0, 3], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("block", [None, 1024], ids=["block-default", "block-1024"])
def test_writes_stay_in_bounds(monkeypatch: pytest.MonkeyPatch, shift: int, block: int) -> None:
    """Params and grads are views into poisoned buffers, at sizes around the chunk and tile
    edges (and, shifted, at addresses that are not 16-byte aligned): the kernels write every
    element of every param and nothing else; grads are only read; the flat state's padding stays
    zero."""
    from onepass.triton_kernels import common

    if block is not None:
        monkeypatch.setattr(common, "BLOCK", block)
    sizes = (1, 17, 1023, 1025, 4095, 4096, 4097)
    spans, end = [], 0
    for n in sizes:  # 32 to 47 poisoned elements around each param, starts 64-byte aligned
        start = (end + 32 + 15) // 16 * 16
        spans.append((start + shift, n))
        end = start + shift + n
    total = end + 32
    poison = 12345.0
    param_storage = torch.full((total,), poison, device=DEVICE)
    grad_storage = torch.randn(total).to(DEVICE)
    grads_before = grad_storage.clone()
    params = [param_storage[a : a + n].normal_().requires_grad_() for a, n in spans]
    inside = torch.zeros(total, dtype=torch.bool, device=DEVICE)
    for a, n in spans:
        inside[a : a + n] = True
    optimizer = onepass.AdamW(params, lr=1e-2, amsgrad=True, backend="triton")
    before = param_storage.clone()
    for _ in range(2):
        for p, (a, n) in zip(params, spans, strict=True):
            p.grad = grad_storage[a : a + n]
        optimizer.step()
    assert bool((param_storage[inside] != before[inside]).all()), "an element was not written"
    assert bool((param_storage[~inside] == poison).all()), "a write outside the params"
    assert torch.equal(grad_storage, grads_before), "a write to a grad"
    bucket = optimizer._engine.plans[0].buckets[0]
    assert bucket.table_cache["triton"].aligned == (shift == 0)
    used = torch.zeros(bucket.total, dtype=torch.bool, device=DEVICE)
    for offset, (_, n) in zip(bucket.offsets.tolist(), spans, strict=True):
        used[offset : offset + n] = True
    for name, buffer in bucket.buffers.items():
        assert bool((buffer[used] != 0).all()), f"{name}: an element was not written"
        assert bool((buffer[~used] == 0).all()), f"{name}: a write into the padding"


@pytest.mark.parametrize("family", list(AMP_CASES))
def test_grad_scale_unscales(family: str) -> None:
    """GradScaler-style grad_scale: g / scale in the kernel, read from the device."""
    make = AMP_CASES[family]
    _run(make, family, torch.float32, sizes=(7, 300), scale=1024.0)


@pytest.mark.parametrize("family", list(AMP_CASES))
def test_found_inf_skips_everything(family: str) -> None:
    """found_inf != 0: params, state and step counts stay bitwise as they were."""
    make = AMP_CASES[family]
    params = _params(torch.float32, (5, 4100))
    optimizer = make(params)
    for step in (1, 2):
        for p, g in zip(params, _grads(params, step), strict=True):
            p.grad = g
        optimizer.step()
    bucket = optimizer._engine.plans[0].buckets[0]
    before = [p.detach().clone() for p in params]
    state_before = {name: buf.clone() for name, buf in bucket.buffers.items()}
    step_before = bucket.step.clone()
    for p in params:
        if p.requires_grad:
            p.grad = torch.randn(p.shape).to(DEVICE)
    optimizer.grad_scale = torch.tensor(65536.0, device=DEVICE)
    optimizer.found_inf = torch.tensor(1.0, device=DEVICE)
    optimizer.step()
    for p, old in zip(params, before, strict=True):
        assert torch.equal(p, old)
    for name, buf in bucket.buffers.items():
        assert torch.equal(buf, state_before[name]), name
    assert torch.equal(bucket.step, step_before)
    # ... and the next clean step steps.
    optimizer.found_inf = torch.tensor(0.0, device=DEVICE)
    optimizer.step()
    assert not torch.equal(params[0], before[0])
    assert float(bucket.step[0]) == float(step_before[0]) + 1


def test_muon_found_inf_skips_everything() -> None:
    """Muon on Triton, a GradScaler-skipped step (found_inf = 1, an inf and a NaN grad): the
    matrices' params and momentum buffers, the AdamW part's params, moments and steps, and every
    bucket's step counters stay bitwise as they were (the momentum pass reads found_inf in the
    kernel; the final pass alone keeping the params would not do). A matrix whose first grad
    arrives on the skipped step starts on the next one. The clean step after it matches the
    reference backend, which never saw the skipped step."""
    shapes = [(17, 33), (40, 9), (8, 24), (8, 24), (33,), (0,)]
    start = [torch.randn(shape, dtype=torch.float32) for shape in shapes]
    kwargs: dict[str, Any] = {"lr": 0.02, "weight_decay": 0.1, "ns_dtype": torch.float32}
    params = [p.clone().to(DEVICE).requires_grad_() for p in start]
    twins = [p.clone().requires_grad_() for p in start]
    optimizer = onepass.Muon(params, backend="triton", **kwargs)
    reference = onepass.Muon(twins, backend="reference", **kwargs)
    scale = 1024.0

    def step(found_inf: float, late: bool = True) -> None:
        grads = [torch.randn(p.shape) for p in params]
        if not late:
            grads[1] = None  # (40, 9) has no grad on the first step
        if found_inf:  # what the GradScaler found
            grads[0][3, 5], grads[4][7] = float("inf"), float("nan")
        for p, q, g in zip(params, twins, grads, strict=True):
            p.grad = None if g is None else (g * scale).to(DEVICE)
            q.grad = None if g is None else g.clone()
        optimizer.grad_scale = torch.tensor(scale, device=DEVICE)
        optimizer.found_inf = torch.tensor(found_inf, device=DEVICE)
        optimizer.step()
        if not found_inf:
            reference.step()

    step(0.0, late=False)
    buckets = [b for plan in optimizer._engine.plans for b in plan.buckets]
    assert [b.backend for b in buckets] == ["triton", "triton"]  # the matrices; the AdamW part
    before = [p.detach().clone() for p in params]
    state_before = {
        i: {key: value.clone() for key, value in optimizer.state[p].items()}
        for i, p in enumerate(params)
        if p in optimizer.state
    }
    assert set(state_before) == {0, 2, 3, 4, 5}
    buffers_before = [{k: v.clone() for k, v in b.buffers.items()} for b in buckets]
    steps_before = [b.step.clone() for b in buckets]
    step(1.0)
    for i, (p, old) in enumerate(zip(params, before, strict=True)):
        assert torch.equal(p, old), f"param {i}"
        for key, value in state_before.get(i, {}).items():
            assert torch.equal(optimizer.state[p][key], value), f"state[{i}][{key!r}]"
    for b, buffers, steps in zip(buckets, buffers_before, steps_before, strict=True):
        for name, value in buffers.items():
            assert torch.equal(b.buffers[name], value), name
        assert torch.equal(b.step, steps)
    late = optimizer.state.get(params[1], {})
    assert all(not bool(v.any()) for v in late.values()), "the late matrix's state moved"
    step(0.0)
    for i, (p, q) in enumerate(zip(params, twins, strict=True)):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=2e-5, atol=2e-6)
        assert set(optimizer.state[p]) == set(reference.state[q]), i
        for key, value in reference.state[q].items():
            what = f"state[{i}][{key!r}]"
            torch.testing.assert_close(
                optimizer.state[p][key].cpu(),
                value,
                rtol=2e-5,
                atol=2e-6,
                msg=lambda m, w=what: f"{w}: {m}",
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lion_sign_of_zero_is_zero(dtype: torch.dtype) -> None:
    """Lion moves a param by lr * sign(beta1 * m + (1 - beta1) * g): where that direction is
    exactly zero the element stays where it is (sign(+0) = sign(-0) = 0, as torch.sign and
    math.h's op_sign), every other element moves by exactly lr. Step 1: grads +0 and -0 on a
    zero momentum; step 2: grads that cancel the momentum (betas (0.75, 0.5): m = g1 / 2, and
    g2 = -3 m gives 0.75 m - 0.75 m, every product exact for these small dyadic values). In a
    tensor's full (unmasked) chunk and in masked tails. Bitwise against the rule in float64 and
    the reference backend."""
    lr, kwargs = 0.25, {"betas": (0.75, 0.5), "weight_decay": 0.0}
    sizes = (37, 4100)
    first = [torch.randint(-4, 5, (n,)).to(torch.float64) / 2 for n in sizes]
    second = [torch.randn(n, dtype=torch.float64) for n in sizes]
    for g1, g2 in zip(first, second, strict=True):
        g1[::3] = 0.0
        g1[1::6] = -0.0
        g2[::2] = -3 * (g1[::2] / 2)  # cancels m = g1 / 2 (-0.0 where g1 is +0)
        g2.copy_(g2.to(dtype))  # the rule below sees the grads as the optimizer does
    results = {}
    for backend, device in (("triton", DEVICE), ("reference", torch.device("cpu"))):
        params = [torch.full((n,), 2.0, dtype=dtype, device=device).requires_grad_() for n in sizes]
        optimizer = onepass.Lion(params, lr=lr, backend=backend, **kwargs)
        for grads in (first, second):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.to(device, dtype)
            optimizer.step()
        results[backend] = [(p.detach().cpu(), optimizer.state[p]["exp_avg"].cpu()) for p in params]
    for i, (g1, g2) in enumerate(zip(first, second, strict=True)):
        c1 = 0.25 * g1  # beta1 * 0 + (1 - beta1) * g1
        c2 = 0.75 * (g1 / 2) + 0.25 * g2
        assert int((c1 == 0).sum()) >= sizes[i] // 3 and int((c2 == 0).sum()) >= sizes[i] // 2
        want = 2.0 - lr * torch.sign(c1) - lr * torch.sign(c2)
        for backend, tensors in results.items():
            param, _ = tensors[i]
            assert torch.equal(param.double(), want), f"{backend}: param {i}"
        assert torch.equal(results["triton"][i][1], results["reference"][i][1]), f"exp_avg {i}"


#: amsgrad configs for the non-finite test: (family, maker).
AMSGRAD_CASES = {
    "adam-amsgrad": ("adam", lambda ps: onepass.Adam(ps, lr=1e-2, amsgrad=True, backend="triton")),
    "novograd-amsgrad": (
        "novograd",
        lambda ps: onepass.NovoGrad(ps, lr=1e-2, weight_decay=0.1, amsgrad=True, backend="triton"),
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(AMSGRAD_CASES))
def test_non_finite_values_propagate_like_the_reference(case: str, dtype: torch.dtype) -> None:
    """No GradScaler, amsgrad: nan / inf grads (step 3; in a full chunk, a masked tail and a
    small tensor) propagate exactly as in the reference, every step, params and all state (NaN
    matches NaN). And a NaN already in the running max, with exp_avg_sq finite (loaded from a
    checkpoint, step 2): max(NaN, v) keeps it, as torch.maximum and math.h's op_max do, where
    ``a > b ? a : b`` would step on with v. (NaN grads alone cannot tell these apart: they make
    v NaN as well.) The tensors without a non-finite value stay finite."""
    family, make = AMSGRAD_CASES[case]
    sizes = (4100, 7, 45, 9)
    params = [torch.randn(n).to(DEVICE, dtype).requires_grad_() for n in sizes]
    optimizer = make(params)
    reference = Reference(family, params, _ref_dtype(dtype))
    for step in range(1, STEPS + 1):
        grads = [torch.randn(n).to(DEVICE, dtype) for n in sizes]
        if step == 3:
            for t, position, value in (
                (0, 5, "nan"),
                (0, 4099, "inf"),
                (1, 2, "-inf"),
                (1, 6, "nan"),
            ):
                grads[t][position] = float(value)
        if step == 2:  # a checkpoint whose running max of tensor 2 holds a NaN
            saved = copy.deepcopy(optimizer.state_dict())
            index = 3 if family == "adam" else ()
            saved["state"][2]["max_exp_avg_sq"][index] = float("nan")
            assert torch.isfinite(saved["state"][2]["exp_avg_sq"]).all()
            optimizer.load_state_dict(saved)
            reference.slots[2]["max_exp_avg_sq"][index] = float("nan")
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        if dtype in LOW_PRECISION:
            reference.sync(optimizer, params)
        optimizer.step()
        reference.step(optimizer.param_groups[0], list(grads), 1.0)
        reference.check(optimizer, params, dtype)
    assert bool(optimizer.state[params[2]]["max_exp_avg_sq"].isnan().any())
    assert bool(params[2].isnan().any()) and bool(params[0].isnan().any())
    assert bool(params[1].isnan().any()) and bool(torch.isfinite(params[3]).all())


def test_flatten_steps_one_segment() -> None:
    """flatten=True: the bucket's flat param/grad buffers, stepped as a single table row."""
    params = [torch.randn(n).to(DEVICE).requires_grad_() for n in (7, 4097, 300)]
    optimizer = onepass.AdamW(params, lr=1e-2, weight_decay=0.1, flatten=True, backend="triton")
    reference = Reference("adam", params, torch.float64)
    for step in range(1, STEPS + 1):
        grads = [torch.randn(p.shape).to(DEVICE) for p in params]  # all: the one-segment path
        for p, g in zip(params, grads, strict=True):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        optimizer.step()
        reference.step(optimizer.param_groups[0], grads, 1.0)
        reference.check(optimizer, params, torch.float32)
        assert (
            step == 1 or len(optimizer._engine.plans[0].buckets[0].table_cache["triton"].key) == 2
        )


def test_table_is_cached_until_an_address_changes() -> None:
    params = _params(torch.float32, (7, 100))
    optimizer = onepass.Adam(params, lr=1e-2, backend="triton")
    grads = _grads(params, 1)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    optimizer.step()
    bucket = optimizer._engine.plans[0].buckets[0]
    table = bucket.table_cache["triton"]
    for p in params:  # grads updated in place: same addresses
        if p.grad is not None:
            p.grad.normal_()
    optimizer.step()
    assert bucket.table_cache["triton"] is table
    params[0].grad = None  # the set of None grads changes
    optimizer.step()
    assert bucket.table_cache["triton"] is not table
    assert bucket.table_cache["triton"].segments.shape[0] == table.segments.shape[0] - 1


def test_a_captured_table_outlives_its_replacement(monkeypatch: pytest.MonkeyPatch) -> None:
    """A table that a step captured in a CUDA graph read is kept when other grads replace it
    (the graph reads it at every replay); one no capture read is let go. The capture query is
    stood in for (no CUDA graphs on the CPU); tests/test_gpu.py replays real graphs."""
    from onepass.triton_kernels import common

    params = _params(torch.float32, (7, 100))
    optimizer = onepass.Adam(params, lr=1e-2, backend="triton")

    def step(capturing: bool) -> Any:
        monkeypatch.setattr(common, "_capturing", lambda device: capturing)
        for p in params:  # new grad tensors: new addresses, a new table
            if p.requires_grad:
                p.grad = torch.randn_like(p)
        optimizer.step()
        return optimizer._engine.plans[0].buckets[0].table_cache

    eager = step(False)["triton"]
    captured = step(True)["triton"]
    assert captured.captured and not eager.captured
    cache = step(False)
    assert cache["triton"] is not captured and not cache["triton"].captured
    assert cache["retained"] == [captured]
    step(False)
    assert cache["retained"] == [captured]


@pytest.mark.skipif(not INTERPRETED, reason="checks the CPU-tensor guard of the interpreter")
def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    param = torch.zeros(3, requires_grad=True)
    optimizer = onepass.SGD([param], lr=0.1, backend="triton")
    param.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        optimizer.step()
    assert torch.count_nonzero(param) == 0


_COMPILE_CHECK = textwrap.dedent(
    """
    import inspect
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from onepass.triton_kernels.adam import adam_kernel
    from onepass.triton_kernels.sgd import sgd_kernel
    from onepass.triton_kernels.lion import lion_kernel
    from onepass.triton_kernels.muon import muon_momentum_kernel

    NAMES = {tl.float32: "fp32", tl.float64: "fp64", tl.bfloat16: "bf16", tl.float16: "fp16"}
    FLAGS = {
        adam_kernel: ("AMSGRAD", "L2_DECAY", "SR"),
        sgd_kernel: ("MOMENTUM", "NESTEROV", "L2_DECAY", "SR"),
        lion_kernel: ("L2_DECAY", "SR"),
        muon_momentum_kernel: ("NESTEROV", "TO_GRAD_FROM_START", "TO_MOMENTUM_FROM_START"),
    }
    # vector loads of full tiles: p, g and the state slots (Muon's pass: g and its buffer)
    ARRAYS = {adam_kernel: 5, sgd_kernel: 3, lion_kernel: 3, muon_momentum_kernel: 2}
    VARIANTS = [(dtype, True) for dtype in NAMES] + [(tl.float32, False), (tl.bfloat16, False)]
    for dtype, on in VARIANTS:  # every flag on; then every flag off
        opmath = tl.float64 if dtype == tl.float64 else tl.float32
        for kernel, flags in FLAGS.items():
            constexprs = dict(DTYPE=dtype, OPMATH=opmath, HAS_GRAD_SCALE=on, HAS_FOUND_INF=on,
                              ALIGNED=on, BLOCK=1024, CHUNK=4096, **{f: on for f in flags})
            signature, attrs = {}, {}
            for i, name in enumerate(inspect.signature(kernel.fn).parameters):
                if name in constexprs:
                    signature[name] = "constexpr"
                elif name in ("segments", "chunks"):
                    signature[name] = "*i64"
                elif name == "done_ptr":
                    signature[name] = "*i32"
                elif name in ("step_ptr", "grad_scale_ptr", "found_inf_ptr"):
                    signature[name] = "*fp32"
                elif name.endswith("_ptr"):
                    signature[name] = "*" + NAMES[dtype]
                else:
                    signature[name] = "i64"
                if signature[name].startswith("*"):  # what the launcher specializes on
                    attrs[(i,)] = [["tt.divisibility", 16]]
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
            ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
            vector = "ld.global.v2" if dtype == tl.float64 else "ld.global.v4"
            assert not on or ptx.count(vector) >= ARRAYS[kernel], (kernel, dtype, "unvectorized")
            for approx in ("sqrt.approx", "div.approx", "div.full", "rcp.approx"):
                assert approx not in ptx, (kernel, dtype, approx)
            assert "atom.global.gpu.acq_rel.add" in ptx and "bar.sync" in ptx
            print(kernel.fn.__name__, NAMES[dtype], "ok")
    """
)


def test_compiles_for_sm90() -> None:
    """The compiled path, without a GPU: every kernel compiles to sm_90 PTX (Triton's bundled
    LLVM and ptxas), full tiles use 16-byte vector accesses, division and square root are IEEE,
    the step counter's atomic and barrier are there."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" ok") == 24  # 4 kernels x 6 variants


_NOVOGRAD_COMPILE_CHECK = textwrap.dedent(
    """
    import inspect
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from onepass.triton_kernels.novograd import novograd_kernel, novograd_reduce_kernel

    NAMES = {tl.float32: "fp32", tl.float64: "fp64", tl.bfloat16: "bf16", tl.float16: "fp16"}
    for dtype in NAMES:
        for on in (True, False):
            opmath = tl.float64 if dtype == tl.float64 else tl.float32
            for kernel in (novograd_reduce_kernel, novograd_kernel):
                constexprs = dict(DTYPE=dtype, HAS_GRAD_SCALE=on, HAS_FOUND_INF=on, ALIGNED=on,
                                  BLOCK=1024, CHUNK=4096)
                names = list(inspect.signature(kernel.fn).parameters)
                if "OPMATH" in names:
                    constexprs["OPMATH"] = opmath
                if "SCALAR" in names:
                    constexprs.update(SCALAR=opmath, AMSGRAD=on)
                if "SR" in names:
                    constexprs["SR"] = on
                signature, attrs = {}, {}
                for i, name in enumerate(names):
                    if name in constexprs:
                        signature[name] = "constexpr"
                    elif name in ("segments", "chunks"):
                        signature[name] = "*i64"
                    elif name == "done_ptr":
                        signature[name] = "*i32"
                    elif name in ("step_ptr", "grad_scale_ptr", "found_inf_ptr"):
                        signature[name] = "*fp32"
                    elif name in ("partial_ptr", "denom_ptr"):
                        signature[name] = "*fp64"
                    elif name in ("exp_avg_sq_ptr", "max_exp_avg_sq_ptr"):
                        signature[name] = "*" + NAMES[opmath]
                    elif name.endswith("_ptr"):
                        signature[name] = "*" + NAMES[dtype]
                    else:
                        signature[name] = "i64"
                    if signature[name].startswith("*"):
                        attrs[(i,)] = [["tt.divisibility", 16]]
                source = ASTSource(
                    fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs
                )
                ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
                for approx in ("sqrt.approx", "div.approx", "div.full", "rcp.approx"):
                    assert approx not in ptx, (kernel, dtype, approx)
                assert "atom.global.gpu.acq_rel.add" in ptx and "bar.sync" in ptx
                if kernel is novograd_kernel and on:
                    vector = "ld.global.v2" if dtype == tl.float64 else "ld.global.v4"
                    assert ptx.count(vector) >= 3, (dtype, "unvectorized tiles")
                print(kernel.fn.__name__, NAMES[dtype], on, "ok")
    """
)


def test_novograd_compiles_for_sm90() -> None:
    """Both NovoGrad kernels compile to sm_90 PTX in every dtype, flags on and off: IEEE division
    and square root, the per-segment atomic and barrier, vector tiles in the update."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _NOVOGRAD_COMPILE_CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


_FADAM_COMPILE_CHECK = textwrap.dedent(
    """
    import inspect
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from onepass.triton_kernels.fadam import fadam_kernel, fadam_norms_kernel, fadam_reduce_kernel

    NAMES = {tl.float32: "fp32", tl.float64: "fp64", tl.bfloat16: "bf16", tl.float16: "fp16"}
    for dtype in NAMES:
        for on in (True, False):
            opmath = tl.float64 if dtype == tl.float64 else tl.float32
            for kernel in (fadam_reduce_kernel, fadam_norms_kernel, fadam_kernel):
                constexprs = dict(DTYPE=dtype, HAS_GRAD_SCALE=on, HAS_FOUND_INF=on, ALIGNED=on,
                                  BLOCK=1024, CHUNK=4096)
                names = list(inspect.signature(kernel.fn).parameters)
                if "OPMATH" in names:
                    constexprs.update(OPMATH=opmath, SQRT_POWER=on)
                if "SR" in names:
                    constexprs["SR"] = on
                signature, attrs = {}, {}
                for i, name in enumerate(names):
                    if name in constexprs:
                        signature[name] = "constexpr"
                    elif name in ("segments", "chunks"):
                        signature[name] = "*i64"
                    elif name == "done_ptr":
                        signature[name] = "*i32"
                    elif name in ("step_ptr", "grad_scale_ptr", "found_inf_ptr"):
                        signature[name] = "*fp32"
                    elif name in ("partial_ptr", "scalars_ptr"):
                        signature[name] = "*fp64"
                    elif name.endswith("_ptr"):
                        signature[name] = "*" + NAMES[dtype]
                    else:
                        signature[name] = "i64"
                    if signature[name].startswith("*"):
                        attrs[(i,)] = [["tt.divisibility", 16]]
                source = ASTSource(
                    fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs
                )
                ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
                for approx in ("sqrt.approx.f32", "div.approx.f32", "div.full.f32"):
                    assert approx not in ptx, (kernel, dtype, approx)
                assert "atom.global.gpu.acq_rel.add" in ptx and "bar.sync" in ptx
                print(kernel.fn.__name__, NAMES[dtype], on, "ok")
    """
)


def test_fadam_compiles_for_sm90() -> None:
    """The three FAdam kernels compile to sm_90 PTX in every dtype, flags on and off (p = 0.5 and
    the general power): IEEE fp32 division and square root, the per-segment atomic and barrier."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _FADAM_COMPILE_CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" ok") == 24  # 3 kernels x 8 variants


def test_launches_compile_for_sm90() -> None:
    """tools/check_triton.py: the kernels compile for sm_90 as the launchers call them, through
    Triton's own JIT (a stand-in driver, every launch a warm-up), with the argument types Triton
    derives from real launches (an int that fits 32 bits is an i32: a weight decay of 0 passes
    its bits as one) and the mixed layouts (bf16 state, fp32 masters, fp32 grads of bf16 params)
    that the hand-written signatures above leave out."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "check_triton.py")
    result = subprocess.run(
        [sys.executable, tool], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if "check_triton: skipped" in result.stdout:
        pytest.skip(result.stdout.strip())
    assert "96 of 96 cases compiled" in result.stdout, result.stdout
    for kernel in ("adam", "sgd", "lion", "novograd", "fadam", "muon_momentum"):
        assert f"{kernel}_kernel" in result.stdout


def test_negated_view_grad_is_staged() -> None:
    """A grad with torch's lazy negation (its memory holds -g) is staged as a plain copy."""
    p = torch.ones(9, device=DEVICE, requires_grad=True)
    p.grad = torch._neg_view(-torch.arange(9.0, device=DEVICE))
    onepass.SGD([p], lr=0.1, backend="triton").step()
    torch.testing.assert_close(p.detach(), 1 - 0.1 * torch.arange(9.0, device=DEVICE))


def test_fadam_all_zero_grad_takes_eps() -> None:
    """An all-zero grad (F = 0 where it has never had a gradient) steps with eps_t = eps, as the
    reference does (tests/test_fadam.py): finite, and the same values."""
    torch.manual_seed(0)
    partly = torch.randn(257, dtype=torch.float64)
    partly[::3] = 0.0
    grads = [
        [torch.zeros(7, dtype=torch.float64), partly],
        [torch.randn(7, dtype=torch.float64), torch.zeros(257, dtype=torch.float64)],
    ]
    start = [torch.randn(n, dtype=torch.float64) for n in (7, 257)]
    results = []
    for backend, device in (("triton", DEVICE), ("reference", torch.device("cpu"))):
        params = [p.clone().to(device).requires_grad_() for p in start]
        optimizer = onepass.FAdam(params, lr=3e-2, backend=backend)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.to(device)
            optimizer.step()
        results.append([p.detach().cpu() for p in params])
    for ours, expected in zip(*results, strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)


def test_fadam_nan_element_makes_the_tensor_nan() -> None:
    """A NaN grad element (no GradScaler to skip the step) makes RMS(gn) NaN, and the clip
    divisor max(1, NaN) is NaN on every backend (math.h op_max): the whole tensor's param and
    momentum go NaN, as the reference's do, where tl.maximum alone would keep the other elements.
    The other tensor of the step is untouched by it."""
    torch.manual_seed(0)
    start = [torch.randn(n, dtype=torch.float32) for n in (8, 33)]
    grads = [torch.randn(n, dtype=torch.float32) for n in (8, 33)]
    grads[0][3] = float("nan")
    for backend, device in (("triton", DEVICE), ("reference", torch.device("cpu"))):
        params = [p.clone().to(device).requires_grad_() for p in start]
        optimizer = onepass.FAdam(params, lr=1e-3, backend=backend)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(device)
        optimizer.step()
        assert params[0].isnan().all(), backend
        assert optimizer.state[params[0]]["momentum"].isnan().all(), backend
        assert torch.isfinite(params[1]).all(), backend


BIG = (1 << 20) + 3


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="29-110 s a case under the interpreter: compiled only")
@pytest.mark.parametrize(
    ("family", "name"),
    [
        ("adam", "adamw-betas-eps"),
        ("novograd", "novograd-wd-averaging-amsgrad-maximize"),
        ("fadam", next(iter(FADAM_CASES))),
    ],
)
def test_large_tensor(family: str, name: str) -> None:
    """2^20+3 elements beside a small tensor, 7 steps, params and every state tensor against the
    float64 reference: many chunks in one tensor, and for NovoGrad and FAdam one tensor's
    reductions over them (compiled kernels: on a GPU, in bench/gpu_check.sh's reference phase)."""
    make = {**ADAM_CASES, **NOVOGRAD_CASES, **FADAM_CASES}[name]
    params = [
        torch.randn(BIG).to(DEVICE).requires_grad_(),
        torch.randn(5).to(DEVICE).requires_grad_(),
    ]
    optimizer = make(params)
    reference = Reference(family, params, torch.float64)
    for _ in range(STEPS):
        grads = [torch.randn(p.shape).to(DEVICE) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()
        reference.step(optimizer.param_groups[0], grads, 1.0)
        reference.check(optimizer, params, torch.float32)
