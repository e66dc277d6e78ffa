"""capturable=True keeps a group's lr, betas, eps and weight decay in a device block
(onepass._capturable): the layout each native op reads, the group's entries as views of it, and
values assigned anew. The block only reaches kernels on CUDA (tests/test_gpu.py replays a
captured step while the values change); its bookkeeping is device-independent and is checked
here on CPU tensors."""

from __future__ import annotations

import types
from copy import deepcopy

import pytest
import torch

import onepass
import onepass._capturable
from onepass._capturable import DeviceHyper, host_floats, is_block_view
from onepass.algorithms.adam import ADAM
from onepass.algorithms.base import DEVICE_BLOCK, l2_decays
from onepass.algorithms.fadam import FADAM
from onepass.algorithms.lion import LION
from onepass.algorithms.muon import MUON_MATRICES
from onepass.algorithms.novograd import NOVOGRAD
from onepass.algorithms.sgd import SGD_SPEC

from helpers import EVERY_OPTIMIZER, needs_native

# The op that reads each spec's block (Muon's matrices: its final pass is an SGD launch).
BLOCK_OPS = {
    "adam": ADAM,
    "sgd": SGD_SPEC,
    "lion": LION,
    "novograd": NOVOGRAD,
    "fadam": FADAM,
}


def _block_size(spec) -> int:
    values = sum(2 if key == "betas" else 1 for key in spec.device_hyper)
    return values + int(spec.decay_in_block)


@needs_native
def test_block_layouts_match_the_kernels() -> None:
    """Python lays out as many values as csrc/include/onepass/device_hyper.h reads."""
    fields = onepass._C.device_block_fields()
    assert set(fields) == set(BLOCK_OPS)
    for op, spec in BLOCK_OPS.items():
        assert _block_size(spec) == fields[op], op
        assert spec.device_hyper[0] == "lr"
    assert _block_size(MUON_MATRICES) == fields["sgd"]


def _group(make, shape: tuple[int, ...] = (3,), **overrides) -> dict:
    """A param group as the optimizer class makes it (CPU params: the block's bookkeeping does
    not depend on the device)."""
    group = dict(make([torch.zeros(shape, requires_grad=True)]).param_groups[0])
    group.update(overrides)
    return group


def _adamw_group(**overrides) -> dict:
    make = lambda ps: onepass.AdamW(ps, lr=1e-3, weight_decay=0.01)  # noqa: E731
    return _group(make, **overrides)


def test_group_entries_become_views_of_the_block() -> None:
    group = _adamw_group()
    hyper = DeviceHyper(ADAM, group, torch.device("cpu"))
    assert hyper.block.dtype == torch.float64
    assert hyper.block.tolist() == pytest.approx([1e-3, 0.9, 0.999, 1e-8, 0.01, 1.0])
    # In-place changes (a scheduler's) reach the block, with nothing to do at the next step.
    group["lr"].fill_(5e-4)
    group["betas"][0].fill_(0.8)
    group["weight_decay"].fill_(0.05)
    launch = hyper.launch_group(group)
    assert hyper.block.tolist() == pytest.approx([5e-4, 0.8, 0.999, 1e-8, 0.05, 1.0])
    assert launch["lr"] is hyper.block and launch[DEVICE_BLOCK]
    # The launch's other values are host floats (no device read), the group keeps its views.
    assert isinstance(launch["eps"], float) and isinstance(launch["betas"][1], float)
    assert group["lr"].data_ptr() == hyper.block.data_ptr()
    assert is_block_view(group["betas"][0]) and is_block_view(group["weight_decay"])
    assert host_floats(group["betas"]) == pytest.approx((0.8, 0.999))
    assert host_floats(group["weight_decay"]) == pytest.approx(0.05)


def test_the_users_device_tensors_are_copied_in_every_step() -> None:
    """An lr tensor on the params' device stays the user's: each step copies it into the block
    (on the device, so that a captured graph replays the copy)."""
    lr = torch.tensor(2e-3)
    group = _adamw_group(lr=lr)
    hyper = DeviceHyper(ADAM, group, torch.device("cpu"))
    assert group["lr"] is lr and not is_block_view(lr)
    lr.fill_(7e-4)
    hyper.launch_group(group)
    assert hyper.block[0].item() == pytest.approx(7e-4)
    assert host_floats(group["lr"]) is lr  # the user's own: saved as it is


def test_values_assigned_anew_are_checked_and_written() -> None:
    group = _adamw_group()
    hyper = DeviceHyper(ADAM, group, torch.device("cpu"))
    group["eps"] = 1e-6
    group["betas"] = (0.95, group["betas"][1])  # as OneCycleLR cycles beta1
    hyper.launch_group(group)
    assert hyper.block.tolist() == pytest.approx([1e-3, 0.95, 0.999, 1e-6, 0.01, 1.0])
    assert is_block_view(group["eps"]) and is_block_view(group["betas"][0])
    before = hyper.block.clone()
    group["betas"] = (1.5, 0.99)
    with pytest.raises(ValueError, match="beta parameter at index 0"):
        hyper.launch_group(group)
    assert torch.equal(hyper.block, before)  # a refused value writes nothing
    group["betas"] = (0.9, 0.999)
    hyper.launch_group(group)
    assert hyper.block[1].item() == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("decay", "scale"), [("decoupled", 1.0), ("independent", 1.0 / 4e-3), ("l2", 0.0)]
)
def test_decay_scale_follows_the_decay_mode(decay: str, scale: float) -> None:
    """decay_coefficient = weight_decay * the block's last value, which follows a mode change."""
    group = _adamw_group(initial_lr=4e-3)
    hyper = DeviceHyper(ADAM, group, torch.device("cpu"))
    group["decay"] = decay
    hyper.launch_group(group)
    assert hyper.block[-1].item() == pytest.approx(scale)


def test_l2_decay_stays_on_when_the_weight_decay_is_on_the_device() -> None:
    """Under L2 decay a zero weight decay skips the L2 term, unless it lives on the device,
    where it may change without the host seeing it."""
    group = _adamw_group(decay="l2", decoupled_weight_decay=False, weight_decay=0.0)
    assert not l2_decays(group, 0.0)
    hyper = DeviceHyper(ADAM, group, torch.device("cpu"))
    assert l2_decays(hyper.launch_group(group), 0.0)


def test_sgd_and_muon_blocks_hold_lr_and_weight_decay() -> None:
    make_sgd = lambda ps: onepass.SGDW(ps, lr=0.1, momentum=0.9, weight_decay=0.02)  # noqa: E731
    group = _group(make_sgd, decay="independent", initial_lr=0.2)
    hyper = DeviceHyper(SGD_SPEC, group, torch.device("cpu"))
    assert hyper.block.tolist() == pytest.approx([0.1, 0.02, 5.0])
    assert isinstance(group["momentum"], float)  # structural: stays on the host
    muon = _group(lambda ps: onepass.Muon(ps, lr=0.02, weight_decay=0.1), shape=(4, 3))
    assert muon["use_muon"]
    hyper = DeviceHyper(MUON_MATRICES, muon, torch.device("cpu"))
    assert hyper.block.tolist() == pytest.approx([0.02, 0.1, 1.0])


def test_capturable_refuses_cpu_params() -> None:
    params = [torch.zeros(3, requires_grad=True)]
    params[0].grad = torch.ones(3)
    optimizer = onepass.AdamW(params, capturable=True, backend="cpu")
    with pytest.raises(RuntimeError, match="capturable=True needs CUDA params"):
        optimizer.step()
    assert torch.equal(params[0], torch.zeros(3))


def test_block_views_leave_the_group_as_floats() -> None:
    """state_dict saves a capturable group's views as floats (also from a deepcopy, before its
    first step), and a plan built without capturable turns leftover views back into floats."""
    params = [torch.zeros(3, requires_grad=True)]
    params[0].grad = torch.ones(3)
    optimizer = onepass.AdamW(params, lr=1e-3)
    group = optimizer.param_groups[0]
    DeviceHyper(ADAM, group, torch.device("cpu"))  # the views a capturable plan installs
    for copy in (optimizer, deepcopy(optimizer)):
        saved = copy.state_dict()["param_groups"][0]
        assert isinstance(saved["lr"], float) and isinstance(saved["weight_decay"], float)
        assert saved["betas"] == pytest.approx((0.9, 0.999))
        assert all(isinstance(b, float) for b in saved["betas"])
    assert is_block_view(group["lr"])  # the live group keeps its views
    optimizer.step()
    assert isinstance(group["lr"], float) and isinstance(group["betas"][0], float)
    assert params[0][0].item() == pytest.approx(-1e-3, rel=1e-3)


def test_views_keep_their_identity_and_aliases_read_as_they_were() -> None:
    group = _adamw_group()
    hyper = DeviceHyper(ADAM, group, torch.device("cpu"))
    lr, beta1, beta2 = group["lr"], *group["betas"]
    group["eps"] = 1e-6
    hyper.launch_group(group)
    assert group["lr"] is lr and group["betas"][0] is beta1  # untouched entries keep their views
    group["betas"] = (beta2, beta1)  # each reads the value it had: a swap, not (0.999, 0.999)
    hyper.launch_group(group)
    assert hyper.block[1:3].tolist() == pytest.approx([0.999, 0.9])


def test_another_blocks_view_is_linked() -> None:
    """A view of another group's block (an lr tied across optimizers) is the user's tensor:
    copied at every step, so the tie holds."""
    first = _adamw_group()
    DeviceHyper(ADAM, first, torch.device("cpu"))
    second = _adamw_group(lr=first["lr"])
    hyper = DeviceHyper(ADAM, second, torch.device("cpu"))
    assert second["lr"] is first["lr"]
    first["lr"].fill_(3e-4)
    hyper.launch_group(second)
    assert hyper.block[0].item() == pytest.approx(3e-4)


def test_a_captured_link_cannot_be_replaced() -> None:
    """A captured graph copies each linked tensor at every replay: replacing one afterwards
    would be overwritten (or read freed memory), so it is refused, and nothing is written."""
    lr = torch.tensor(2e-3)
    group = _adamw_group(lr=lr)
    hyper = DeviceHyper(ADAM, group, torch.device("cpu"))
    hyper.captured = True  # as launch_group marks it under a CUDA graph capture
    group["lr"] = 1e-3
    before = hyper.block.clone()
    with pytest.raises(RuntimeError, match="capture again"):
        hyper.launch_group(group)
    assert torch.equal(hyper.block, before)
    group["lr"] = lr
    group["eps"] = 1e-7  # a view's value may still change
    hyper.launch_group(group)
    assert hyper.block[3].item() == pytest.approx(1e-7)


@pytest.mark.parametrize("name", list(EVERY_OPTIMIZER))
def test_capture_without_capturable_is_refused_where_torch_refuses_it(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Adam and AdamW refuse a captured step of a group without capturable, as torch.optim's do
    (the launches read its lr and betas on the host: replays would keep the values of the
    capture); the refusal names the group and changes nothing. The others are captured with
    their lr as it is, as torch.optim.SGD is. The GPU is stood in for: its stream reports a
    capture under way."""
    params = [torch.randn(4, 3).requires_grad_(), torch.randn(5).requires_grad_()]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = EVERY_OPTIMIZER[name](params[:1])
    optimizer.add_param_group({"params": params[1:]})
    optimizer.step()  # buckets and state built before the capture, as the recipe does
    before = [p.detach().clone() for p in params]
    state = deepcopy(optimizer.state_dict()["state"])
    gpu = types.SimpleNamespace(is_available=lambda: True, is_current_stream_capturing=lambda: True)
    monkeypatch.setattr(
        onepass._capturable, "torch", types.SimpleNamespace(**{**vars(torch), "cuda": gpu})
    )
    if name not in ("Adam", "AdamW"):
        optimizer.step()
        assert not torch.equal(params[0], before[0])
        return
    with pytest.raises(RuntimeError, match=rf"{name}.step\(\), but param_groups\[0\] has"):
        optimizer.step()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)
    torch.testing.assert_close(optimizer.state_dict()["state"], state, rtol=0, atol=0)
    monkeypatch.undo()
    optimizer.step()  # not capturing: steps
    assert not torch.equal(params[0], before[0])
