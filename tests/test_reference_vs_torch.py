"""The oracle and the optimizers against torch.optim in float64 (issue item 2).

torch.optim's for-loop implementations (the CPU default) are the specification: the reference
functions, and onepass's optimizers on both backends, must give the same params and state after 7
steps, with some grads None on some steps, a frozen param and an lr schedule, to ~1e-12 relative.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

import onepass

from helpers import (
    TIGHT,
    Config,
    OptimizerInfo,
    ReferenceRun,
    assert_all_close,
    make_grads,
    make_params,
    optimizer_cases,
    set_grads,
)

STEPS = 7


def _schedule(step: int) -> float:
    return 1.0 / (1.0 + 0.25 * step)


def _torch_run(
    info: OptimizerInfo, config: Config, params: Sequence[torch.Tensor]
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    assert info.torch_cls is not None
    optimizer = info.torch_cls(params, **config)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule)


def assert_same_as_torch(
    optimizer: torch.optim.Optimizer,
    expected: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    expected_params: Sequence[torch.Tensor],
    rtol: float = TIGHT[0],
    atol: float = TIGHT[1],
) -> None:
    """Params and every state tensor ('step' exactly) of two optimizers over matching params."""
    triples = []
    for i, (p, q) in enumerate(zip(params, expected_params, strict=True)):
        triples.append((f"param {i}", p, q))
        ours, theirs = optimizer.state.get(p, {}), expected.state.get(q, {})
        assert set(ours) == set(theirs), f"param {i}: state keys {sorted(ours)} != {sorted(theirs)}"
        for key, value in theirs.items():
            if key == "step":
                assert float(ours[key]) == float(value), f"param {i}: step"
            else:
                triples.append((f"state[{i}][{key!r}]", ours[key], value))
    assert_all_close(triples, rtol, atol)


@pytest.mark.parametrize(("info", "config"), optimizer_cases(torch_only=True))
def test_reference_matches_torch(info: OptimizerInfo, config: Config) -> None:
    """adam_reference / sgd_reference, called per tensor, == torch.optim in float64."""
    params = make_params(torch.float64)
    optimizer, schedule = _torch_run(info, config, params)
    reference = ReferenceRun(info, config, params, torch.float64)
    for s in range(1, STEPS + 1):
        grads = make_grads(params, s)
        set_grads(params, grads)
        lr = float(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step(grads, lr)
        schedule.step()
    reference.check(optimizer, params, *TIGHT)


@pytest.mark.parametrize(("info", "config"), optimizer_cases(torch_only=True))
def test_optimizer_matches_torch(info: OptimizerInfo, config: Config, backend_name: str) -> None:
    """onepass.<Optimizer>(backend=...) == torch.optim.<Optimizer> in float64, 7 steps."""
    params = make_params(torch.float64)
    theirs = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    optimizer = info.onepass_cls(params, **config, backend=backend_name)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule)
    expected, expected_schedule = _torch_run(info, config, theirs)
    for s in range(1, STEPS + 1):
        grads = make_grads(params, s)
        set_grads(params, grads)
        set_grads(theirs, grads)
        optimizer.step()
        expected.step()
        schedule.step()
        expected_schedule.step()
    assert_same_as_torch(optimizer, expected, params, theirs)
    assert optimizer.param_groups[0]["lr"] == expected.param_groups[0]["lr"]


@pytest.mark.parametrize(
    "config",
    [
        {"momentum": 0.0},
        {"momentum": 0.9},
        {"momentum": 0.9, "dampening": 0.3},
        {"momentum": 0.9, "nesterov": True},
        {"momentum": 0.8, "maximize": True},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_sgdw_is_loshchilov_and_hutters_rule(config: dict[str, Any], backend: str) -> None:
    """SGDW has no torch.optim class to compare with: its rule written out here, in float64,
    independently of onepass's reference (which the backends are tested against). torch.optim
    SGD's direction d (momentum buffer, dampening, nesterov, maximize; no decay in the grad),
    then p = p - lr * d - lr * wd * p_old, with lr changing between steps."""
    lr0, wd = 0.1, 0.05
    momentum = config["momentum"]
    dampening = config.get("dampening", 0.0)
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(4097, generator=gen, dtype=torch.float64).requires_grad_()
    expected = param.detach().clone()
    optimizer = onepass.SGDW([param], lr=lr0, weight_decay=wd, backend=backend, **config)
    buf = None
    for step in range(1, 8):
        lr = lr0 / step
        optimizer.param_groups[0]["lr"] = lr
        g = torch.randn(4097, generator=gen, dtype=torch.float64)
        param.grad = g.clone()
        optimizer.step()
        d = -g if config.get("maximize") else g
        if momentum:
            buf = d.clone() if buf is None else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if config.get("nesterov") else buf
        expected = expected - lr * d - lr * wd * expected
    torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-14)
    if momentum:
        torch.testing.assert_close(optimizer.state[param]["momentum_buffer"], buf)
