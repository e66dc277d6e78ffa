"""onepass.Lion against an independent, straightforward transcription of the paper's rule
(lion-pytorch's ``update_fn``, written out here rather than imported), in float64 over 7 steps on
every backend this machine runs; plus the details that rule implies: sign(0) = 0, no ``step`` in
the state, lion-pytorch checkpoints.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import onepass

from helpers import all_backends, config_id, make_grads, make_params

STEPS = 7


def _paper_lion(
    params: list[torch.Tensor],
    grads_per_step: list[list[torch.Tensor | None]],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    decay: str,
    maximize: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Lion step by step, tensor by tensor, with plain torch ops (Chen et al., 2023, Alg. 2)."""
    beta1, beta2 = betas
    ps = [p.detach().clone() for p in params]
    ms: list[torch.Tensor | None] = [None] * len(ps)
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = -g if maximize else g.clone()
            if ms[i] is None:
                ms[i] = torch.zeros_like(ps[i])
            m = ms[i]
            assert m is not None
            if decay == "l2":
                g = g + weight_decay * ps[i]
            elif decay == "decoupled":
                ps[i].mul_(1 - lr * weight_decay)
            else:  # independent: the lr here never changes, so lr / initial_lr == 1
                ps[i].mul_(1 - weight_decay)
            update = m.clone().mul_(beta1).add(g, alpha=1 - beta1).sign_()
            ps[i].add_(update, alpha=-lr)
            m.mul_(beta2).add_(g, alpha=1 - beta2)
    return ps, ms


CONFIGS: list[dict[str, Any]] = [
    {},
    {"weight_decay": 0.1},
    {"maximize": True},
    {"betas": (0.95, 0.98)},
    {"weight_decay": 0.3, "decay": "independent"},
    {"weight_decay": 0.1, "decay": "l2", "maximize": True},
]


@pytest.mark.parametrize("backend", all_backends(), ids=lambda b: b.id)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_matches_the_paper_in_float64(backend: Any, config: dict[str, Any]) -> None:
    if backend.capability is not None:
        onepass.set_cpu_capability(backend.capability)
    torch.manual_seed(0)
    params = make_params(torch.float64)
    grads_per_step = [make_grads(params, step) for step in range(1, STEPS + 1)]
    lr = 3e-2
    expected_params, expected_m = _paper_lion(
        params,
        grads_per_step,
        lr,
        config.get("betas", (0.9, 0.99)),
        config.get("weight_decay", 0.0),
        config.get("decay", "decoupled"),
        config.get("maximize", False),
    )
    optimizer = onepass.Lion(params, lr=lr, backend=backend.name, **config)
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.clone()
        optimizer.step()
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), expected_params[i], rtol=1e-12, atol=1e-14)
        m = expected_m[i]
        if m is None:
            assert p not in optimizer.state or not optimizer.state[p]
            continue
        assert set(optimizer.state[p]) == {"exp_avg"}  # lion-pytorch's state: no "step"
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], m, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", all_backends(), ids=lambda b: b.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sign_of_zero_is_zero(backend: Any, dtype: torch.dtype) -> None:
    """A zero direction (zero gradient on a zero momentum) leaves the element alone; every other
    element moves by exactly lr. Sizes cover the SIMD main loops and their scalar tails."""
    if backend.capability is not None:
        onepass.set_cpu_capability(backend.capability)
    p = torch.full((37,), 2.0, dtype=dtype, requires_grad=True)
    optimizer = onepass.Lion([p], lr=0.25, backend=backend.name)
    grad = torch.randn(37).to(dtype)
    grad[::3] = 0.0
    grad[1::6] = -0.0
    p.grad = grad
    optimizer.step()
    expected = 2.0 - 0.25 * torch.sign(grad.double())
    assert torch.equal(p.detach().double(), expected)


def test_loads_a_lion_pytorch_state_dict() -> None:
    """lion-pytorch saves only ``exp_avg`` and groups without onepass's keys: it loads, decay
    defaults to decoupled, and the next step continues from the loaded momentum."""
    torch.manual_seed(1)
    p = torch.randn(10, dtype=torch.float64, requires_grad=True)
    exp_avg = torch.randn(10, dtype=torch.float64)
    saved = {
        "state": {0: {"exp_avg": exp_avg.clone()}},
        "param_groups": [
            {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1, "params": [0]},
        ],
    }
    optimizer = onepass.Lion([p], lr=1.0)
    optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["decay"] == "decoupled"
    grad = torch.randn(10, dtype=torch.float64)
    ref_p = p.detach().clone().mul_(1 - 1e-2 * 0.1)
    ref_p -= 1e-2 * (0.9 * exp_avg + 0.1 * grad).sign()
    p.grad = grad
    optimizer.step()
    torch.testing.assert_close(p.detach(), ref_p, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        optimizer.state[p]["exp_avg"], 0.99 * exp_avg + 0.01 * grad, rtol=1e-12, atol=1e-14
    )
    assert set(optimizer.state_dict()["state"][0]) == {"exp_avg"}


def test_rejects_bad_hyperparameters() -> None:
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="learning rate"):
        onepass.Lion([p], lr=-1.0)
    with pytest.raises(ValueError, match="beta parameter at index 0"):
        onepass.Lion([p], betas=(1.5, 0.99))
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        onepass.Lion([p], betas=(0.9, -0.1))
    with pytest.raises(ValueError, match="weight_decay"):
        onepass.Lion([p], weight_decay=-0.1)
    with pytest.raises(ValueError, match="decay mode"):
        onepass.Lion([p], decay="bogus")


@pytest.mark.parametrize("backend", all_backends(), ids=lambda b: b.id)
def test_state_dict_resume_matches_an_uninterrupted_run(backend: Any) -> None:
    """Save after 3 steps, load into a fresh optimizer over copies of the params, 4 more steps:
    the same params and exp_avg as 7 steps without a break (bitwise: the same kernels)."""
    if backend.capability is not None:
        onepass.set_cpu_capability(backend.capability)
    params = make_params(torch.float32)
    grads_per_step = [make_grads(params, step) for step in range(1, STEPS + 1)]
    config = {"lr": 1e-2, "weight_decay": 0.2, "decay": "independent", "backend": backend.name}

    def run(ps: list[torch.Tensor], opt: onepass.Lion, steps: range) -> None:
        for step in steps:
            for p, g in zip(ps, grads_per_step[step], strict=True):
                p.grad = None if g is None else g.clone()
            opt.step()

    whole = onepass.Lion(params, **config)
    resumed_params = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    first = onepass.Lion(resumed_params, **config)
    run(params, whole, range(STEPS))
    run(resumed_params, first, range(3))
    saved = first.state_dict()
    second = onepass.Lion(resumed_params, lr=1.0, backend=backend.name)
    second.load_state_dict(saved)
    run(resumed_params, second, range(3, STEPS))
    for p, q in zip(params, resumed_params, strict=True):
        assert torch.equal(p, q)
        if p in whole.state:
            assert torch.equal(whole.state[p]["exp_avg"], second.state[q]["exp_avg"])
