"""Low-precision storage: fp32 master weights of bf16/fp16 params (``master_weights=True``),
moment buffers in another dtype than the params (``state_dtype``), fp32 grads of 16-bit params,
and stochastic rounding of bf16 state. Every layout on every backend, against the reference.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

import onepass

from helpers import (
    BACKEND_NAMES,
    BACKEND_NAMES_AND_TRITON,
    CAPABILITIES,
    EVERY_OPTIMIZER,
    TOLERANCES,
    TRITON_INTERPRETED,
    assert_verbose_allclose,
    assert_within_ulps,
    grad_is_none,
    make_params,
)

#: The native backends, the CPU once per SIMD build this CPU runs ("cpu-avx2", ...).
NATIVE = [f"cpu-{cap}" for cap in CAPABILITIES] + (["triton"] if TRITON_INTERPRETED else [])
STEPS = 7

#: (param dtype, grad dtype, options): the layouts beyond torch.optim's one-dtype buckets.
LAYOUTS: dict[str, tuple[torch.dtype, torch.dtype, dict]] = {
    "bf16-master": (torch.bfloat16, torch.bfloat16, {"master_weights": True}),
    "bf16-fp32grad-master": (torch.bfloat16, torch.float32, {"master_weights": True}),
    "bf16-master-bf16state-sr": (
        torch.bfloat16,
        torch.bfloat16,
        {"master_weights": True, "state_dtype": torch.bfloat16, "stochastic_rounding": True},
    ),
    "fp16-fp32grad-master": (torch.float16, torch.float32, {"master_weights": True}),
    "bf16-fp32state": (torch.bfloat16, torch.bfloat16, {"state_dtype": torch.float32}),
    "bf16-fp32grad": (torch.bfloat16, torch.float32, {}),
    "fp16-fp32state": (torch.float16, torch.float16, {"state_dtype": torch.float32}),
    "fp32-bf16state": (torch.float32, torch.float32, {"state_dtype": torch.bfloat16}),
    "fp32-bf16state-sr": (
        torch.float32,
        torch.float32,
        {"state_dtype": torch.bfloat16, "stochastic_rounding": True},
    ),
}


def _grads(params: list[torch.Tensor], step: int, dtype: torch.dtype, widen: bool = False) -> list:
    """Step ``step``'s grads, rounded to ``dtype`` (and then stored in the params' dtype when
    ``widen``: the float64 oracle gets the very values the low-precision run sees)."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [
        None
        if not p.requires_grad or grad_is_none(i, step)
        else torch.randn(p.shape, generator=gen).to(dtype).to(p.device, p.dtype if widen else dtype)
        for i, p in enumerate(params)
    ]


def _set_grads(params: list[torch.Tensor], grads: list) -> None:
    for p, g in zip(params, grads, strict=True):
        if g is not None and g.dtype != p.dtype:
            p.grad_dtype = g.dtype  # torch >= 2.10 checks a grad's dtype against this
        p.grad = None if g is None else g.clone()


def _run(
    make: Callable[..., torch.optim.Optimizer],
    params: list[torch.Tensor],
    grad_dtype: torch.dtype,
    steps: int = STEPS,
    widen: bool = False,
    **options: object,
) -> torch.optim.Optimizer:
    opt = make(params, **options)
    for step in range(steps):
        _set_grads(params, _grads(params, step, grad_dtype, widen))
        opt.step()
    return opt


def _state_tensors(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and k != "step"}


@pytest.mark.parametrize("backend", BACKEND_NAMES_AND_TRITON)
@pytest.mark.parametrize("name", list(EVERY_OPTIMIZER))
def test_master_weights_follow_the_float64_reference(backend: str, name: str) -> None:
    """bf16 params with fp32 masters, 7 steps (None grads, odd sizes, non-contiguous and frozen
    params): the masters and the fp32 state match the float64 reference run from the same
    values to fp32 tolerance, and each bf16 param is its master rounded to nearest."""
    torch.manual_seed(0)
    params = make_params(torch.bfloat16, sizes=(0, 1, 7, 4097))
    wide = [p.detach().double().requires_grad_(p.requires_grad) for p in params]
    make = EVERY_OPTIMIZER[name]
    opt = _run(make, params, torch.bfloat16, backend=backend, master_weights=True)
    oracle = _run(make, wide, torch.bfloat16, widen=True, backend="reference")
    rtol, atol = TOLERANCES[torch.float32]
    for i, (p, w) in enumerate(zip(params, wide, strict=True)):
        state, expected = _state_tensors(opt, p), _state_tensors(oracle, w)
        if not expected:  # never stepped (frozen)
            assert not state
            continue
        master = state.pop("master_param")
        assert master.dtype == torch.float32
        assert_verbose_allclose(master.double(), w.detach(), rtol, atol, f"master of param {i}")
        assert torch.equal(p.detach(), master.to(torch.bfloat16)), f"param {i} != its master"
        for key, value in state.items():
            assert value.dtype == torch.float32, f"{key} of param {i} is {value.dtype}"
            assert_verbose_allclose(value.double(), expected[key], rtol, atol, f"{key} of {i}")


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(EVERY_OPTIMIZER))
def test_every_layout_matches_the_reference_backend(backend: str, layout: str, name: str) -> None:
    """The native kernels against the reference backend with the same storage: the same fp32
    math on the same stored values, so params and every state tensor (masters included) agree
    to within one storage ulp (stochastic rounding: the same draws)."""
    backend, _, capability = backend.partition("-")
    if capability:
        onepass.set_cpu_capability(capability)  # restored by conftest's autouse fixture
    check_layout(name, layout, backend, torch.device("cpu"))


def check_layout(name: str, layout: str, backend: str, device: torch.device) -> None:
    """7 steps of ``name`` with ``layout`` on ``backend`` (params on ``device``) against the
    reference backend on the CPU from the same values and grads (test_gpu.py runs it on CUDA)."""
    param_dtype, grad_dtype, options = LAYOUTS[layout]
    torch.manual_seed(0)
    init = make_params(param_dtype, sizes=(0, 1, 7, 4097))
    runs = []
    for be, on in (("reference", torch.device("cpu")), (backend, device)):
        params = [p.detach().to(on).clone().requires_grad_(p.requires_grad) for p in init]
        torch.manual_seed(5)  # the stochastic-rounding seed comes from torch's generator
        opt = _run(EVERY_OPTIMIZER[name], params, grad_dtype, backend=be, **options)
        runs.append((params, opt))
    (ref_params, ref), (params, opt) = runs
    state_dtype = options.get("state_dtype") or (
        torch.float32 if options.get("master_weights") else param_dtype
    )
    # Muon: the batched Newton-Schulz (lr ratio folded into its last iteration) rounds
    # differently from the per-matrix one; where the update is rounded to 16 bits before it,
    # a flipped update ulp moves a param by about an ulp per step.
    ulps = 4.0 if name == "Muon" else 1.0
    for i, (p, r) in enumerate(zip(params, ref_params, strict=True)):
        _assert_close(p.detach().cpu(), r.detach(), f"param {i}", ulps)
        state, expected = _state_tensors(opt, p), _state_tensors(ref, r)
        assert state.keys() == expected.keys(), f"param {i}: {state.keys()} != {expected.keys()}"
        for key, value in state.items():
            want = torch.float32 if key == "master_param" else state_dtype
            if value.dim() > 0:  # NovoGrad's per-tensor scalars are fp32 whatever the layout
                assert value.dtype == want, f"{key} of param {i}: {value.dtype} != {want}"
            _assert_close(value.cpu(), expected[key], f"{key} of param {i}")


def _assert_close(
    actual: torch.Tensor, expected: torch.Tensor, name: str, ulps: float = 1.0
) -> None:
    """fp32: the fp32 budget (operation order); 16-bit: within ``ulps`` storage ulps, rarely
    off at all."""
    if actual.dtype == torch.float32:
        assert_verbose_allclose(actual, expected, *TOLERANCES[torch.float32], name)
    else:
        assert_within_ulps(actual, expected, ulps, name=name)


@pytest.mark.parametrize("backend", BACKEND_NAMES_AND_TRITON)
def test_stochastic_rounding_of_bf16_state_is_unbiased(backend: str) -> None:
    """Adam's first moment of a constant gradient, kept in bf16 with beta1 = 0.999: to nearest it
    stalls near 0.25, where (1 - beta1) * (g - m) falls below half a bf16 ulp; stochastically
    it follows 1 - beta1^t on average."""
    steps = 600
    finals = {}
    for stochastic in (False, True):
        torch.manual_seed(0)
        p = torch.zeros(4096, requires_grad=True)
        opt = onepass.Adam(
            [p],
            lr=0.0,
            betas=(0.999, 0.999),
            state_dtype=torch.bfloat16,
            stochastic_rounding=stochastic,
            backend=backend,
        )
        p.grad = torch.ones_like(p)
        for _ in range(steps):
            opt.step()
        finals[stochastic] = float(opt.state[p]["exp_avg"].float().mean())
    expected = 1 - 0.999**steps  # 0.451
    assert abs(finals[False] - expected) > 0.1, finals  # to nearest: stuck
    assert abs(finals[True] - expected) < 0.01, finals


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("layout", ["bf16-master", "bf16-master-bf16state-sr", "fp32-bf16state"])
def test_state_dict_round_trip_continues_exactly(backend: str, layout: str) -> None:
    """Save after 3 steps, load into a fresh optimizer, 4 more steps: bit for bit the run that
    never stopped (the fp32 masters and fp32 state are restored at full precision)."""
    param_dtype, grad_dtype, options = LAYOUTS[layout]
    torch.manual_seed(0)
    init = [torch.randn(n).to(param_dtype) for n in (7, 4097)]

    def params() -> list[torch.Tensor]:
        return [p.clone().requires_grad_() for p in init]

    straight = params()
    torch.manual_seed(5)
    _run(EVERY_OPTIMIZER["AdamW"], straight, grad_dtype, backend=backend, **options)

    first = params()
    torch.manual_seed(5)
    opt = _run(EVERY_OPTIMIZER["AdamW"], first, grad_dtype, steps=3, backend=backend, **options)
    saved = copy.deepcopy(opt.state_dict())
    if options.get("master_weights"):
        assert all(s["master_param"].dtype == torch.float32 for s in saved["state"].values())
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt = EVERY_OPTIMIZER["AdamW"](resumed, backend=backend, **options)
    opt.load_state_dict(saved)
    for step in range(3, STEPS):
        _set_grads(resumed, _grads(resumed, step, grad_dtype))
        opt.step()
    for a, b in zip(resumed, straight, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_checkpoints_load_across_master_weights(backend: str) -> None:
    """A checkpoint without masters loads into an optimizer with them (masters start from the
    params, the moments are the checkpoint's) and one with masters into one without."""
    torch.manual_seed(0)
    params = [torch.randn(n).to(torch.bfloat16).requires_grad_() for n in (7, 4097)]
    plain = _run(EVERY_OPTIMIZER["AdamW"], params, torch.bfloat16, steps=3, backend=backend)
    saved = copy.deepcopy(plain.state_dict())
    with_master = onepass.AdamW(params, lr=0.0, weight_decay=0.0, master_weights=True)
    with_master.load_state_dict(saved)
    for g in with_master.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0  # a step that leaves the params where they are
    for p in params:
        p.grad = torch.randn(p.shape).to(torch.bfloat16)
    with_master.step()
    for i, p in enumerate(params):
        state = with_master.state[p]
        assert torch.equal(state["master_param"], p.detach().float()), f"master {i}"
        assert state["exp_avg"].dtype == torch.float32
        assert int(state["step"]) == int(saved["state"][i]["step"]) + 1
    saved = copy.deepcopy(with_master.state_dict())
    back = onepass.AdamW(params, backend=backend)
    back.load_state_dict(saved)
    _set_grads(params, _grads(params, 4, torch.bfloat16))
    back.step()
    assert all("master_param" not in back.state[p] for p in params)
    assert all(back.state[p]["exp_avg"].dtype == torch.bfloat16 for p in params)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_flattened_master_run_equals_the_unflattened_one(backend: str) -> None:
    runs = []
    for flatten in (False, True):
        torch.manual_seed(0)
        params = [torch.randn(n).to(torch.bfloat16).requires_grad_() for n in (7, 33, 4097)]
        opt = onepass.AdamW(params, backend=backend, master_weights=True, flatten=flatten)
        for _ in range(STEPS):
            for p in params:
                g = torch.randn(p.shape).to(torch.bfloat16)
                if flatten and p.grad is not None:
                    p.grad.copy_(g)  # flat grads are views: written in place
                else:
                    p.grad = g
            opt.step()
        runs.append((params, opt))
    (a, oa), (b, ob) = runs
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(oa.state[p]["master_param"], ob.state[q]["master_param"])


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_grad_scaler_skip_leaves_masters_untouched(backend: str) -> None:
    torch.manual_seed(0)
    params = [torch.randn(n).to(torch.bfloat16).requires_grad_() for n in (7, 4097)]
    opt = _run(EVERY_OPTIMIZER["AdamW"], params, torch.bfloat16, steps=2, backend=backend,
               master_weights=True)  # fmt: skip
    before = {k: v.clone() for k, v in opt.state[params[1]].items()}
    opt.found_inf = torch.ones(())
    opt.grad_scale = torch.ones(())
    _set_grads(params, _grads(params, 2, torch.bfloat16))
    opt.step()
    for key, value in before.items():
        assert torch.equal(opt.state[params[1]][key], value), key


def test_bad_layouts_are_refused_naming_the_param() -> None:
    with pytest.raises(ValueError, match="state_dtype"):
        onepass.AdamW([torch.zeros(3, requires_grad=True)], state_dtype=torch.float16)
    wide = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = onepass.AdamW([wide], state_dtype=torch.bfloat16)
    wide.grad = torch.ones_like(wide)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[0\].*bfloat16 state"):
        opt.step()
    assert torch.equal(wide, torch.zeros(3, dtype=torch.float64))
    p = torch.zeros(3, requires_grad=True)
    q = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    opt = onepass.AdamW([p, q])
    p.grad = torch.ones(3)
    q.grad_dtype = torch.float16
    q.grad = torch.ones(3, dtype=torch.float16)  # fp16 grads for bf16 params: not a layout
    with pytest.raises(RuntimeError, match=r"\['params'\]\[1\].*grad has torch.float16"):
        opt.step()
    assert torch.equal(p, torch.zeros(3)) and not opt.state


def test_mixed_grad_dtypes_in_one_bucket_are_refused() -> None:
    a = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    b = torch.zeros(5, dtype=torch.bfloat16, requires_grad=True)
    opt = onepass.AdamW([a, b], master_weights=True)
    a.grad = torch.ones(3, dtype=torch.bfloat16)
    b.grad_dtype = torch.float32
    b.grad = torch.ones(5)
    with pytest.raises(RuntimeError, match="grad"):
        opt.step()
    assert torch.equal(a, torch.zeros(3, dtype=torch.bfloat16))


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_flatten_keeps_fp32_grads_of_bf16_params(backend: str) -> None:
    """flatten=True with fp32 grads (grad_dtype) gives the flat grads their dtype: the same run
    as without flatten."""
    runs = []
    for flatten in (False, True):
        torch.manual_seed(0)
        params = [torch.randn(n).to(torch.bfloat16).requires_grad_() for n in (7, 4097)]
        for p in params:
            p.grad_dtype = torch.float32
        opt = onepass.AdamW(params, backend=backend, master_weights=True, flatten=flatten)
        for _ in range(3):
            for p in params:
                g = torch.randn(p.shape)
                if flatten and p.grad is not None:
                    p.grad.copy_(g)
                else:
                    p.grad = g
            opt.step()
        assert all(p.grad.dtype == torch.float32 for p in params)
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_narrower_grads_than_params_are_refused(backend: str) -> None:
    """bf16 grads of fp32 params are not a layout (only Muon's internal workspace takes it), on
    the native single-bucket path as on the others."""
    p = torch.zeros(5, requires_grad=True)
    opt = onepass.AdamW([p], backend=backend)
    p.grad_dtype = torch.bfloat16
    p.grad = torch.ones(5, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="grad"):
        opt.step()
    assert torch.equal(p, torch.zeros(5)) and not opt.state


def test_changing_the_storage_options_rebuilds_the_buckets() -> None:
    torch.manual_seed(0)
    p = torch.randn(33).to(torch.bfloat16).requires_grad_()
    opt = onepass.AdamW([p])
    p.grad = torch.randn(33).to(torch.bfloat16)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16 and "master_param" not in opt.state[p]
    opt.param_groups[0]["master_weights"] = True
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt.state[p]["master_param"].to(torch.bfloat16), p.detach())
    opt.param_groups[0]["state_dtype"] = "not a dtype"
    with pytest.raises(RuntimeError, match="state"):
        opt.step()


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_params_cast_after_the_first_step_rebuild_the_buckets(backend: str) -> None:
    """model.to(torch.bfloat16) mid-run: the next step sees bf16 params (masters from them, the
    fp32 moments carried over), as a fresh bucket would."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = onepass.AdamW(model.parameters(), backend=backend, master_weights=True)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in opt.state[model.weight].items()}
    model.to(torch.bfloat16)
    opt.zero_grad()
    model(torch.randn(3, 8).to(torch.bfloat16)).sum().backward()
    opt.step()
    state = opt.state[model.weight]
    assert state["master_param"].dtype == torch.float32
    assert torch.equal(state["master_param"].to(torch.bfloat16), model.weight.detach())
    assert state["exp_avg"].dtype == torch.float32 and int(state["step"]) == 2
    assert not torch.equal(state["exp_avg"], before["exp_avg"])
