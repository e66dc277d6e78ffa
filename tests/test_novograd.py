"""onepass.NovoGrad against an independent, straightforward transcription of the rule (Ginsburg
et al., 2019, Alg. 1, with torch-optimizer's grad_averaging and amsgrad), written out here, in
float64 over 7 steps on every backend this machine runs; plus what the rule implies: the first
step is the tensor's own, the scalar slots are 0-d and precise, torch-optimizer checkpoints load,
AMP skips everything.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from test_numerics import check_against_reference

import onepass

from helpers import NOVOGRAD_INFO as INFO
from helpers import (
    all_backends,
    assert_small_tensors_step_alike_beside_a_large_one,
    assert_unchanged,
    config_id,
    make_grads,
    make_params,
    needs_native,
    skip_unless_implemented,
    snapshot,
)

STEPS = 7


def _straight_novograd(
    params: list[torch.Tensor],
    grads_per_step: list[list[torch.Tensor | None]],
    lr: float,
    config: dict[str, Any],
) -> tuple[list[torch.Tensor], list[dict[str, Any] | None]]:
    """NovoGrad step by step, tensor by tensor, with Python floats for the per-tensor scalars."""
    beta1, beta2 = config.get("betas", (0.95, 0.98))
    eps = config.get("eps", 1e-8)
    wd = config.get("weight_decay", 0.0)
    scale = 1 - beta1 if config.get("grad_averaging", False) else 1.0
    amsgrad = config.get("amsgrad", False)
    ps = [p.detach().clone() for p in params]
    states: list[dict[str, Any] | None] = [None] * len(ps)
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = -g if config.get("maximize", False) else g
            norm_sq = float((g * g).sum())
            state = states[i]
            if state is None:  # this tensor's first step, whatever the optimizer's count
                v = norm_sq
                v_max = v
                m = g / (math.sqrt(v) + eps) + wd * ps[i]
                state = states[i] = {"step": 0}
            else:
                v = beta2 * state["v"] + (1 - beta2) * norm_sq
                v_max = max(state["v_max"], v)
                denom = math.sqrt(v_max if amsgrad else v) + eps
                m = beta1 * state["m"] + scale * (g / denom + wd * ps[i])
            state.update(step=state["step"] + 1, v=v, v_max=v_max, m=m)
            ps[i] = ps[i] - lr * m
    return ps, states


CONFIGS: list[dict[str, Any]] = [
    {},
    {"weight_decay": 0.1},
    {"grad_averaging": True},
    {"amsgrad": True},
    {"maximize": True, "weight_decay": 0.05, "amsgrad": True, "grad_averaging": True},
    {"betas": (0.9, 0.5), "eps": 1e-3},
]


@pytest.mark.parametrize("backend", all_backends(), ids=lambda b: b.id)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_matches_the_rule_in_float64(backend: Any, config: dict[str, Any]) -> None:
    skip_unless_implemented(INFO, backend.name)
    if backend.capability is not None:
        onepass.set_cpu_capability(backend.capability)
    torch.manual_seed(0)
    params = make_params(torch.float64)
    grads_per_step = [make_grads(params, step) for step in range(1, STEPS + 1)]
    late = 2  # no grad on steps 1 and 2: its t = 1 is the optimizer's third step
    assert grads_per_step[0][late] is None and grads_per_step[2][late] is not None
    lr = 3e-2
    expected_params, expected_states = _straight_novograd(params, grads_per_step, lr, config)
    optimizer = onepass.NovoGrad(params, lr=lr, backend=backend.name, **config)
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.clone()
        optimizer.step()
    tight = {"rtol": 1e-12, "atol": 1e-14}
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), expected_params[i], **tight)
        expected = expected_states[i]
        if expected is None:
            assert p not in optimizer.state or not optimizer.state[p]
            continue
        state = optimizer.state[p]
        names = {"step", "exp_avg", "exp_avg_sq"} | (
            {"max_exp_avg_sq"} if config.get("amsgrad") else set()
        )
        assert set(state) == names
        assert float(state["step"]) == expected["step"]
        torch.testing.assert_close(state["exp_avg"], expected["m"], **tight)
        for name, key in (("exp_avg_sq", "v"), ("max_exp_avg_sq", "v_max")):
            if name in state:
                assert state[name].shape == () and state[name].dtype == torch.float64
                assert math.isclose(float(state[name]), expected[key], rel_tol=1e-12)
    assert float(optimizer.state[params[late]]["step"]) == expected_states[late]["step"] < STEPS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scalar_slots_are_float32_and_survive_a_state_dict(dtype: torch.dtype) -> None:
    """16/32-bit params keep exp_avg_sq / max_exp_avg_sq as float32 0-d tensors; a state_dict
    round trip (torch.optim's load casts state to the param dtype) keeps them float32, bitwise."""
    params = [
        torch.randn(33).to(dtype).requires_grad_(),
        torch.randn(4, 5).to(dtype).requires_grad_(),
    ]
    optimizer = onepass.NovoGrad(params, lr=1e-2, amsgrad=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())  # as on disk: no tensors shared with it
    twins = [p.detach().clone().requires_grad_() for p in params]
    loaded = onepass.NovoGrad(twins, lr=1e-2, amsgrad=True)
    loaded.load_state_dict(saved)
    for p, q in zip(params, twins, strict=True):
        for name in ("exp_avg_sq", "max_exp_avg_sq"):
            value = loaded.state[q][name]
            assert value.dtype == torch.float32 and value.shape == ()
            assert torch.equal(value, optimizer.state[p][name])
    for p, q in zip(params, twins, strict=True):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
    optimizer.step()
    loaded.step()
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(optimizer.state[p]["exp_avg_sq"], loaded.state[q]["exp_avg_sq"])


def test_loads_a_torch_optimizer_state_dict() -> None:
    """torch-optimizer's NovoGrad saves an int ``step``, ``exp_avg`` and 0-d ``exp_avg_sq``, and
    groups without onepass's keys: it loads and the next step continues from it."""
    torch.manual_seed(1)
    p = torch.randn(10, dtype=torch.float64, requires_grad=True)
    exp_avg = torch.randn(10, dtype=torch.float64)
    saved = {
        "state": {0: {"step": 4, "exp_avg": exp_avg.clone(), "exp_avg_sq": torch.tensor(2.5)}},
        "param_groups": [
            {
                "lr": 1e-2,
                "betas": (0.95, 0.98),
                "eps": 1e-8,
                "weight_decay": 0.0,
                "grad_averaging": False,
                "amsgrad": False,
                "params": [0],
            }
        ],
    }
    optimizer = onepass.NovoGrad([p], lr=1.0)
    optimizer.load_state_dict(saved)
    assert optimizer.state[p]["exp_avg_sq"].dtype == torch.float64
    grad = torch.randn(10, dtype=torch.float64)
    v = 0.98 * 2.5 + 0.02 * float((grad * grad).sum())
    m = 0.95 * exp_avg + grad / (math.sqrt(v) + 1e-8)
    expected = p.detach() - 1e-2 * m
    p.grad = grad
    optimizer.step()
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)
    assert float(optimizer.state[p]["step"]) == 5
    assert math.isclose(float(optimizer.state[p]["exp_avg_sq"]), v, rel_tol=1e-12)


@pytest.mark.parametrize("backend", all_backends(), ids=lambda b: b.id)
def test_amp_scale_and_found_inf(backend: Any) -> None:
    """grad_scale unscales the grads (the norm too); found_inf skips params, state and steps."""
    skip_unless_implemented(INFO, backend.name)
    if backend.capability is not None:
        onepass.set_cpu_capability(backend.capability)
    params = [torch.randn(37, requires_grad=True), torch.randn(3, 4, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    scaled = onepass.NovoGrad(params, lr=1e-2, weight_decay=0.1, backend=backend.name)
    plain = onepass.NovoGrad(twins, lr=1e-2, weight_decay=0.1, backend=backend.name)
    for step in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twins, grads, strict=True):
            p.grad, q.grad = g * 1024.0, g.clone()
        scaled.grad_scale = torch.tensor(1024.0)
        scaled.found_inf = torch.tensor(1.0 if step == 1 else 0.0)
        if step != 1:
            plain.step()
        scaled.step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert float(scaled.state[p]["step"]) == float(plain.state[q]["step"]) == 2.0
        torch.testing.assert_close(
            scaled.state[p]["exp_avg_sq"], plain.state[q]["exp_avg_sq"], rtol=1e-6, atol=0.0
        )
        torch.testing.assert_close(
            scaled.state[p]["exp_avg"], plain.state[q]["exp_avg"], rtol=1e-6, atol=1e-7
        )


def test_flatten_steps_per_tensor() -> None:
    """flatten=True keeps the params in one buffer but the second moment stays per tensor."""
    params = [torch.randn(33, requires_grad=True), torch.randn(5, 7, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    flat = onepass.NovoGrad(params, lr=1e-2, flatten=True)
    plain = onepass.NovoGrad(twins, lr=1e-2, backend="reference")
    for _ in range(3):
        for p, q in zip(params, twins, strict=True):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        flat.step()
        plain.step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert set(flat.state[p]) == set(plain.state[q]) == {"step", "exp_avg", "exp_avg_sq"}
        assert float(flat.state[p]["step"]) == float(plain.state[q]["step"]) == 3.0
        torch.testing.assert_close(flat.state[p]["exp_avg_sq"], plain.state[q]["exp_avg_sq"])
        torch.testing.assert_close(flat.state[p]["exp_avg"], plain.state[q]["exp_avg"])


def test_rejects_bad_hyperparameters() -> None:
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="learning rate"):
        onepass.NovoGrad([p], lr=-1.0)
    with pytest.raises(ValueError, match="epsilon"):
        onepass.NovoGrad([p], eps=-1.0)
    with pytest.raises(ValueError, match="beta parameter at index 0"):
        onepass.NovoGrad([p], betas=(1.0, 0.98))
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        onepass.NovoGrad([p], betas=(0.9, -0.1))
    with pytest.raises(ValueError, match="weight_decay"):
        onepass.NovoGrad([p], weight_decay=-0.1)


def test_rejects_a_state_dict_with_a_non_scalar_second_moment(backend_name: str) -> None:
    """Refused before anything loads: the params, the state (of a param that has stepped) and
    the groups (the checkpoint's lr too) stay as they were, and the next step is the one the
    optimizer would have taken without the refused load."""
    torch.manual_seed(3)
    p = torch.randn(3, requires_grad=True)
    twin = p.detach().clone().requires_grad_()
    optimizer = onepass.NovoGrad([p], lr=1e-2, backend=backend_name)
    untouched = onepass.NovoGrad([twin], lr=1e-2, backend=backend_name)
    p.grad = torch.randn(3)
    twin.grad = p.grad.clone()
    optimizer.step()
    untouched.step()
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"] = {0: {"step": 5, "exp_avg": torch.ones(3), "exp_avg_sq": torch.ones(3)}}
    saved["param_groups"][0]["lr"] = 0.5
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match="one value per tensor"):
        optimizer.load_state_dict(saved)
    assert_unchanged(optimizer, before)
    p.grad = torch.randn(3)
    twin.grad = p.grad.clone()
    optimizer.step()
    untouched.step()
    assert torch.equal(p, twin)
    for name, value in untouched.state[twin].items():
        assert torch.equal(optimizer.state[p][name], value), name


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_chunk_tensors_match_and_do_not_depend_on_threads(dtype: torch.dtype) -> None:
    """Tensors of several 2^15-element chunks (the reduce pass's partial sums are combined per
    tensor): against the reference, and bitwise the same on 1 thread and on every thread."""
    sizes = (3 * (1 << 15) + 5, 70_000, 7)
    params = [torch.randn(n).to(dtype).requires_grad_() for n in sizes]
    check_against_reference(INFO, {"lr": 1e-2, "amsgrad": True}, "cpu", dtype, params)
    results = []
    threads = torch.get_num_threads()
    for count in (1, max(2, threads)):
        torch.set_num_threads(count)
        try:
            torch.manual_seed(5)
            ps = [torch.randn(n).to(dtype).requires_grad_() for n in sizes]
            optimizer = onepass.NovoGrad(ps, lr=1e-2, backend="cpu")
            for _ in range(3):
                for p in ps:
                    p.grad = torch.randn_like(p)
                optimizer.step()
            results.append([*ps, *(optimizer.state[p]["exp_avg_sq"] for p in ps)])
        finally:
            torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("backend", all_backends(), ids=lambda b: b.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_resume_matches_an_uninterrupted_run(backend: Any, dtype: torch.dtype) -> None:
    """Save after 3 steps (a param whose first step is still to come), load into a fresh
    optimizer over copies of the params, 4 more steps: bitwise the 7 uninterrupted steps, params
    and every state tensor (the scalar slots stay float32 through the load)."""
    skip_unless_implemented(INFO, backend.name)
    if backend.capability is not None:
        onepass.set_cpu_capability(backend.capability)
    params = make_params(dtype)
    grads_per_step = [make_grads(params, step) for step in range(1, STEPS + 1)]
    config = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True, "backend": backend.name}

    def run(ps: list[torch.Tensor], opt: onepass.NovoGrad, steps: range) -> None:
        for step in steps:
            for p, g in zip(ps, grads_per_step[step], strict=True):
                p.grad = None if g is None else g.clone()
            opt.step()

    whole = onepass.NovoGrad(params, **config)
    resumed_params = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    first = onepass.NovoGrad(resumed_params, **config)
    run(params, whole, range(STEPS))
    run(resumed_params, first, range(2))
    saved = copy.deepcopy(first.state_dict())
    second = onepass.NovoGrad(resumed_params, lr=1.0, backend=backend.name)
    second.load_state_dict(saved)
    run(resumed_params, second, range(2, STEPS))
    for p, q in zip(params, resumed_params, strict=True):
        assert torch.equal(p, q)
        if p in whole.state:
            assert set(whole.state[p]) == set(second.state[q])
            for name, value in whole.state[p].items():
                assert value.dtype == second.state[q][name].dtype
                assert torch.equal(value, second.state[q][name]), name


@needs_native
@pytest.mark.parametrize("amsgrad", [False, True])
def test_cpu_one_chunk_tensors_fuse_both_passes_bit_for_bit(amsgrad: bool) -> None:
    """When every tensor is one chunk the CPU op runs NovoGrad's reduction and update chunk by
    chunk (the grad still in cache); with one large tensor beside them it runs the two passes
    over the bucket. The small tensors come out the same to the bit either way."""
    assert_small_tensors_step_alike_beside_a_large_one(
        lambda ps: onepass.NovoGrad(ps, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, backend="cpu")
    )
