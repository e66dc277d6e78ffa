"""Every backend against the reference oracle (issue items 1 and 7).

Each test builds an optimizer on random params of sizes 0, 1, 7, 4097, a matrix, a transposed and
a strided (non-contiguous) param and a frozen param; steps it 7 times with random grads (None for
some params on some steps) under an LR schedule that changes lr every step; and checks every
param, every state tensor and every 'step' against :class:`helpers.ReferenceRun`, which calls
``adam_reference`` / ``sgd_reference`` directly, one tensor at a time:

* float64 and float32 storage: the oracle runs in float64 on float64 copies, for all 7 steps
  (DESIGN.md's tolerances, helpers.TOLERANCES);
* bfloat16 and float16 storage: in lockstep. Each step, the oracle runs in the storage dtype (fp32
  math, every result rounded to the storage dtype: the kernels' own rounding path) from the
  optimizer's own values of the step before, and every element must be within one storage ulp.
  Why not 7 free-running steps at 5e-3: both sides differ by fp32 operation order, which now and
  then moves a value across a bf16 rounding boundary (one ulp = 2^-8..2^-7 relative, more than
  5e-3); from then on the two runs follow different bf16 paths, and SGD momentum (lr 0.1) grew
  one such flip to 8 ulp of a param in 7 steps (measured). In lockstep nothing accumulates, so
  the check is both sound and sharper (one ulp, tiny atol: a wrong second moment would not hide
  under a 5e-3 atol).

Params whose grad is None on a step are checked bitwise unchanged on that step (state too).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

import onepass

from helpers import (
    ADAM_INFO,
    ADAMW_INFO,
    CAPABILITIES,
    DTYPES,
    EVERY_OPTIMIZER,
    FADAM_INFO,
    LION_INFO,
    LOW_PRECISION,
    NOVOGRAD_INFO,
    SGD_INFO,
    SGDW_INFO,
    TOLERANCES,
    Backend,
    Config,
    OptimizerInfo,
    ReferenceRun,
    all_backends,
    bitwise_equal,
    dtype_id,
    make_grads,
    make_params,
    needs_native,
    optimizer_cases,
    reference_dtype,
    set_grads,
    skip_unless_implemented,
)

STEPS = 7
#: Lockstep atol: only absorbs results that cancel to ~0 (fp32 error relative to the operands).
LOCKSTEP_ATOL = 1e-6


def _schedule(step: int) -> float:
    """LambdaLR factor: lr changes at every step (so runtime scalars are re-read every step)."""
    return 1.0 / (1.0 + 0.25 * step)


def check_against_reference(
    info: OptimizerInfo,
    config: Config,
    backend: str,
    dtype: torch.dtype,
    params: Sequence[torch.Tensor],
    steps: int = STEPS,
    none_pattern: bool = True,
) -> torch.optim.Optimizer:
    skip_unless_implemented(info, backend)
    rtol, atol = TOLERANCES[dtype]
    lockstep = dtype in LOW_PRECISION
    optimizer = info.onepass_cls(params, **config, backend=backend)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule)
    reference = ReferenceRun(info, config, params, reference_dtype(dtype))
    for s in range(1, steps + 1):
        grads = make_grads(params, s, none_pattern)
        set_grads(params, grads)
        idle = [i for i, g in enumerate(grads) if g is None]
        before = {i: params[i].detach().clone() for i in idle}
        state_before = {
            i: {k: v.clone() for k, v in optimizer.state[params[i]].items()}
            for i in idle
            if params[i] in optimizer.state
        }
        lr = float(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step(grads, lr)
        schedule.step()
        if lockstep:
            reference.check(optimizer, params, rtol, atol=LOCKSTEP_ATOL, ulps=1.0)
            reference.sync(optimizer, params)
        for i in idle:  # no grad this step: param, state and step untouched
            assert bitwise_equal(params[i], before[i]), f"step {s}: param {i} had no grad"
            for k, v in state_before.get(i, {}).items():
                now = optimizer.state[params[i]][k]
                assert bitwise_equal(now, v), f"step {s}: state[{i}][{k!r}] had no grad"
    assert optimizer.param_groups[0]["lr"] != config["lr"], "the schedule did not change lr"
    if not lockstep:
        reference.check(optimizer, params, rtol, atol)
    return optimizer


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("info", "config"), optimizer_cases())
def test_backend_matches_reference(
    info: OptimizerInfo, config: Config, backend: Backend, dtype: torch.dtype
) -> None:
    params = make_params(dtype)
    optimizer = check_against_reference(info, config, backend.name, dtype, params)
    frozen = params[-1]
    assert not frozen.requires_grad and frozen not in optimizer.state


@pytest.mark.parametrize(
    ("info", "config"),
    [
        pytest.param(ADAMW_INFO, {"lr": 1e-2, "amsgrad": True}, id="AdamW-amsgrad"),
        pytest.param(ADAM_INFO, {"lr": 1e-2, "weight_decay": 0.1}, id="Adam-l2"),
        pytest.param(SGD_INFO, {"lr": 0.1, "momentum": 0.9, "nesterov": True}, id="SGD-nesterov"),
        pytest.param(SGDW_INFO, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}, id="SGDW"),
        pytest.param(LION_INFO, {"lr": 1e-2, "weight_decay": 0.1}, id="Lion"),
        pytest.param(
            NOVOGRAD_INFO,
            {"lr": 1e-2, "weight_decay": 0.1, "grad_averaging": True, "amsgrad": True},
            id="NovoGrad",
        ),
        pytest.param(FADAM_INFO, {"lr": 1e-2, "weight_decay": 0.1}, id="FAdam"),
    ],
)
def test_many_small_tensors(info: OptimizerInfo, config: Config, backend: Backend) -> None:
    """1,000 tensors of small odd sizes in one bucket (one launch per step), float32 on every
    backend; bfloat16 for AdamW and SGD on the widest capability only (lockstep is slow on 1,000
    tensors; test_backend_matches_reference runs every algorithm in bf16). The per-tensor
    reductions (NovoGrad, FAdam) see 1,000 tensors of their own."""
    dtypes = [torch.float32]
    if CAPABILITIES and backend.capability == CAPABILITIES[-1] and info in (ADAMW_INFO, SGD_INFO):
        dtypes.append(torch.bfloat16)
    for dtype in dtypes:
        sizes = [(7 * i) % 61 + 1 for i in range(1000)]
        params = [torch.randn(n).to(dtype).requires_grad_() for n in sizes]
        check_against_reference(info, config, backend.name, dtype, params)


class _TaggedParameter(torch.nn.Parameter):
    """A Parameter subclass: its isinstance check may run Python (only the GIL holder may)."""


@pytest.fixture
def two_threads_or_more() -> Iterator[None]:
    """At least two torch threads for the test (the parallel scan runs on two or more): under
    OMP_NUM_THREADS=1 the tests of it would check nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.usefixtures("two_threads_or_more")
@pytest.mark.parametrize("unusual", ["none", "copy-on-write", "non-contiguous", "subclass"])
def test_many_tensors_scanned_in_parallel(unusual: str, backend: Backend) -> None:
    """An eager step over 1,024+ tensors reads their metadata on all of torch's threads
    (glue::scan_in_parallel); a copy-on-write param, in the calling thread's part or another's,
    is materialised after the parallel region. One tensor that only the serial scan handles, a
    non-contiguous param (a copy) or a Tensor subclass, hands the whole table to it. All match
    the reference, None grads included."""
    if backend.name != "cpu":
        pytest.skip("the parallel scan is the native eager path's")
    sizes = [(7 * i) % 61 + 1 for i in range(1500)]
    params = [torch.randn(n).requires_grad_() for n in sizes]
    odd = 1304  # never without a grad (helpers.grad_is_none)
    if unusual == "non-contiguous":
        params[odd] = torch.randn(2 * sizes[odd])[::2].requires_grad_()
    elif unusual == "subclass":
        params[odd] = _TaggedParameter(torch.randn(sizes[odd]))
    # Parts are whole blocks of 64 tensors: 4 is in the first part (the calling thread's), 1400
    # in another thread's. Both are materialised after the scan.
    sources = {i: torch.randn(sizes[i]) for i in (4, 1400)}
    if unusual == "copy-on-write":
        for i, source in sources.items():
            params[i] = torch._lazy_clone(source).requires_grad_()
    untouched = {i: source.clone() for i, source in sources.items()}
    before = onepass._C.parallel_scans()
    check_against_reference(ADAMW_INFO, {"lr": 1e-2}, backend.name, torch.float32, params)
    scans = onepass._C.parallel_scans() - before
    assert scans == (STEPS if unusual in ("none", "copy-on-write") else 0)
    for i, source in sources.items():  # the copy-on-write params' sources
        assert torch.equal(source, untouched[i])


@pytest.mark.usefixtures("two_threads_or_more")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=dtype_id)
def test_parallel_scan_reads_views_at_an_offset(dtype: torch.dtype, backend: Backend) -> None:
    """Params that are views at an offset into larger buffers, some copy-on-write, and zero-size
    params, over 1,500 tensors scanned on all of torch's threads: each param's data pointer is
    its storage's plus its offset in bytes, wherever in the list it lies."""
    if backend.name != "cpu":
        pytest.skip("the parallel scan is the native eager path's")
    sizes = [0 if i % 97 == 5 else (7 * i) % 61 + 1 for i in range(1500)]
    params = []
    for i, n in enumerate(sizes):
        offset = 3 + i % 5
        base = torch.randn(n + offset + 2).to(dtype)
        if i % 11 == 0:
            base = torch._lazy_clone(base)
        params.append(base[offset : offset + n].requires_grad_())
    assert all(p.storage_offset() > 0 for p in params)
    before = onepass._C.parallel_scans()
    check_against_reference(ADAMW_INFO, {"lr": 1e-2}, backend.name, dtype, params)
    assert onepass._C.parallel_scans() - before == STEPS


@pytest.mark.parametrize(
    ("info", "config"),
    [
        pytest.param(ADAMW_INFO, {"lr": 1e-2, "maximize": True}, id="AdamW-maximize"),
        pytest.param(SGD_INFO, {"lr": 0.1, "momentum": 0.9, "dampening": 0.2}, id="SGD-momentum"),
    ],
)
def test_many_medium_tensors(info: OptimizerInfo, config: Config, backend: Backend) -> None:
    """60 tensors, ~270k elements: enough for the threaded path, whose split between threads
    falls between and inside tensors (chunks of 2^15 elements)."""
    sizes = [int(n) for n in torch.randint(1, 9000, (60,))]
    assert sum(sizes) > 1 << 17
    params = [torch.randn(n).requires_grad_() for n in sizes]
    check_against_reference(info, config, backend.name, torch.float32, params)


@needs_native
def test_capability_from_environment() -> None:
    """ONEPASS_CPU_CAPABILITY picks the build at first use (here: the narrowest, scalar)."""
    code = "import onepass; print(onepass.cpu_capability())"
    env = {**os.environ, "ONEPASS_CPU_CAPABILITY": "scalar"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "scalar"


@needs_native
@pytest.mark.parametrize("setting", ["avx2 ", "sse4", "AVX2"])
def test_capability_from_environment_that_cannot_be_honoured_is_refused(setting: str) -> None:
    """A setting that names no build this CPU runs (a typo, or a wider one than the CPU's) is an
    error at the first CPU step, which changes nothing; it had silently picked the widest."""
    code = (
        "import torch, onepass\n"
        "p = torch.zeros(5, requires_grad=True); p.grad = torch.ones(5)\n"
        "opt = onepass.SGD([p], lr=0.1, backend='cpu')\n"
        "try:\n"
        "    opt.step()\n"
        "except RuntimeError as e:\n"
        "    print('refused', bool((p == 0).all()), e)\n"
    )
    env = {**os.environ, "ONEPASS_CPU_CAPABILITY": setting}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("refused True "), out.stdout + out.stderr
    assert f"ONEPASS_CPU_CAPABILITY='{setting}' names no CPU kernel build" in out.stdout
    assert "it runs: scalar" in out.stdout


BIG = (1 << 20) + 3


@needs_native
@pytest.mark.slow
@pytest.mark.parametrize(
    ("info", "config", "dtype", "capability"),
    [
        pytest.param(
            ADAMW_INFO, {"lr": 1e-2, "amsgrad": True}, torch.float32, cap, id=f"AdamW-fp32-{cap}"
        )
        for cap in CAPABILITIES
    ]
    + [
        pytest.param(ADAMW_INFO, {"lr": 1e-2}, torch.bfloat16, None, id="AdamW-bf16"),
        pytest.param(
            SGD_INFO,
            {"lr": 0.1, "momentum": 0.9, "dampening": 0.1},
            torch.float32,
            None,
            id="SGD-momentum-fp32",
        ),
    ]
    + [
        pytest.param(info, config, torch.float32, None, id=f"{info.name}-fp32")
        for info, config in (
            (ADAM_INFO, {"lr": 1e-2, "weight_decay": 0.1}),
            (SGDW_INFO, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}),
            (LION_INFO, {"lr": 1e-2, "weight_decay": 0.1}),
            (NOVOGRAD_INFO, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
            (FADAM_INFO, {"lr": 1e-2, "weight_decay": 0.1}),
        )
    ],
)
def test_large_tensor(
    info: OptimizerInfo, config: Config, dtype: torch.dtype, capability: str | None
) -> None:
    """2^20+3 elements: many chunks, several threads, a ragged SIMD tail (and for NovoGrad and
    FAdam one tensor's reductions split between the threads)."""
    if capability is not None:
        onepass.set_cpu_capability(capability)
    params = [
        torch.randn(BIG).to(dtype).requires_grad_(),
        torch.randn(5).to(dtype).requires_grad_(),
    ]
    check_against_reference(info, config, "cpu", dtype, params, steps=STEPS, none_pattern=False)


# ------------------------------------------------------------------------------------------------
# Item 7: every CPU capability gives the same results
# ------------------------------------------------------------------------------------------------


def _tensors(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Every param and state tensor, in a fixed order."""
    out = [p.detach() for p in params]
    for p in params:
        out.extend(v for v in optimizer.state.get(p, {}).values())
    return out


def _assert_builds_agree(results: dict[str, list[torch.Tensor]], where: str = "") -> None:
    """Every build's tensors (param and state, _tensors' order) are the first build's, bit for
    bit."""
    first_cap, *others = results
    for cap in others:
        for k, (a, b) in enumerate(zip(results[cap], results[first_cap], strict=True)):
            assert bitwise_equal(a, b), f"{where}tensor {k}, {cap} vs {first_cap}"


@pytest.mark.skipif(len(CAPABILITIES) < 2, reason="this CPU runs one capability")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("info", "config"), optimizer_cases())
def test_capabilities_agree(info: OptimizerInfo, config: Config, dtype: torch.dtype) -> None:
    """scalar vs avx2 vs avx512 (where this CPU has them) give the same bits, step after step.

    The builds share one elementwise math (IEEE operations, no FMA contraction, SIMD pow lane by
    lane with the scalar build's function) and sum the per-tensor reductions (NovoGrad, FAdam) in
    the same 16 lanes whatever the vector width. Sizes around every vector width and the sum's
    lanes, every tensor one chunk (NovoGrad's and FAdam's passes run tensor by tensor; the layout
    test below has a tensor of several chunks). FAdam's norm pass had summed one lane per vector
    lane (one chain in the scalar build): float64 results ~25 ulps apart.
    """
    skip_unless_implemented(info, "cpu")
    capabilities = CAPABILITIES
    params = make_params(dtype, sizes=(0, 1, 7, 15, 16, 17, 33, 4097))
    optimizer = info.onepass_cls(params, **config, backend="cpu")
    runs = {cap: copy.deepcopy((params, optimizer)) for cap in capabilities}
    for s in range(1, STEPS + 1):
        grads = make_grads(params, s)
        results: dict[str, list[torch.Tensor]] = {}
        for cap in capabilities:
            onepass.set_cpu_capability(cap)
            run_params, run_optimizer = runs[cap]
            set_grads(run_params, grads)
            run_optimizer.step()
            results[cap] = _tensors(run_optimizer, run_params)
        _assert_builds_agree(results, f"step {s}: ")


#: Storage layouts beyond one dtype throughout, with the param dtypes that take them.
LAYOUTS: dict[str, tuple[dict[str, Any], tuple[torch.dtype, ...]]] = {
    "master": ({"master_weights": True}, LOW_PRECISION),
    "bf16-state": ({"state_dtype": torch.bfloat16}, (torch.float32,)),
    "master-sr": (
        {"master_weights": True, "state_dtype": torch.bfloat16, "stochastic_rounding": True},
        (torch.bfloat16,),
    ),
    "bf16-sr": ({"stochastic_rounding": True}, (torch.bfloat16,)),
    "flatten": ({"flatten": True}, (torch.float32, torch.float64)),
}


@pytest.mark.skipif(len(CAPABILITIES) < 2, reason="this CPU runs one capability")
@pytest.mark.parametrize(
    ("layout", "dtype"),
    [(name, dtype) for name, (_, dtypes) in LAYOUTS.items() for dtype in dtypes]
    + [("plain", dtype) for dtype in DTYPES],
    ids=lambda v: v if isinstance(v, str) else dtype_id(v),
)
@pytest.mark.parametrize("name", list(EVERY_OPTIMIZER))
def test_capabilities_agree_on_every_layout(name: str, layout: str, dtype: torch.dtype) -> None:
    """The same bits from every build for every class (Muon's passes included) and every storage
    layout: fp32 masters, bf16 state, stochastic rounding, flat buffers; with a tensor of several
    chunks (the reductions' per-chunk partial sums, NovoGrad's and FAdam's passes over the whole
    bucket)."""
    options = LAYOUTS[layout][0] if layout in LAYOUTS else {}
    if name == "Muon":
        sizes: list[tuple[int, ...]] = [(17, 33), (40, 9), (8, 24), (8, 24), (33,), (7,)]
    else:
        sizes = [(0,), (1,), (7,), (17,), (33,), (4097,), (2 * (1 << 15) + 21,)]  # 2^15: a chunk
    results: dict[str, list[torch.Tensor]] = {}
    for cap in CAPABILITIES:
        onepass.set_cpu_capability(cap)
        torch.manual_seed(0)
        params = [torch.randn(s, dtype=torch.float64).to(dtype).requires_grad_() for s in sizes]
        optimizer = EVERY_OPTIMIZER[name](params, backend="cpu", **options)
        generator = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(dtype)
            optimizer.step()
        results[cap] = _tensors(optimizer, params)
    _assert_builds_agree(results)


@needs_native
def test_capability_switch_and_bad_name() -> None:
    original = onepass.cpu_capability()
    assert original in CAPABILITIES
    assert CAPABILITIES[0] == "scalar"
    for capability in CAPABILITIES:
        onepass.set_cpu_capability(capability)
        assert onepass.cpu_capability() == capability
    with pytest.raises(RuntimeError, match="cannot run the 'sse9' kernels"):
        onepass.set_cpu_capability("sse9")
    assert onepass.cpu_capability() == CAPABILITIES[-1]


@needs_native
def test_backends_cover_every_capability() -> None:
    """The backend fixture really runs every capability this CPU has, plus the reference."""
    ids = [b.id for b in all_backends()]
    assert ids == [f"cpu-{c}" for c in onepass.cpu_capabilities()] + ["reference"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize(
    ("info", "config"),
    [
        pytest.param(ADAMW_INFO, {"lr": 1e-2, "amsgrad": True}, id="AdamW-amsgrad"),
        pytest.param(SGD_INFO, {"lr": 0.1, "momentum": 0.9}, id="SGD-momentum"),
    ],
)
def test_non_finite_grads_propagate_like_the_reference(
    info: OptimizerInfo, config: Config, backend: Backend, dtype: torch.dtype
) -> None:
    """No GradScaler: a nan / inf in a grad propagates exactly as in the reference (torch's
    maximum keeps a NaN in max_exp_avg_sq; the SIMD builds' max must too), in the vector body and
    in the tail, and the other elements are unaffected."""
    params = [torch.randn(45).to(dtype).requires_grad_(), torch.randn(7).to(dtype).requires_grad_()]
    optimizer = info.onepass_cls(params, **config, backend=backend.name)
    reference = ReferenceRun(info, config, params, reference_dtype(dtype))
    rtol, atol = TOLERANCES[dtype]
    for s in range(1, STEPS + 1):
        grads: list[torch.Tensor | None] = [torch.randn(45).to(dtype), torch.randn(7).to(dtype)]
        if s == 3:
            for g, position, value in (
                (0, 5, "nan"),
                (0, 44, "inf"),
                (1, 2, "-inf"),
                (1, 6, "nan"),
            ):
                grad = grads[g]
                assert grad is not None
                grad[position] = float(value)
        set_grads(params, grads)
        optimizer.step()
        reference.step(grads, float(config["lr"]))
        if dtype in LOW_PRECISION:
            reference.check(optimizer, params, rtol, atol=LOCKSTEP_ATOL, ulps=1.0)
            reference.sync(optimizer, params)
    reference.check(optimizer, params, rtol, atol)
    assert bool(params[0].detach()[5].isnan()) and not bool(params[0].detach()[4].isnan())
