"""torch.amp.GradScaler drives onepass like torch.optim.AdamW (issue item 4).

onepass sets ``_step_supports_amp_scaling``: GradScaler hands it ``grad_scale`` / ``found_inf``
and the step unscales in-kernel and skips itself when found_inf is set. The peer is
torch.optim.AdamW (fused, which takes the same path, and the default for-loop, which GradScaler
unscales and skips from outside) driven by its own scaler through the same losses.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_reference_vs_torch import assert_same_as_torch

import onepass

from helpers import Snapshot, all_params, assert_unchanged, snapshot

FP32_TOL = (1.3e-6, 1e-5)
STEPS = 7


class Run:
    """A small multi-tensor fp32 model, its optimizer and its GradScaler."""

    def __init__(self, make_optimizer: Callable[[list[Any]], Any], init_scale: float) -> None:
        gen = torch.Generator().manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)
        )
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        self.x = torch.randn(16, 4, generator=gen)
        self.y = torch.randn(16, 3, generator=gen)
        self.params = list(self.model.parameters())
        self.optimizer = make_optimizer(self.params)
        # growth_interval=2: the scale changes during the run, so every step's grad_scale matters
        self.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)

    def backward(self, step: int, poison: dict[int, float]) -> None:
        self.optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(self.model(self.x), self.y)
        self.scaler.scale(loss * (1 + step / 10)).backward()
        if step in poison:  # an inf or nan in one element of one grad of a multi-tensor model
            grad = self.params[2].grad
            assert grad is not None
            grad[1, 2] = poison[step]

    def step(self, unscale_first: bool) -> None:
        if unscale_first:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, max_norm=1e3)  # the usual reason
        self.scaler.step(self.optimizer)
        self.scaler.update()


class _UnscaledOutsideLion(onepass.Lion):
    """Lion's peer (torch.optim has none): the reference backend, with the GradScaler unscaling
    the grads and skipping the step from outside, as it does for torch's for-loop optimizers."""

    _step_supports_amp_scaling = False

    def __init__(self, params: Any, fused: bool = False, **kwargs: Any) -> None:
        super().__init__(params, backend="reference", **kwargs)  # `fused` means nothing here


class _UnscaledOutsideNovoGrad(onepass.NovoGrad):
    """NovoGrad's peer, as Lion's: the reference backend unscaled from outside."""

    _step_supports_amp_scaling = False

    def __init__(self, params: Any, fused: bool = False, **kwargs: Any) -> None:
        super().__init__(params, backend="reference", **kwargs)


class _UnscaledOutsideFAdam(onepass.FAdam):
    """FAdam's peer, as Lion's: the reference backend unscaled from outside."""

    _step_supports_amp_scaling = False

    def __init__(self, params: Any, fused: bool = False, **kwargs: Any) -> None:
        super().__init__(params, backend="reference", **kwargs)


class _UnscaledOutsideSGDW(onepass.SGDW):
    """SGDW's peer, as Lion's: the reference backend unscaled from outside."""

    _step_supports_amp_scaling = False

    def __init__(self, params: Any, fused: bool = False, **kwargs: Any) -> None:
        super().__init__(params, backend="reference", **kwargs)


ADAMW = {"lr": 1e-2, "amsgrad": True}
ADAM = {"lr": 1e-2, "weight_decay": 0.1}  # L2: the decay is added to the (scaled) grad
SGD = {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}
SGDW = {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1}  # decoupled
LION = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1}
NOVOGRAD = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True, "grad_averaging": True}
FADAM = {"lr": 1e-2, "weight_decay": 0.1, "clip": 0.5}
#: (onepass class, torch class or the reference peer, kwargs) by name
OPTIMIZERS: dict[str, tuple[type[onepass.FusedOptimizer], Any, dict[str, Any]]] = {
    "AdamW": (onepass.AdamW, torch.optim.AdamW, ADAMW),
    "Adam": (onepass.Adam, torch.optim.Adam, ADAM),
    "SGD": (onepass.SGD, torch.optim.SGD, SGD),
    "SGDW": (onepass.SGDW, _UnscaledOutsideSGDW, SGDW),
    "Lion": (onepass.Lion, _UnscaledOutsideLion, LION),
    "NovoGrad": (onepass.NovoGrad, _UnscaledOutsideNovoGrad, NOVOGRAD),
    "FAdam": (onepass.FAdam, _UnscaledOutsideFAdam, FADAM),
}
POISONS: dict[str, dict[int, float]] = {
    "finite": {},
    "inf-at-3": {3: float("inf")},
    "nan-at-0-inf-at-4": {0: float("nan"), 4: float("-inf")},
}


def _peers() -> list[Any]:
    """(name, fused, poison) for each optimizer: torch's class fused and for-loop (GradScaler
    unscales and skips the for-loop one from outside); a reference peer takes no ``fused``
    (one run). Left out: torch's fused SGD with a skipped first step, which creates its
    momentum buffers with empty_like and keeps them when found_inf skips that step
    (uninitialised memory from then on; onepass, like torch's for-loop SGD, starts them at the
    first step actually taken)."""
    cases = []
    for name, (_, peer, _) in OPTIMIZERS.items():
        is_torch = peer.__module__.startswith("torch.")
        for fused in (True, False) if is_torch else (False,):
            for poison_id, poison in POISONS.items():
                if name == "SGD" and fused and 0 in poison:
                    continue
                kind = ("torch-fused" if fused else "torch-default") if is_torch else "reference"
                cases.append(pytest.param(name, fused, poison, id=f"{name}-{kind}-{poison_id}"))
    return cases


@pytest.mark.parametrize("init_scale", [2.0**12, 1000.0])
@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale-then-step"])
@pytest.mark.parametrize(("name", "fused", "poison"), _peers())
def test_grad_scaler_matches_torch(
    backend_name: str,
    name: str,
    fused: bool,
    poison: dict[int, float],
    unscale_first: bool,
    init_scale: float,
) -> None:
    """GradScaler through 7 steps against torch.optim's class (a reference peer where torch has
    none): each skipped step (inf or nan in a grad) leaves every param and state tensor as it
    was and advances no step count; the scales agree at every step and the params and state at
    the end, so the run continues after a skip as torch's does."""
    ours_cls, torch_cls, kwargs = OPTIMIZERS[name]
    ours = Run(lambda ps: ours_cls(ps, **kwargs, backend=backend_name), init_scale)
    theirs = Run(lambda ps: torch_cls(ps, **kwargs, fused=fused), init_scale)
    scales = set()
    for s in range(STEPS):
        ours.backward(s, poison)
        theirs.backward(s, poison)
        before: Snapshot = snapshot(ours.optimizer)
        ours.step(unscale_first)
        theirs.step(unscale_first)
        if s in poison:
            # skipped: nothing moved, no step advanced (and no state appeared on a first step
            # other than torch's own: zero moments at step 0)
            params_and_state_untouched(ours.optimizer, before, first_step=s == 0)
        assert ours.scaler.get_scale() == theirs.scaler.get_scale()
        scales.add(ours.scaler.get_scale())
    assert len(scales) > 1  # the scale moved during the run
    assert_same_as_torch(ours.optimizer, theirs.optimizer, ours.params, theirs.params, *FP32_TOL)
    for p in ours.params:  # the step counts, where the algorithm keeps one
        if "step" in ours.optimizer.state[p]:
            assert float(ours.optimizer.state[p]["step"]) == STEPS - len(poison)


def params_and_state_untouched(
    optimizer: torch.optim.Optimizer, before: Snapshot, first_step: bool
) -> None:
    if not first_step:
        assert_unchanged(optimizer, before)
        return
    for p, old in zip(all_params(optimizer), before.params, strict=True):
        assert torch.equal(p, old)
        entry = optimizer.state.get(p, {})
        assert float(entry.get("step", 0.0)) == 0.0
        for key, value in entry.items():
            assert key == "step" or torch.count_nonzero(value) == 0


def test_found_inf_skips_every_bucket_and_group(backend_name: str) -> None:
    """An inf in one grad skips the whole step: two groups, three dtypes (several buckets)."""
    torch.manual_seed(0)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    params = [torch.randn(33).to(dt).requires_grad_() for dt in dtypes for _ in range(2)]
    optimizer = onepass.AdamW(
        [{"params": params[:3]}, {"params": params[3:], "lr": 0.1}],
        lr=1e-2,
        amsgrad=True,
        backend=backend_name,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)

    def backward(poison: bool) -> None:
        optimizer.zero_grad()
        loss = sum((p.float() ** 2).sum() for p in params)
        assert isinstance(loss, torch.Tensor)
        scaler.scale(loss).backward()
        if poison:
            grad = params[4].grad
            assert grad is not None
            grad[7] = float("inf")

    for _ in range(3):
        backward(poison=False)
        scaler.step(optimizer)
        scaler.update()
    before = snapshot(optimizer)
    backward(poison=True)
    scaler.step(optimizer)
    assert_unchanged(optimizer, before)
    scaler.update()
    assert scaler.get_scale() == 128.0
    backward(poison=False)
    scaler.step(optimizer)
    for p in params:
        assert float(optimizer.state[p]["step"]) == 4.0


@pytest.mark.parametrize("how", ["state_dict", "deepcopy"])
def test_a_skipped_first_step_saves_no_state(how: str, backend_name: str) -> None:
    """SGD keeps no step count: a momentum buffer means a param has stepped. A first step that
    the GradScaler skipped has created the (zero) buffer, so it is saved without state, as
    torch.optim.SGD has none; a resumed run starts the buffer from the grad, not damps a zero
    one (dampening > 0 tells them apart)."""
    torch.manual_seed(0)
    start = torch.randn(2, 9, dtype=torch.float64)
    grads = torch.randn(2, 9, dtype=torch.float64)
    kwargs: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}
    results = []
    for cls in (onepass.SGD, torch.optim.SGD):
        params = [p.clone().requires_grad_() for p in start]
        optimizer: torch.optim.Optimizer = (
            onepass.SGD(params, **kwargs, backend=backend_name)
            if cls is onepass.SGD
            else torch.optim.SGD(params, **kwargs)
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        scaler.scale(torch.ones(()))  # (the scaler's scale is made at the first scale())
        for p, g in zip(params, grads, strict=True):
            p.grad = g * 4.0
        params[1].grad[0] = float("inf")  # type: ignore[index]
        scaler.step(optimizer)
        scaler.update()
        if how == "state_dict":
            saved = optimizer.state_dict()
            assert saved["state"] == {}
            optimizer = cls(params, **kwargs)
            optimizer.load_state_dict(saved)
        else:
            params, optimizer = copy.deepcopy((params, optimizer))
        for p, g in zip(params, grads, strict=True):
            p.grad = g * 2.0  # the scale after a skipped step
        scaler.step(optimizer)
        results.append([p.detach() for p in params])
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
