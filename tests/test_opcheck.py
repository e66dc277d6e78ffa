"""torch.library.opcheck on the native ops (issue item 6): schema (declared mutations only),
autograd registration, fake tensor kernel, and AOT dispatch with dynamic shapes.

The arguments are laid out as the engine lays out a bucket (python/onepass/algorithms/*.py
``_cpu_launch``): a list of params (one zero-size, one non-contiguous), their grads with a None,
flat state buffers with 16-element-aligned offsets, per-tensor float32 step counts, and the
GradScaler tensors present or absent.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import onepass

pytestmark = pytest.mark.skipif(not onepass.native_available(), reason="onepass._C not built")

TESTS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)


def _bucket(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor | None], Any]:
    params = [
        torch.randn(7).to(dtype),
        torch.randn(5, 3).to(dtype).t(),  # non-contiguous
        torch.randn(0).to(dtype),
        torch.randn(20).to(dtype),
    ]
    grads: list[torch.Tensor | None] = [
        torch.randn(7).to(dtype),
        torch.randn(3, 5).to(dtype),
        torch.randn(0).to(dtype),
        None,
    ]
    # Each param's offset into the state buffers, then the element count they hold for it.
    offsets = torch.tensor([[0, 16, 32, 32], [7, 15, 0, 20]], dtype=torch.int64)
    return params, grads, offsets


def _amp(scaled: bool, found_inf: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not scaled:
        return None, None
    return torch.tensor(1024.0), torch.tensor(found_inf)


def _check(op: Any, args: tuple[Any, ...]) -> None:
    results = torch.library.opcheck(op, args, test_utils=TESTS, raise_exception=False)
    failed = {name: result for name, result in results.items() if result != "SUCCESS"}
    assert not failed, failed
    assert set(results) == set(TESTS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize(
    ("scaled", "found_inf"), [(False, 0.0), (True, 0.0), (True, 1.0)], ids=["plain", "amp", "inf"]
)
def test_opcheck_adam(dtype: torch.dtype, amsgrad: bool, scaled: bool, found_inf: float) -> None:
    params, grads, offsets = _bucket(dtype)
    total = 64
    grad_scale, inf = _amp(scaled, found_inf)
    args = (
        params,
        grads,
        torch.randn(total).to(dtype),  # exp_avg
        torch.rand(total).to(dtype),  # exp_avg_sq
        torch.rand(total).to(dtype) if amsgrad else None,  # max_exp_avg_sq
        torch.tensor([2.0, 0.0, 1.0, 4.0]),  # step, one per tensor
        offsets,
        grad_scale,
        inf,
        torch.tensor(1e-2, dtype=torch.float64),  # lr (a tensor: no recompile when it changes)
        0.9,  # beta1
        0.999,  # beta2
        1e-8,  # eps
        0.0,  # weight_decay (L2)
        0.1,  # decay_coefficient (decoupled: p *= 1 - lr * 0.1)
        amsgrad,
        False,  # maximize
        False,  # l2_decay
        None,  # master_param
        7 if dtype == torch.bfloat16 else -1,  # sr_seed: stochastic rounding in bf16
    )
    _check(torch.ops.onepass.adam_.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize(
    ("scaled", "found_inf"), [(False, 0.0), (True, 0.0), (True, 1.0)], ids=["plain", "amp", "inf"]
)
def test_opcheck_sgd(dtype: torch.dtype, momentum: float, scaled: bool, found_inf: float) -> None:
    params, grads, offsets = _bucket(dtype)
    grad_scale, inf = _amp(scaled, found_inf)
    args = (
        params,
        grads,
        torch.randn(64).to(dtype) if momentum else None,  # momentum_buffer
        torch.tensor([0.0, 3.0, 1.0, 2.0]),  # step
        offsets,
        grad_scale,
        inf,
        torch.tensor(0.1),  # lr
        momentum,
        0.1,  # dampening
        0.01,  # weight_decay (L2)
        0.0,  # decay_coefficient
        momentum != 0.0,  # nesterov
        True,  # maximize
        True,  # l2_decay
        None,  # master_param
        -1,  # sr_seed: round to nearest
    )
    _check(torch.ops.onepass.sgd_.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("l2_decay", [False, True], ids=["decoupled", "l2"])
@pytest.mark.parametrize(
    ("scaled", "found_inf"), [(False, 0.0), (True, 0.0), (True, 1.0)], ids=["plain", "amp", "inf"]
)
def test_opcheck_lion(dtype: torch.dtype, l2_decay: bool, scaled: bool, found_inf: float) -> None:
    params, grads, offsets = _bucket(dtype)
    grad_scale, inf = _amp(scaled, found_inf)
    args = (
        params,
        grads,
        torch.randn(64).to(dtype),  # exp_avg
        torch.tensor([2.0, 0.0, 1.0, 4.0]),  # step (the engine's count; Lion does not read it)
        offsets,
        grad_scale,
        inf,
        torch.tensor(1e-4, dtype=torch.float64),  # lr
        0.9,  # beta1
        0.99,  # beta2
        0.1 if l2_decay else 0.0,  # weight_decay (L2)
        0.0 if l2_decay else 0.1,  # decay_coefficient (decoupled)
        not l2_decay,  # maximize
        l2_decay,
        None,  # master_param
        -1,  # sr_seed: round to nearest
    )
    _check(torch.ops.onepass.lion_.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize(
    ("scaled", "found_inf"), [(False, 0.0), (True, 0.0), (True, 1.0)], ids=["plain", "amp", "inf"]
)
def test_opcheck_muon_momentum(
    dtype: torch.dtype, nesterov: bool, scaled: bool, found_inf: float
) -> None:
    """Muon's momentum pass: the "params" are the update workspace's slices (written)."""
    updates, grads, offsets = _bucket(dtype)
    grad_scale, inf = _amp(scaled, found_inf)
    args = (
        updates,
        grads,
        torch.randn(64).to(dtype),  # momentum_buffer
        torch.tensor([2.0, 0.0, 1.0, 4.0]),  # step
        offsets,
        grad_scale,
        inf,
        0.95,  # momentum
        nesterov,
    )
    _check(torch.ops.onepass.muon_momentum_.default, args)


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_opcheck_adam_master_weights(grad_dtype: torch.dtype) -> None:
    """bf16 params, fp32 state and fp32 masters (and fp32 grads): master_param is mutated."""
    params, grads, offsets = _bucket(torch.bfloat16)
    grads = [None if g is None else g.to(grad_dtype) for g in grads]
    args = (
        params,
        grads,
        torch.randn(64),  # exp_avg
        torch.rand(64),  # exp_avg_sq
        None,  # max_exp_avg_sq
        torch.tensor([2.0, 0.0, 1.0, 4.0]),  # step
        offsets,
        None,
        None,
        torch.tensor(1e-2, dtype=torch.float64),  # lr
        0.9,
        0.999,
        1e-8,
        0.0,
        0.1,
        False,
        False,
        False,
        torch.randn(64),  # master_param
        -1,
    )
    _check(torch.ops.onepass.adam_.default, args)


def test_op_mutates_only_what_it_declares() -> None:
    """The step counts advance only for tensors with a grad; found_inf leaves everything alone."""
    params, grads, offsets = _bucket(torch.float32)
    exp_avg, exp_avg_sq = torch.zeros(64), torch.zeros(64)
    step = torch.tensor([2.0, 0.0, 1.0, 4.0])
    before = [p.clone() for p in params]
    common = (torch.tensor(1e-2), 0.9, 0.999, 1e-8, 0.0, 0.0, False, False, False, None, -1)
    torch.ops.onepass.adam_(
        params, grads, exp_avg, exp_avg_sq, None, step, offsets, None, torch.tensor(1.0), *common
    )
    assert step.tolist() == [2.0, 0.0, 1.0, 4.0]
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert torch.count_nonzero(exp_avg) == 0
    torch.ops.onepass.adam_(
        params, grads, exp_avg, exp_avg_sq, None, step, offsets, None, None, *common
    )
    assert step.tolist() == [3.0, 1.0, 2.0, 4.0]
    assert not torch.equal(params[1], before[1]) and torch.equal(params[3], before[3])
    assert not params[1].is_contiguous()  # written back through the view


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize(("scaled", "found_inf"), [(False, 0.0), (True, 0.0), (True, 1.0)])
def test_opcheck_novograd(
    dtype: torch.dtype, amsgrad: bool, scaled: bool, found_inf: float
) -> None:
    params, grads, offsets = _bucket(dtype)
    grad_scale, inf = _amp(scaled, found_inf)
    scalar_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    args = (
        params,
        grads,
        torch.randn(64).to(dtype),  # exp_avg
        torch.rand(4, dtype=scalar_dtype),  # exp_avg_sq: one per tensor
        torch.rand(4, dtype=scalar_dtype) if amsgrad else None,  # max_exp_avg_sq
        torch.tensor([2.0, 0.0, 1.0, 4.0]),  # step: tensor 1 takes its first step
        offsets,
        grad_scale,
        inf,
        torch.tensor(1e-3, dtype=torch.float64),  # lr
        0.95,  # beta1
        0.98,  # beta2
        1e-8,  # eps
        0.1,  # weight_decay
        amsgrad,  # grad_averaging (varied with amsgrad)
        amsgrad,
        not amsgrad,  # maximize
        None,  # master_param
        -1,  # sr_seed: round to nearest
    )
    _check(torch.ops.onepass.novograd_.default, args)


def test_novograd_op_mutates_only_what_it_declares() -> None:
    """Tensors without a grad keep their param, exp_avg slice, scalar second moment and step; the
    zero-size tensor with a grad advances and its second moment decays (its norm is 0)."""
    params, grads, offsets = _bucket(torch.float32)
    exp_avg = torch.zeros(64)
    exp_avg_sq = torch.tensor([1.0, 2.0, 3.0, 4.0])
    step = torch.tensor([2.0, 0.0, 1.0, 4.0])
    before = [p.clone() for p in params]
    torch.ops.onepass.novograd_(
        params, grads, exp_avg, exp_avg_sq, None, step, offsets, None, None,
        torch.tensor(1e-2), 0.95, 0.98, 1e-8, 0.0, False, False, False, None, -1,
    )  # fmt: skip
    assert step.tolist() == [3.0, 1.0, 2.0, 4.0]
    assert torch.equal(params[3], before[3]) and exp_avg_sq[3] == 4.0
    assert exp_avg_sq[2] == torch.tensor(0.98 * 3.0, dtype=torch.float32)
    g1 = grads[1]
    assert g1 is not None
    assert exp_avg_sq[1] == torch.tensor(float(g1.double().square().sum()), dtype=torch.float32)
    assert not torch.equal(params[1], before[1]) and not params[1].is_contiguous()
    assert torch.count_nonzero(exp_avg[48:]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize(("scaled", "found_inf"), [(False, 0.0), (True, 0.0), (True, 1.0)])
def test_opcheck_fadam(dtype: torch.dtype, maximize: bool, scaled: bool, found_inf: float) -> None:
    params, grads, offsets = _bucket(dtype)
    grad_scale, inf = _amp(scaled, found_inf)
    args = (
        params,
        grads,
        torch.rand(64).to(dtype),  # fim (non-negative)
        torch.randn(64).to(dtype),  # momentum
        torch.tensor([2.0, 0.0, 1.0, 4.0]),  # step: tensor 1 takes its first step
        offsets,
        grad_scale,
        inf,
        torch.tensor(1e-3, dtype=torch.float64),  # lr
        0.9,  # beta1
        0.999,  # beta2
        1e-8,  # eps
        0.5,  # clip
        0.25 if maximize else 0.5,  # p
        0.1,  # weight_decay
        maximize,
        None,  # master_param
        -1,  # sr_seed: round to nearest
    )
    _check(torch.ops.onepass.fadam_.default, args)


def test_fadam_op_mutates_only_what_it_declares() -> None:
    """Tensors without a grad keep their param, state slices and step; the zero-size tensor with
    a grad advances; a first step sets F = g^2."""
    params, grads, offsets = _bucket(torch.float32)
    fim = torch.zeros(64)
    momentum = torch.zeros(64)
    step = torch.tensor([2.0, 0.0, 1.0, 4.0])
    before = [p.clone() for p in params]
    torch.ops.onepass.fadam_(
        params, grads, fim, momentum, step, offsets, None, None,
        torch.tensor(1e-2), 0.9, 0.999, 1e-8, 1.0, 0.5, 0.1, False, None, -1,
    )  # fmt: skip
    assert step.tolist() == [3.0, 1.0, 2.0, 4.0]
    assert torch.equal(params[3], before[3])
    assert not torch.equal(params[1], before[1]) and not params[1].is_contiguous()
    assert torch.count_nonzero(fim[48:]) == 0 and torch.count_nonzero(momentum[48:]) == 0
