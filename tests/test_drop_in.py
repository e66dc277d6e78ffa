"""Drop-in behaviour: onepass optimizers do what torch.optim's do, everywhere torch.optim's API
reaches (issue item 3). Every comparison runs the same steps through the matching torch.optim class
in float64 and compares params and state to ~1e-12 (or bitwise where both sides are onepass)."""

from __future__ import annotations

import collections
import copy
import io
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from test_reference_vs_torch import assert_same_as_torch

import onepass

from helpers import (
    ADAM_INFO,
    ADAMW_INFO,
    SGD_INFO,
    TRITON_INTERPRETED,
    OptimizerInfo,
    assert_unchanged,
    bitwise_equal,
    make_grads,
    make_params,
    set_grads,
    snapshot,
)

F64 = torch.float64


def clone_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Independent leaf copies (same values, strides and requires_grad)."""
    out = []
    for p in params:
        q = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype)
        q.copy_(p.detach())
        out.append(q.requires_grad_(p.requires_grad))
    return out


def step_both(
    ours: torch.optim.Optimizer,
    theirs: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    their_params: Sequence[torch.Tensor],
    steps: range,
) -> None:
    for s in steps:
        grads = make_grads(params, s)
        set_grads(params, grads)
        set_grads(their_params, grads)
        ours.step()
        theirs.step()


# ------------------------------------------------------------------------------------------------
# Param groups
# ------------------------------------------------------------------------------------------------

GROUP_CASES = [
    pytest.param(
        ADAMW_INFO,
        {"lr": 5e-3},
        [
            {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.99)},
            {"lr": 3e-2, "weight_decay": 0.0, "amsgrad": True, "eps": 1e-6},
            {"maximize": True},
        ],
        id="AdamW",
    ),
    pytest.param(
        ADAM_INFO,
        {"lr": 1e-2, "weight_decay": 0.05},
        [{}, {"lr": 2e-2, "amsgrad": True, "weight_decay": 0.0}, {"betas": (0.5, 0.9)}],
        id="Adam",
    ),
    pytest.param(
        SGD_INFO,
        {"lr": 0.1, "momentum": 0.9},
        [
            {"nesterov": True, "weight_decay": 0.1},
            {"momentum": 0.0, "lr": 0.05},
            {"dampening": 0.5, "maximize": True},
        ],
        id="SGD",
    ),
]


@pytest.mark.parametrize(("info", "defaults", "groups"), GROUP_CASES)
def test_param_groups_with_different_hyperparameters(
    info: OptimizerInfo, defaults: dict[str, Any], groups: list[dict[str, Any]], backend_name: str
) -> None:
    params = make_params(F64)
    theirs = clone_params(params)
    split = [params[0:4], params[4:7], params[7:]]
    their_split = [theirs[0:4], theirs[4:7], theirs[7:]]
    ours = info.onepass_cls(
        [{"params": ps, **g} for ps, g in zip(split, groups, strict=True)],
        **defaults,
        backend=backend_name,
    )
    assert info.torch_cls is not None
    expected = info.torch_cls(
        [{"params": ps, **g} for ps, g in zip(their_split, groups, strict=True)], **defaults
    )
    step_both(ours, expected, params, theirs, range(1, 8))
    assert_same_as_torch(ours, expected, params, theirs)


def test_mixed_dtypes_in_one_group(backend_name: str) -> None:
    """float64 and float32 params of one group (two buckets) vs torch.optim, each at its own
    dtype's tolerance."""
    params = make_params(F64)[:4] + make_params(torch.float32)[2:5]
    theirs = clone_params(params)
    ours = onepass.AdamW(params, lr=1e-2, amsgrad=True, backend=backend_name)
    expected = torch.optim.AdamW(theirs, lr=1e-2, amsgrad=True)
    step_both(ours, expected, params, theirs, range(1, 8))
    assert_same_as_torch(ours, expected, params[:4], theirs[:4])
    assert_same_as_torch(ours, expected, params[4:], theirs[4:], rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize(
    ("info", "config", "new_group"),
    [
        pytest.param(ADAMW_INFO, {"lr": 1e-2}, {"lr": 3e-2, "amsgrad": True}, id="AdamW"),
        pytest.param(SGD_INFO, {"lr": 0.1, "momentum": 0.9}, {"nesterov": True}, id="SGD"),
    ],
)
def test_add_param_group_after_steps(
    info: OptimizerInfo, config: dict[str, Any], new_group: dict[str, Any], backend_name: str
) -> None:
    params = make_params(F64)
    theirs = clone_params(params)
    ours = info.onepass_cls(params[:5], **config, backend=backend_name)
    assert info.torch_cls is not None
    expected = info.torch_cls(theirs[:5], **config)
    step_both(ours, expected, params[:5], theirs[:5], range(1, 4))
    ours.add_param_group({"params": params[5:], **new_group})
    expected.add_param_group({"params": theirs[5:], **new_group})
    step_both(ours, expected, params, theirs, range(4, 8))
    assert_same_as_torch(ours, expected, params, theirs)


@pytest.mark.parametrize("how", ["item", "whole-list"])
def test_a_param_replaced_in_the_group_is_stepped(how: str, backend_name: str) -> None:
    """A layer swapped for a new one of the same shape (group['params'][i] = new, or the whole
    list reassigned at the same length) after some steps: the new param is stepped from fresh
    state, as torch.optim does (which also keeps the old param's state)."""
    params = make_params(F64)
    theirs = clone_params(params)
    ours = onepass.AdamW(params, lr=1e-2, backend=backend_name)
    expected = torch.optim.AdamW(theirs, lr=1e-2)
    step_both(ours, expected, params, theirs, range(1, 4))
    for plist, opt in ((params, ours), (theirs, expected)):
        plist[0] = torch.randn(plist[0].shape, dtype=F64).requires_grad_()
        if how == "item":
            opt.param_groups[0]["params"][0] = plist[0]
        else:
            opt.param_groups[0]["params"] = list(plist)
    step_both(ours, expected, params, theirs, range(4, 8))
    assert_same_as_torch(ours, expected, params, theirs)


@pytest.mark.parametrize(
    ("info", "key", "values"),
    [
        pytest.param(SGD_INFO, "momentum", [0.9, 0.0, 0.0, 0.9, 0.9], id="SGD-momentum"),
        # (torch.optim.Adam raises KeyError here for the params whose first step came with
        # amsgrad off; onepass starts their max at 0: compared while amsgrad stays off)
        pytest.param(ADAM_INFO, "amsgrad", [True, False, False], id="Adam-amsgrad"),
    ],
)
def test_a_slot_switched_off_is_kept_for_later(
    info: OptimizerInfo, key: str, values: list[Any], backend_name: str
) -> None:
    """Momentum set to 0 (or amsgrad off) for some steps and back: torch.optim keeps the
    momentum buffer (max_exp_avg_sq) meanwhile and resumes from it; so does onepass, and its
    state_dict carries it meanwhile, loadable by either class."""
    params = make_params(F64)
    theirs = clone_params(params)
    ours = info.onepass_cls(params, lr=1e-2, backend=backend_name)
    assert info.torch_cls is not None
    expected = info.torch_cls(theirs, lr=1e-2)
    for s, value in enumerate(values, start=1):
        ours.param_groups[0][key] = expected.param_groups[0][key] = value
        step_both(ours, expected, params, theirs, range(s, s + 1))
        assert_same_as_torch(ours, expected, params, theirs)
        if s == 3:  # switched off: the kept slot round-trips through both classes
            saved = ours.state_dict()
            again = info.onepass_cls(clone_params(params), lr=1e-2, backend=backend_name)
            again.load_state_dict(saved)
            info.torch_cls(clone_params(theirs), lr=1e-2).load_state_dict(saved)
            assert again.state_dict()["state"].keys() == saved["state"].keys()


def test_frozen_param_unfrozen_later(backend_name: str) -> None:
    """A param with no grad for 3 steps gets one: the others keep their state, it starts at 1."""
    params = make_params(F64)
    theirs = clone_params(params)
    ours = onepass.Adam(params, lr=1e-2, backend=backend_name)
    expected = torch.optim.Adam(theirs, lr=1e-2)
    step_both(ours, expected, params, theirs, range(1, 4))
    assert params[-1] not in ours.state
    params[-1].requires_grad_()
    theirs[-1].requires_grad_()
    step_both(ours, expected, params, theirs, range(4, 8))
    assert float(ours.state[params[-1]]["step"]) == float(expected.state[theirs[-1]]["step"]) > 0
    assert_same_as_torch(ours, expected, params, theirs)


@pytest.mark.parametrize("first", [[0, 1], [3], [1, 2, 3]], ids=str)
def test_state_appears_when_a_param_first_has_a_grad(first: list[int], backend_name: str) -> None:
    """Params whose grads are None at the first steps get ``optimizer.state`` entries at the
    step that first gives them a grad, one by one, as torch.optim's do."""
    params = make_params(F64)
    theirs = clone_params(params)
    ours = onepass.AdamW(params, lr=1e-2, backend=backend_name)
    expected = torch.optim.AdamW(theirs, lr=1e-2)
    for s, stepped in enumerate([first, first, [*first, 2], list(range(len(params)))], start=1):
        grads = [g if i in stepped else None for i, g in enumerate(make_grads(params, s))]
        set_grads(params, grads)
        set_grads(theirs, grads)
        ours.step()
        expected.step()
        assert sorted(i for i, p in enumerate(params) if p in ours.state) == sorted(
            i for i, p in enumerate(theirs) if p in expected.state
        )
        assert_same_as_torch(ours, expected, params, theirs)


# ------------------------------------------------------------------------------------------------
# zero_grad, closure, hooks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none: bool, backend_name: str) -> None:
    params = make_params(F64)
    theirs = clone_params(params)
    ours = onepass.AdamW(params, lr=1e-2, backend=backend_name)
    expected = torch.optim.AdamW(theirs, lr=1e-2)
    step_both(ours, expected, params, theirs, range(1, 4))
    ours.zero_grad(set_to_none=set_to_none)
    expected.zero_grad(set_to_none=set_to_none)
    for p in params:
        if set_to_none or p.grad is None:
            assert p.grad is None
        else:
            assert torch.count_nonzero(p.grad) == 0
    before = snapshot(ours)
    ours.step()
    expected.step()
    if set_to_none:
        assert_unchanged(ours, before)  # no grads: nothing moves, no step advances
    else:
        assert not bitwise_equal(params[3], before.params[3])  # zero grads still step (moments)
    assert_same_as_torch(ours, expected, params, theirs)


def _model_and_loss(seed: int = 0) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = model.to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    x = torch.randn(16, 4, generator=gen, dtype=F64)
    y = torch.randn(16, 3, generator=gen, dtype=F64)

    def loss() -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(x), y)

    return model, loss


def test_closure(backend_name: str) -> None:
    model, loss_fn = _model_and_loss()
    their_model, their_loss_fn = _model_and_loss()
    ours = onepass.AdamW(model.parameters(), lr=1e-2, backend=backend_name)
    expected = torch.optim.AdamW(their_model.parameters(), lr=1e-2)
    grad_enabled: list[bool] = []

    def closure() -> torch.Tensor:
        grad_enabled.append(torch.is_grad_enabled())
        ours.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    def their_closure() -> torch.Tensor:
        expected.zero_grad()
        loss = their_loss_fn()
        loss.backward()
        return loss

    for _ in range(7):
        loss = ours.step(closure)
        their_loss = expected.step(their_closure)
        assert isinstance(loss, torch.Tensor)
        assert loss.item() == pytest.approx(their_loss.item(), rel=1e-12)
    assert grad_enabled == [True] * 7
    assert torch.is_grad_enabled()  # the caller's grad mode is restored after step()
    assert_same_as_torch(ours, expected, list(model.parameters()), list(their_model.parameters()))


@pytest.mark.parametrize("caller_grad_mode", [True, False])
def test_step_runs_without_grad_and_restores_the_callers_mode(
    backend_name: str, caller_grad_mode: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = make_params(F64)
    ours = onepass.AdamW(params, lr=0.1, backend=backend_name)
    seen: list[bool] = []
    engine_step = ours._engine.step

    def recording_step(*args: Any) -> None:
        seen.append(torch.is_grad_enabled())
        engine_step(*args)

    monkeypatch.setattr(ours._engine, "step", recording_step)
    with torch.set_grad_enabled(caller_grad_mode):
        ours.step()
        assert torch.is_grad_enabled() is caller_grad_mode
        params[2].grad = torch.ones(7, dtype=F64).to_sparse()  # refused: the mode still returns
        with pytest.raises((TypeError, RuntimeError, ValueError)):
            ours.step()
        assert torch.is_grad_enabled() is caller_grad_mode
    assert seen == [False, False]


def test_step_hooks(backend_name: str) -> None:
    params = make_params(F64)
    ours = onepass.SGD(params, lr=0.1, momentum=0.9, backend=backend_name)
    calls: list[tuple[str, torch.Tensor]] = []

    def pre(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        assert optimizer is ours
        calls.append(("pre", params[3].detach().clone()))

    def post(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        assert optimizer is ours
        calls.append(("post", params[3].detach().clone()))

    pre_handle = ours.register_step_pre_hook(pre)
    post_handle = ours.register_step_post_hook(post)
    set_grads(params, make_grads(params, 1))
    ours.step()
    assert [c[0] for c in calls] == ["pre", "post"]
    assert not bitwise_equal(calls[0][1], calls[1][1])  # pre saw the params before the update
    assert bitwise_equal(calls[1][1], params[3].detach())  # post after it
    pre_handle.remove()
    post_handle.remove()
    ours.step()
    assert len(calls) == 2


def test_step_hooks_see_torchs_arguments() -> None:
    """The hooks get what torch.optim's wrapper gives them: ``args`` with the optimizer first,
    and a pre hook may replace the arguments (here: a closure added)."""
    seen: dict[str, list[tuple[int, bool, bool]]] = {"torch": [], "onepass": []}
    losses: list[float] = []

    def closure() -> float:
        losses.append(1.0)
        return 1.0

    for name, cls in (("torch", torch.optim.SGD), ("onepass", onepass.SGD)):
        params = make_params(F64)
        opt = cls(params, lr=0.1)

        def pre(o: Any, args: Any, kwargs: Any, name: str = name) -> Any:
            seen[name].append((len(args), args[0] is o, "closure" in kwargs))
            return (args, {"closure": closure}) if len(seen[name]) == 1 else None

        def post(o: Any, args: Any, kwargs: Any, name: str = name) -> None:
            seen[name].append((len(args), args[0] is o, "closure" in kwargs))

        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)
        set_grads(params, make_grads(params, 1))
        assert opt.step() == 1.0  # the pre hook's closure ran
        opt.step()
    assert seen["onepass"] == seen["torch"]
    assert seen["onepass"][0] == (1, True, False) and len(losses) == 2


def test_step_shows_in_the_profiler() -> None:
    """torch.optim's ``Optimizer.step#<class>.step`` range: onepass enters it only while a
    profiler runs (FusedOptimizer.profile_hook_step), and a profiler sees it."""
    params = make_params(F64)
    ours = onepass.AdamW(params, lr=0.1)
    set_grads(params, make_grads(params, 1))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        ours.step()
    names = [event.name for event in profiler.events()]
    assert "Optimizer.step#AdamW.step" in names
    assert float(ours.state[params[0]]["step"]) == 1.0


# ------------------------------------------------------------------------------------------------
# LR schedulers and tensor lr
# ------------------------------------------------------------------------------------------------

SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize(
    ("info", "config"),
    [
        pytest.param(ADAMW_INFO, {"lr": 1e-2, "weight_decay": 0.1}, id="AdamW"),
        pytest.param(ADAM_INFO, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}, id="Adam"),
        pytest.param(SGD_INFO, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}, id="SGD"),
    ],
)
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_lr_scheduler(
    info: OptimizerInfo,
    config: dict[str, Any],
    scheduler: str,
    tensor_lr: bool,
    backend_name: str,
) -> None:
    """torch.optim.lr_scheduler drives onepass exactly as it drives torch.optim; lr may be a 0-d
    tensor (the scheduler then updates it in place)."""
    params = make_params(F64)
    theirs = clone_params(params)
    kwargs = dict(config)
    their_kwargs = dict(config)
    if tensor_lr:
        # float64 like the params: torch.optim.Adam computes lr / bias_correction1 in the lr
        # tensor's dtype, so a float32 lr would round torch's step size to float32 (a ~1e-8
        # relative difference from onepass, which reads lr as a Python float).
        kwargs["lr"] = torch.tensor(config["lr"], dtype=F64)
        their_kwargs["lr"] = torch.tensor(config["lr"], dtype=F64)
    ours = info.onepass_cls(params, **kwargs, backend=backend_name)
    assert info.torch_cls is not None
    expected = info.torch_cls(theirs, **their_kwargs)
    sched, their_sched = SCHEDULERS[scheduler](ours), SCHEDULERS[scheduler](expected)
    lrs = []
    for s in range(1, 9):
        step_both(ours, expected, params, theirs, range(s, s + 1))
        sched.step()
        their_sched.step()
        lrs.append(float(ours.param_groups[0]["lr"]))
        assert lrs[-1] == float(expected.param_groups[0]["lr"])
    assert len(set(lrs)) > 2, "the schedule did not move lr"
    assert isinstance(ours.param_groups[0]["lr"], torch.Tensor) == tensor_lr
    assert_same_as_torch(ours, expected, params, theirs)


# ------------------------------------------------------------------------------------------------
# deepcopy, pickle, state_dict interchange
# ------------------------------------------------------------------------------------------------


def _state_tensors(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> list[Any]:
    out: list[Any] = [p.detach() for p in params]
    for p in params:
        for key, value in sorted(optimizer.state.get(p, {}).items()):
            out.append((key, value))
    return out


def _assert_bitwise_same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for k, (x, y) in enumerate(zip(a, b, strict=True)):
        if isinstance(x, tuple):
            assert x[0] == y[0]
            x, y = x[1], y[1]
        assert bitwise_equal(x, y), f"tensor {k} differs"


COPIERS: dict[str, Callable[[Any], Any]] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "torch.save": lambda obj: torch.load(_saved(obj), weights_only=False),
}


def _saved(obj: Any) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("copier", list(COPIERS))
@pytest.mark.parametrize(
    ("info", "config"),
    [
        pytest.param(ADAMW_INFO, {"lr": 1e-2, "amsgrad": True}, id="AdamW-amsgrad"),
        pytest.param(
            ADAM_INFO, {"lr": 1e-2, "weight_decay": 0.1, "decay": "independent"}, id="Adam-indep"
        ),
        pytest.param(SGD_INFO, {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}, id="SGD-momentum"),
    ],
)
def test_copy_round_trip(
    info: OptimizerInfo, config: dict[str, Any], copier: str, backend_name: str
) -> None:
    """Copy (params, optimizer) after 3 steps; the original and the copy continue 4 steps and
    both equal, bitwise, an uninterrupted run (so the copy shares no memory with the original)."""
    dtype = torch.float32
    control_params = make_params(dtype)
    params = clone_params(control_params)
    control = info.onepass_cls(control_params, **config, backend=backend_name)
    ours = info.onepass_cls(params, **config, backend=backend_name)
    all_grads = [make_grads(params, s) for s in range(1, 8)]
    for s in range(3):
        set_grads(control_params, all_grads[s])
        control.step()
        set_grads(params, all_grads[s])
        ours.step()
    copied_params, copied = COPIERS[copier]((params, ours))
    assert type(copied) is type(ours)
    for s in range(3, 7):
        for ps, opt in ((control_params, control), (params, ours), (copied_params, copied)):
            set_grads(ps, all_grads[s])
            opt.step()
    expected = _state_tensors(control, control_params)
    _assert_bitwise_same(_state_tensors(ours, params), expected)
    _assert_bitwise_same(_state_tensors(copied, copied_params), expected)


INTERCHANGE = [
    pytest.param(ADAMW_INFO, {"lr": 1e-2, "weight_decay": 0.1}, id="AdamW"),
    pytest.param(ADAMW_INFO, {"lr": 1e-2, "amsgrad": True, "maximize": True}, id="AdamW-amsgrad"),
    pytest.param(ADAM_INFO, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}, id="Adam"),
    pytest.param(SGD_INFO, {"lr": 0.1, "momentum": 0.9, "dampening": 0.2}, id="SGD-momentum"),
    pytest.param(SGD_INFO, {"lr": 0.1, "momentum": 0.9, "nesterov": True}, id="SGD-nesterov"),
]


@pytest.mark.parametrize("transport", ["direct", "torch.save"])
@pytest.mark.parametrize("direction", ["onepass-to-torch", "torch-to-onepass"])
@pytest.mark.parametrize(("info", "config"), INTERCHANGE)
def test_state_dict_interchange(
    info: OptimizerInfo,
    config: dict[str, Any],
    direction: str,
    transport: str,
    backend_name: str,
) -> None:
    """Save after 3 steps in one, load into the other, continue 4 steps: the params and state equal
    continuing in the original."""
    assert info.torch_cls is not None
    torch_cls = info.torch_cls

    def build(kind: str, ps: list[torch.Tensor]) -> torch.optim.Optimizer:
        if kind == "onepass":
            return info.onepass_cls(ps, **config, backend=backend_name)
        return torch_cls(ps, **config)

    source_kind, target_kind = direction.split("-to-")
    params = make_params(F64)
    source = build(source_kind, params)
    for s in range(1, 4):
        set_grads(params, make_grads(params, s))
        source.step()
    saved = source.state_dict()
    if transport == "direct":
        # torch.optim.load_state_dict keeps same-dtype tensors by reference: copy, as torch's
        # own docs do, so the two optimizers do not share state
        saved = copy.deepcopy(saved)
    else:
        saved = torch.load(_saved(saved), weights_only=True)
    target_params = clone_params(params)
    target = build(target_kind, target_params)
    target.load_state_dict(saved)
    for key in ("lr", "weight_decay", "maximize"):
        assert target.param_groups[0][key] == source.param_groups[0][key]
    step_both(target, source, target_params, params, range(4, 8))
    assert_same_as_torch(target, source, target_params, params)


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="Triton on CPU tensors runs interpreted")
@pytest.mark.parametrize("direction", ["onepass-to-torch", "torch-to-onepass"])
@pytest.mark.parametrize(("info", "config"), INTERCHANGE)
def test_state_dict_interchange_on_triton(
    info: OptimizerInfo, config: dict[str, Any], direction: str
) -> None:
    """The same interchange with the Triton backend's state (its step counts live in the
    backend's own buffer, on the device where there is one)."""
    test_state_dict_interchange(info, config, direction, "torch.save", "triton")


def test_state_dict_round_trip_keeps_onepass_options(backend_name: str) -> None:
    """onepass -> onepass keeps onepass-only group options (decay mode, initial_lr)."""
    params = make_params(F64)
    ours = onepass.AdamW(
        params, lr=1e-2, weight_decay=0.1, decay="independent", backend=backend_name
    )
    sched = torch.optim.lr_scheduler.StepLR(ours, 1, gamma=0.5)
    for s in range(1, 4):
        set_grads(params, make_grads(params, s))
        ours.step()
        sched.step()
    target_params = clone_params(params)
    target = onepass.AdamW(target_params, lr=1e-2, backend=backend_name)
    target.load_state_dict(torch.load(_saved(ours.state_dict()), weights_only=True))
    group = target.param_groups[0]
    assert group["decay"] == "independent" and group["initial_lr"] == 1e-2
    assert group["lr"] == pytest.approx(1.25e-3)
    step_both(target, ours, target_params, params, range(4, 8))
    assert_same_as_torch(target, ours, target_params, params)


def test_load_state_dict_pre_hooks_run_before_the_check(backend_name: str) -> None:
    """A pre-hook that upgrades an old checkpoint (a renamed slot) runs before onepass checks
    the state_dict, as torch.optim runs it before using it; the result continues like torch."""

    def upgrade(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        renamed = {"m": "exp_avg"}
        state = {
            k: {renamed.get(key, key): v for key, v in entry.items()}
            for k, entry in state_dict["state"].items()
        }
        return {**state_dict, "state": state}

    params = make_params(F64)
    source = torch.optim.AdamW(params, lr=1e-2)
    for s in range(1, 3):
        set_grads(params, make_grads(params, s))
        source.step()
    old = source.state_dict()
    old["state"] = {
        k: {("m" if key == "exp_avg" else key): v for key, v in entry.items()}
        for k, entry in old["state"].items()
    }
    target_params = clone_params(params)
    target = onepass.AdamW(target_params, lr=1e-2, backend=backend_name)
    target.register_load_state_dict_pre_hook(upgrade)
    target.load_state_dict(old)
    step_both(target, source, target_params, params, range(3, 6))
    assert_same_as_torch(target, source, target_params, params)


def test_state_dict_hooks_run_as_torchs(backend_name: str) -> None:
    """torch.optim's state_dict hooks: a pre hook before the dict is built, a post hook that may
    replace it (what state_dict() returns), a load post hook after the state is in place (it
    sees the loaded moments), each in the order torch runs them."""
    params = make_params(F64)
    ours = onepass.AdamW(params, lr=1e-2, backend=backend_name)
    set_grads(params, make_grads(params, 1))
    ours.step()
    calls: list[str] = []

    def post(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        calls.append("post")
        return {**state_dict, "extra": 1}

    def loaded(optimizer: torch.optim.Optimizer) -> None:
        calls.append("loaded")
        exp_avg = optimizer.state[params[0]]["exp_avg"]
        assert torch.equal(exp_avg, saved["state"][0]["exp_avg"])

    ours.register_state_dict_pre_hook(lambda optimizer: calls.append("pre"))
    ours.register_state_dict_post_hook(post)
    saved = copy.deepcopy(ours.state_dict())
    assert calls == ["pre", "post"] and saved["extra"] == 1
    ours.register_load_state_dict_post_hook(loaded)
    set_grads(params, make_grads(params, 2))
    ours.step()  # the load must bring back the moments of step 1
    ours.load_state_dict(saved)
    assert calls == ["pre", "post", "loaded"]


def test_only_empty_tensors(backend_name: str) -> None:
    """A bucket whose every tensor has zero elements: legal, only the step counts advance."""
    params = [torch.randn(0, dtype=F64).requires_grad_(), torch.randn(0, 3, dtype=F64)]
    params[1].requires_grad_()
    theirs = clone_params(params)
    ours = onepass.AdamW(params, amsgrad=True, backend=backend_name)
    expected = torch.optim.AdamW(theirs, amsgrad=True)
    step_both(ours, expected, params, theirs, range(1, 8))
    assert_same_as_torch(ours, expected, params, theirs)
    assert float(ours.state[params[0]]["step"]) > 0


def _reset(optimizer: torch.optim.Optimizer, how: str, p: torch.Tensor) -> None:
    if how == "state.clear()":
        optimizer.state.clear()
    elif how == "new-state-dict":
        optimizer.state = collections.defaultdict(dict)
    elif how == "del-entry":
        del optimizer.state[p]
    else:
        optimizer.state[p]["exp_avg"] = torch.zeros_like(p)


@pytest.mark.parametrize("how", ["state.clear()", "new-state-dict", "replace-exp_avg", "del-entry"])
def test_replaced_state_is_honoured(how: str, backend_name: str) -> None:
    """Resetting state the ways torch.optim users do: the next step starts from the new state."""
    params = make_params(F64)
    theirs = clone_params(params)
    ours = onepass.Adam(params, lr=0.1, backend=backend_name)
    expected = torch.optim.Adam(theirs, lr=0.1)
    step_both(ours, expected, params, theirs, range(1, 4))
    _reset(ours, how, params[3])
    _reset(expected, how, theirs[3])
    step_both(ours, expected, params, theirs, range(4, 6))
    assert_same_as_torch(ours, expected, params, theirs)


@pytest.mark.skipif(not onepass.native_available(), reason="onepass._C not built")
def test_the_native_step_lets_other_python_threads_run() -> None:
    """The eager ops borrow the params and grads under the GIL, then release it for the kernels
    (as torch's own ops do): another Python thread runs while a long CPU step is in its kernel."""
    import threading
    import time

    p = torch.zeros(1 << 25, requires_grad=True)  # a step of ~100 ms on 2 cores
    p.grad = torch.ones_like(p)
    opt = onepass.AdamW([p], backend="cpu")
    opt.step()
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0)

    thread = threading.Thread(target=tick)
    thread.start()
    while not ticks:
        time.sleep(0.001)
    inside = 0
    for _ in range(20):  # until a tick lands inside: a busy CI runner may starve the thread
        if inside:
            break
        start = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        # ticks well inside the call (the thread's own GIL turns at the ends excluded)
        margin = 0.2 * (end - start)
        inside += sum(start + margin < t < end - margin for t in ticks)
    stop.set()
    thread.join()
    assert inside > 0


@pytest.mark.parametrize("given", ["decoupled_weight_decay", "decay"])
def test_adam_group_decay_mode_of_its_own(given: str, backend_name: str) -> None:
    """torch.optim.Adam reads decoupled_weight_decay per param group: a group that gives it
    (or onepass's decay) steps by it, not by the constructor's default."""
    params = make_params(F64)
    theirs = clone_params(params)
    value: Any = True if given == "decoupled_weight_decay" else "decoupled"
    ours = onepass.Adam(
        [{"params": params[:4]}, {"params": params[4:], given: value}],
        weight_decay=0.3,
        backend=backend_name,
    )
    expected = torch.optim.Adam(
        [{"params": theirs[:4]}, {"params": theirs[4:], "decoupled_weight_decay": True}],
        weight_decay=0.3,
    )
    assert ours.param_groups[1]["decay"] == "decoupled"
    assert ours.param_groups[1]["decoupled_weight_decay"] is True
    step_both(ours, expected, params, theirs, range(1, 8))
    assert_same_as_torch(ours, expected, params, theirs)


def test_adam_decay_keys_that_disagree_are_refused() -> None:
    """decoupled_weight_decay changed alone in a group: the step, which follows decay, refuses
    it rather than half apply it (and changes nothing)."""
    p = torch.randn(5, requires_grad=True)
    optimizer = onepass.Adam([p], weight_decay=0.1)
    p.grad = torch.randn(5)
    optimizer.step()
    optimizer.param_groups[0]["decoupled_weight_decay"] = True
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"param_groups\[0\]: decoupled_weight_decay=True but"):
        optimizer.step()
    assert torch.equal(p, before)
    optimizer.param_groups[0]["decay"] = "decoupled"
    optimizer.step()
    with pytest.raises(ValueError, match="decoupled_weight_decay=False but decay='decoupled'"):
        onepass.Adam([{"params": [p], "decay": "decoupled", "decoupled_weight_decay": False}])


def test_a_load_keeps_the_loading_optimizers_run_options() -> None:
    """backend, flatten and stochastic_rounding say how an optimizer runs, not what it computes:
    a load keeps the loading optimizer's own (the checkpoint's had run this one on another
    backend, flattened its params and rounded stochastically; one saved with backend="cuda"
    failed to step on a CPU). The hyperparameters come from the checkpoint, as in torch."""
    params = make_params(torch.float32)
    source = onepass.AdamW(
        params, lr=0.05, backend="reference", flatten=True, stochastic_rounding=True
    )
    set_grads(params, make_grads(params, 1))
    source.step()
    checkpoint = copy.deepcopy(source.state_dict())
    for group in checkpoint["param_groups"]:
        group["backend"] = "cuda"  # as a run on a GPU saves it
    target_params = clone_params(params)
    target = onepass.AdamW(target_params, lr=1e-3, backend="cpu")
    target.load_state_dict(checkpoint)
    group = target.param_groups[0]
    assert (group["backend"], group["flatten"], group["stochastic_rounding"]) == (
        "cpu",
        False,
        False,
    )
    assert group["lr"] == 0.05
    set_grads(target_params, make_grads(target_params, 2))
    storages = [p.data_ptr() for p in target_params]
    target.step()
    assert [p.data_ptr() for p in target_params] == storages  # not flattened
    assert {b.backend for plan in target._engine.plans for b in plan.buckets} == {"cpu"}

    # capturable too (a capturable CUDA run resumes on a CPU); and a loader that rounds
    # stochastically keeps its own seed where the checkpoint has none (torch.optim's)
    checkpoint["param_groups"][0]["capturable"] = True
    rounding = onepass.AdamW(clone_params(params), stochastic_rounding=True)
    rounding.load_state_dict(checkpoint)
    assert rounding.param_groups[0]["capturable"] is False
    seed = rounding.param_groups[0]["sr_seed"]  # the checkpoint's
    rounding.load_state_dict(torch.optim.AdamW(clone_params(params)).state_dict())
    assert rounding.param_groups[0]["sr_seed"] == seed


# ------------------------------------------------------------------------------------------------
# What torch.optim takes as a user gives it
# ------------------------------------------------------------------------------------------------


class _ConfigList(collections.abc.Sequence):  # type: ignore[type-arg]
    """A sequence that is neither a tuple nor a list, as Hydra's OmegaConf ListConfig is."""

    def __init__(self, values: Sequence[float]) -> None:
        self._values = list(values)

    def __getitem__(self, index: Any) -> Any:
        return self._values[index]

    def __len__(self) -> int:
        return len(self._values)


def _as_kind(kind: str, values: tuple[float, ...]) -> Any:
    if kind == "config":
        return _ConfigList(values)
    if kind == "numpy":
        return pytest.importorskip("numpy").array(values)
    return torch.tensor(values, dtype=F64)


@pytest.mark.parametrize("kind", ["config", "numpy", "tensor"])
@pytest.mark.parametrize("name", ["AdamW", "Lion", "NovoGrad", "FAdam"])
def test_betas_in_any_sequence_torch_takes(kind: str, name: str, backend_name: str) -> None:
    """torch.optim indexes ``betas``: a Hydra config's ListConfig, a numpy array or a 1-D tensor
    steps as the tuple does (onepass had refused all three as not a tuple)."""
    values = (0.8, 0.95)
    params = make_params(torch.float32)
    twins = clone_params(params)
    cls = getattr(onepass, name)
    ours = cls(params, lr=1e-2, betas=_as_kind(kind, values), backend=backend_name)
    expected = cls(twins, lr=1e-2, betas=values, backend=backend_name)
    step_both(ours, expected, params, twins, range(1, 4))
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q)


def test_muon_ns_coefficients_from_a_config() -> None:
    """Muon's ``ns_coefficients`` (and ``adamw_betas``) from a config sequence: the same step."""
    params = [torch.randn(8, 6, requires_grad=True), torch.randn(6, requires_grad=True)]
    twins = clone_params(params)
    coefficients = (3.4445, -4.775, 2.0315)
    ours = onepass.Muon(
        params,
        ns_coefficients=_ConfigList(coefficients),
        adamw_betas=_ConfigList((0.9, 0.95)),
        backend="reference",
    )
    expected = onepass.Muon(twins, ns_coefficients=coefficients, backend="reference")
    step_both(ours, expected, params, twins, range(1, 3))
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q)


def test_group_keys_the_optimizer_does_not_read_are_the_users(backend_name: str) -> None:
    """A key of one's own bookkeeping in a group is left alone, as torch.optim leaves it, even
    where another onepass optimizer reads that name (FAdam's ``clip`` and ``p``, Adam's
    ``betas``): an SGD group with them had been refused as holding no number."""
    params = make_params(F64)
    twins = clone_params(params)
    own = {"name": "head", "clip": None, "p": "head.weight", "betas": "n/a"}
    ours = onepass.SGD([{"params": params, **own}], lr=0.1, momentum=0.9, backend=backend_name)
    expected = torch.optim.SGD([{"params": twins, **own}], lr=0.1, momentum=0.9)
    step_both(ours, expected, params, twins, range(1, 4))
    assert_same_as_torch(ours, expected, params, twins)
    ours.add_param_group({"params": [torch.randn(3, requires_grad=True)], "clip": "x"})
    # What the optimizer reads is still checked.
    ours.param_groups[0]["momentum"] = None
    with pytest.raises(TypeError, match=r"param_groups\[0\]: momentum must be a number"):
        ours.step()


def test_a_state_dict_post_hook_may_return_another_dict(backend_name: str) -> None:
    """torch.optim returns what a state_dict post-hook returns, whatever its layout: onepass's
    own changes to the dict run before the user's hooks (they had run after and failed on a
    dict without "state")."""
    params = make_params(F64)
    ours = onepass.AdamW(params, backend=backend_name)
    set_grads(params, make_grads(params, 1))
    ours.step()
    ours.register_state_dict_post_hook(
        lambda optimizer, state_dict: {"groups": state_dict["param_groups"]}
    )
    saved = ours.state_dict()
    assert list(saved) == ["groups"] and saved["groups"][0]["lr"] == 1e-3


def test_a_users_own_state_keys_survive_a_load(backend_name: str) -> None:
    """A key a training loop keeps in ``optimizer.state[p]`` (an EMA of the param) is saved, and
    the optimizer's own state_dict loads back with it, cast to the param's dtype as torch.optim
    casts it (onepass had refused it as not an AdamW slot). Another algorithm's slot is still
    refused."""
    params = make_params(torch.bfloat16)
    twins = clone_params(params)
    ours = onepass.AdamW(params, lr=1e-2, backend=backend_name)
    expected = torch.optim.AdamW(twins, lr=1e-2)
    step_both(ours, expected, params, twins, range(1, 3))
    for optimizer, p in ((ours, params[0]), (expected, twins[0])):
        optimizer.state[p]["ema"] = p.detach().float() * 0.5
        optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    ema, their_ema = ours.state[params[0]]["ema"], expected.state[twins[0]]["ema"]
    assert ema.dtype == their_ema.dtype == torch.bfloat16 and torch.equal(ema, their_ema)
    step_both(ours, expected, params, twins, range(3, 5))
    assert torch.equal(ours.state[params[0]]["ema"], ema)
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, atol=1e-2, rtol=1e-2)
    foreign = copy.deepcopy(ours.state_dict())
    foreign["state"][1]["momentum_buffer"] = torch.zeros_like(params[1])
    with pytest.raises(ValueError, match=r"'momentum_buffer' of .* is another algorithm's, not a"):
        ours.load_state_dict(foreign)


def test_adamw_refuses_adams_decoupled_weight_decay() -> None:
    """torch.optim.AdamW takes no ``decoupled_weight_decay`` (Adam's keyword): neither does
    onepass.AdamW (it had taken ``False`` and decoupled the decay anyway)."""
    p = torch.randn(3, requires_grad=True)
    for cls in (torch.optim.AdamW, onepass.AdamW):
        with pytest.raises(TypeError, match="unexpected keyword argument 'decoupled_weight_decay'"):
            cls([p], decoupled_weight_decay=False)


def test_a_model_cast_after_steps(backend_name: str) -> None:
    """``model.to(torch.bfloat16)`` after fp32 steps: onepass casts the state with the params
    (README), torch.optim keeps its fp32 momentum; with ``state_dtype=torch.float32`` onepass
    keeps it too and steps as torch.optim does."""
    results = {}
    for name, make in (
        ("torch", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
        ("cast", lambda ps: onepass.SGD(ps, lr=0.1, momentum=0.9, backend=backend_name)),
        (
            "fp32",
            lambda ps: onepass.SGD(
                ps, lr=0.1, momentum=0.9, state_dtype=torch.float32, backend=backend_name
            ),
        ),
    ):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        optimizer = make(list(model.parameters()))
        model(torch.randn(2, 8)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        model.to(torch.bfloat16)
        for s in range(3):
            x = torch.randn(2, 8, generator=torch.Generator().manual_seed(s)).bfloat16()
            model(x).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        buffer = optimizer.state[model.weight]["momentum_buffer"]
        results[name] = (buffer.dtype, model.weight.detach().clone())
    assert results["torch"][0] == results["fp32"][0] == torch.float32
    assert results["cast"][0] == torch.bfloat16
    assert torch.equal(results["fp32"][1], results["torch"][1])


def test_muon_with_amsgrad_in_its_adamw_group_reloads_its_checkpoint() -> None:
    """A Muon AdamW group with amsgrad keeps max_exp_avg_sq, a slot of the AdamW spec stepping
    it: its own checkpoint loads back (it had been refused as another algorithm's slot)."""
    params = [torch.randn(6, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    optimizer = onepass.Muon(params, backend="reference", ns_dtype=torch.float32)
    adamw = next(g for g in optimizer.param_groups if not g["use_muon"])
    adamw["amsgrad"] = True
    for s in range(1, 3):
        set_grads(params, make_grads(params, s, none_pattern=False))
        optimizer.step()
    assert "max_exp_avg_sq" in optimizer.state[params[1]]
    saved = copy.deepcopy(optimizer.state_dict())
    optimizer.load_state_dict(saved)
    assert torch.equal(
        optimizer.state[params[1]]["max_exp_avg_sq"], saved["state"][1]["max_exp_avg_sq"]
    )
