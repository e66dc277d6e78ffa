"""torch.distributed.checkpoint (DCP): the state_dict API and dcp.save / dcp.load, in one process.

DCP is how FSDP2 and torchtitan checkpoint an optimizer: `get_optimizer_state_dict` keys the state
by the params' names (flattened to one level with `flatten_optimizer_state_dict`, torchtitan's
setting) and first runs a step with zero grads at lr 0 on an optimizer without state, and
`set_optimizer_state_dict` maps the names back before `load_state_dict`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from test_reference_vs_torch import assert_same_as_torch

import onepass

from helpers import TRITON_INTERPRETED, bitwise_equal

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

F64 = torch.float64
Make = Callable[[Sequence[torch.nn.Parameter], str], torch.optim.Optimizer]


class Net(torch.nn.Module):
    """Matrices (Muon's), vectors, an odd size and a frozen param."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(7, 13, dtype=F64)
        self.out = torch.nn.Linear(13, 5, dtype=F64)
        self.frozen = torch.nn.Parameter(torch.randn(3, dtype=F64), requires_grad=False)


def _nets() -> tuple[Net, Net]:
    first = Net()
    second = Net()
    second.load_state_dict(first.state_dict())
    return first, second


def _set_grads(net: Net, step: int) -> None:
    """The same grads for every net at a step; out.bias has none at step 2."""
    generator = torch.Generator().manual_seed(step)
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        missing = name == "out.bias" and step == 2
        p.grad = None if missing else torch.randn(p.shape, dtype=F64, generator=generator)


def _train(optimizer: torch.optim.Optimizer, net: Net, steps: range) -> None:
    for s in steps:
        _set_grads(net, s)
        optimizer.step()


def _save(net: Net, optimizer: torch.optim.Optimizer, path: Path, flat: bool) -> None:
    options = StateDictOptions(flatten_optimizer_state_dict=flat)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(
            {"optim": get_optimizer_state_dict(net, optimizer, options=options)}, checkpoint_id=path
        )


def _load(
    net: Net, optimizer: torch.optim.Optimizer, path: Path, flat: bool, partial: bool = False
) -> None:
    """As a trainer resumes: the target's own state_dict, filled from the checkpoint."""
    options = StateDictOptions(flatten_optimizer_state_dict=flat)
    state = {"optim": get_optimizer_state_dict(net, optimizer, options=options)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=partial))
    set_optimizer_state_dict(net, optimizer, optim_state_dict=state["optim"], options=options)


ONEPASS: dict[str, Make] = {
    "AdamW-amsgrad": lambda ps, b: onepass.AdamW(ps, lr=1e-2, amsgrad=True, backend=b),
    # lr / initial_lr scales the decay: DCP's step at lr 0 must not become the initial lr
    "AdamW-independent": lambda ps, b: onepass.AdamW(
        ps, lr=1e-2, weight_decay=0.1, decay="independent", backend=b
    ),
    # params moved into one flat buffer at the first step: DCP's own lazy step builds it
    "AdamW-flatten": lambda ps, b: onepass.AdamW(ps, lr=1e-2, flatten=True, backend=b),
    "Adam": lambda ps, b: onepass.Adam(ps, lr=1e-2, weight_decay=0.1, backend=b),
    "SGD-momentum": lambda ps, b: onepass.SGD(ps, lr=0.1, momentum=0.9, backend=b),
    "SGDW": lambda ps, b: onepass.SGDW(ps, lr=0.1, momentum=0.9, weight_decay=0.1, backend=b),
    "Lion": lambda ps, b: onepass.Lion(ps, lr=1e-3, weight_decay=0.1, backend=b),
    "NovoGrad": lambda ps, b: onepass.NovoGrad(ps, lr=1e-2, weight_decay=0.1, backend=b),
    "FAdam": lambda ps, b: onepass.FAdam(ps, lr=1e-2, backend=b),
    "Muon": lambda ps, b: onepass.Muon(ps, lr=1e-2, backend=b),
}


@pytest.mark.parametrize("flat", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("name", list(ONEPASS))
def test_dcp_round_trip_continues_exactly(
    name: str, flat: bool, backend_name: str, tmp_path: Path
) -> None:
    """DCP's first state_dict (its lazy init step) leaves the params as they were; saved after 3
    steps and loaded into a new optimizer, 4 more steps give the params and state of continuing
    in the original, bit for bit."""
    make = ONEPASS[name]
    net, resumed_net = _nets()
    optimizer = make(list(net.parameters()), backend_name)
    before = [p.detach().clone() for p in net.parameters()]
    get_optimizer_state_dict(net, optimizer)  # steps at lr 0 with zero grads
    assert all(bitwise_equal(p, q) for p, q in zip(net.parameters(), before, strict=True))
    assert all(p.grad is None for p in net.parameters())
    _train(optimizer, net, range(1, 4))
    _save(net, optimizer, tmp_path, flat)
    resumed_net.load_state_dict(net.state_dict())
    resumed = make(list(resumed_net.parameters()), backend_name)
    _load(resumed_net, resumed, tmp_path, flat)
    _train(optimizer, net, range(4, 8))
    _train(resumed, resumed_net, range(4, 8))
    for (label, p), q in zip(net.named_parameters(), resumed_net.parameters(), strict=True):
        assert bitwise_equal(p, q), label
        theirs, ours = optimizer.state.get(p, {}), resumed.state.get(q, {})
        assert set(ours) == set(theirs), label
        for key, value in theirs.items():
            assert bitwise_equal(torch.as_tensor(ours[key]), torch.as_tensor(value)), (label, key)


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="Triton on CPU tensors runs interpreted")
@pytest.mark.parametrize("name", ["AdamW-amsgrad", "SGD-momentum", "NovoGrad"])
def test_dcp_round_trip_on_triton(name: str, tmp_path: Path) -> None:
    """The same on the Triton backend, whose step counts live in the backend's own buffer."""
    test_dcp_round_trip_continues_exactly(name, True, "triton", tmp_path)


INTERCHANGE: list[Any] = [
    pytest.param(torch.optim.AdamW, onepass.AdamW, {"lr": 1e-2, "weight_decay": 0.1}, id="AdamW"),
    pytest.param(torch.optim.Adam, onepass.Adam, {"lr": 1e-2, "amsgrad": True}, id="Adam"),
    pytest.param(torch.optim.SGD, onepass.SGD, {"lr": 0.1, "momentum": 0.9}, id="SGD"),
]


@pytest.mark.parametrize("flat", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("direction", ["onepass-to-torch", "torch-to-onepass"])
@pytest.mark.parametrize(("torch_cls", "onepass_cls", "config"), INTERCHANGE)
def test_dcp_interchange_with_torch_optim(
    torch_cls: type[torch.optim.Optimizer],
    onepass_cls: type[onepass.FusedOptimizer],
    config: dict[str, Any],
    direction: str,
    flat: bool,
    backend_name: str,
    tmp_path: Path,
) -> None:
    """A DCP checkpoint of one loads into the other and continues as the original does.
    torch.optim's checkpoint lacks onepass's own group keys (backend, decay, ...): loading it
    takes allow_partial_load, and those keys keep the values onepass's constructor gave."""

    def build(kind: str, net: Net) -> torch.optim.Optimizer:
        if kind == "onepass":
            return onepass_cls(list(net.parameters()), **config, backend=backend_name)
        return torch_cls(list(net.parameters()), **config)

    source_kind, target_kind = direction.split("-to-")
    net, resumed_net = _nets()
    source = build(source_kind, net)
    _train(source, net, range(1, 4))
    _save(net, source, tmp_path, flat)
    resumed_net.load_state_dict(net.state_dict())
    target = build(target_kind, resumed_net)
    _load(resumed_net, target, tmp_path, flat, partial=target_kind == "onepass")
    if target_kind == "onepass":
        assert target.param_groups[0]["backend"] == backend_name
    _train(source, net, range(4, 8))
    _train(target, resumed_net, range(4, 8))
    assert_same_as_torch(target, source, list(resumed_net.parameters()), list(net.parameters()))


def test_dcp_strict_load_of_a_torch_optim_checkpoint_names_the_missing_key(
    tmp_path: Path,
) -> None:
    """DCP's default planner refuses a checkpoint without a key the target's state_dict has:
    torch.optim's checkpoints have no 'backend' or 'decay' (the README says to load them with
    allow_partial_load)."""
    net, resumed_net = _nets()
    source = torch.optim.AdamW(list(net.parameters()), lr=1e-2)
    _train(source, net, range(1, 3))
    _save(net, source, tmp_path, flat=True)
    target = onepass.AdamW(list(resumed_net.parameters()), lr=1e-2)
    with pytest.raises(BaseException, match="Missing key") as failure:  # CheckpointException
        _load(resumed_net, target, tmp_path, flat=True)
    assert "param_groups" in str(failure.value)
