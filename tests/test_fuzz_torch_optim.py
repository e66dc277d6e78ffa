"""Seeded differential fuzz of the drop-in promise: onepass.AdamW / Adam / SGD against
torch.optim.AdamW / Adam / SGD under the same random sequence of user operations (the engine:
tests/fuzz.py).

Each case builds two identical sets of float64 params (odd shapes, a 0-d and a 1-element tensor,
a zero-size one, a non-contiguous one, a frozen one that never gets a grad), one optimizer of
each library with the same random hyperparameters (sometimes two param groups), and applies
~25 random operations to both: grads (some None) and steps, steps on the grads already there,
zero_grad, hyperparameter changes between steps, an LR scheduler, add_param_group, and
state_dict round trips (same library) and cross-loads (each side continues in the other
library from its own state_dict). Params are compared after every operation; state (torch's
slot names) and the state_dicts after every state_dict operation and at the end. Seeds run the
CPU backend (each SIMD build in turn), the reference backend, and the CPU backend with
flatten=True. A failure names the case and lists the operations so far.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest
import torch

import onepass

from fuzz import F64, Fuzz, case_backend, ignore_scheduler_order, run_fuzz

#: Same math in float64 on both sides; only operation order differs (~1 ulp a step). Not
#: loosened: the worst comparison of the seeds below uses 5% of it. An element where Adam's L2
#: term cancels the grad to ~eps (g + wd*p ~ 1e-7) amplifies that order difference (torch's
#: add(alpha=wd) rounds once, with FMA; onepass twice) to ~1e-14: about one run in 600 of a
#: wider seed sweep, on the reference backend, and not on these seeds.
RTOL, ATOL = 1e-12, 1e-14

PAIRS: dict[str, tuple[type[torch.optim.Optimizer], type[torch.optim.Optimizer]]] = {
    "AdamW": (onepass.AdamW, torch.optim.AdamW),
    "Adam": (onepass.Adam, torch.optim.Adam),
    "SGD": (onepass.SGD, torch.optim.SGD),
}
#: Group keys both libraries keep with the same meaning (compared in the state_dicts).
SHARED_KEYS = (
    "lr",
    "initial_lr",
    "betas",
    "eps",
    "weight_decay",
    "amsgrad",
    "maximize",
    "momentum",
    "dampening",
    "nesterov",
)

CPU_SEEDS = range(20)  # the CPU backend, cycling through the SIMD builds this CPU runs
REFERENCE_SEEDS = range(6)
FLATTEN_SEEDS = range(100, 106)  # the CPU backend with flatten=True (same results, README)


# ------------------------------------------------------------------------------------------------
# Random draws
# ------------------------------------------------------------------------------------------------


def draw_hparams(kind: str, rng: random.Random) -> dict[str, Any]:
    """A full set of hyperparameters for a constructor or a param group (floats, no tensors)."""
    lr = 10 ** rng.uniform(-3, -0.7)
    weight_decay = rng.choice([0.0, rng.uniform(0.0, 0.3)])
    maximize = rng.random() < 0.3
    if kind == "SGD":
        momentum = rng.choice([0.0, rng.uniform(0.1, 0.95)])
        nesterov = momentum > 0 and rng.random() < 0.5
        dampening = 0.0 if nesterov else rng.choice([0.0, rng.uniform(0.0, 0.6)])
        return {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
        }
    return {
        "lr": lr,
        "betas": (rng.uniform(0.5, 0.95), rng.uniform(0.9, 0.9999)),
        "eps": 10 ** rng.uniform(-10, -6),
        "weight_decay": weight_decay,
        "amsgrad": rng.random() < 0.5,
        "maximize": maximize,
    }


def draw_shape(rng: random.Random) -> tuple[int, ...]:
    return rng.choice([(3, 5), (7,), (2, 3, 2), (1, 4), (11,), (4, 1, 3), (), (1,), (0, 3)])


def valid_nesterov(overrides: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Makes a nesterov SGD group (its own key or the default's) have a momentum and no
    dampening: torch.optim checks that on the defaults only, onepass on every group too
    (test_nesterov_checked_on_the_defaults_only)."""
    group = {**defaults, **overrides}
    if group["nesterov"]:
        overrides["momentum"] = max(group["momentum"], 0.1)
        overrides["dampening"] = 0.0


# ------------------------------------------------------------------------------------------------
# The two runs
# ------------------------------------------------------------------------------------------------


class TorchOptimFuzz(Fuzz):
    """Side A starts in onepass, side B in torch.optim; float64 params."""

    GEN_SEED = 1000

    def rng_key(self) -> str:
        return f"{self.kind}/{self.seed}/{self.backend}"

    def pair(self) -> tuple[str, str]:
        return "onepass", "torch"

    def build(self, lib: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        ours, theirs = PAIRS[self.kind]
        if lib == "onepass":
            return ours(groups, **self.ctor, backend=self.backend, flatten=self.flatten)
        return theirs(groups, **self.ctor)

    def tolerance(self) -> tuple[float, float]:
        return RTOL, ATOL

    def shared_keys(self) -> Sequence[str]:
        return SHARED_KEYS

    # -- random draws ---------------------------------------------------------------------------

    def draw_hparams(self) -> dict[str, Any]:
        return draw_hparams(self.kind, self.rng)

    def initial_shapes(self) -> list[tuple[int, ...]]:
        # 0-d, 1-element, zero-size, non-contiguous (4, 3), and one over a CPU chunk (2^15
        # elements).
        return [(3, 5), (), (1,), (0, 3), (2, 3, 2), (4, 3), (6,), (129, 257)]

    def new_shape(self) -> tuple[int, ...]:
        return draw_shape(self.rng)

    def mutable_keys(self, group: dict[str, Any]) -> Sequence[str]:
        if self.kind != "SGD":
            return ["lr", "weight_decay", "betas", "eps", "maximize"]
        keys = ["lr", "weight_decay", "momentum", "maximize"]
        if not group["nesterov"]:
            keys.append("dampening")
        return keys

    def draw_value(self, key: str, group: dict[str, Any]) -> Any:
        """Key by key (not from a whole draw_hparams): a nesterov group keeps a momentum."""
        rng = self.rng
        if key == "weight_decay":
            return rng.choice([0.0, rng.uniform(0.0, 0.3)])
        if key == "momentum":
            low = 0.1 if group["nesterov"] else 0.0  # nesterov needs a momentum
            return rng.choice([low, rng.uniform(0.1, 0.95)])
        if key == "dampening":
            return rng.uniform(0.0, 0.6)
        if key == "betas":
            return (rng.uniform(0.5, 0.95), rng.uniform(0.9, 0.9999))
        if key == "eps":
            return 10 ** rng.uniform(-10, -6)
        return super().draw_value(key, group)  # lr scaled, maximize flipped

    def draw_overrides(self, hp: dict[str, Any]) -> dict[str, Any]:
        if self.kind != "SGD":
            return super().draw_overrides(hp)
        # A group's own nesterov comes with its own momentum and dampening (see valid_group).
        keys = [k for k in hp if self.rng.random() < 0.5 and k != "nesterov"]
        if hp["nesterov"] and self.rng.random() < 0.5:
            keys += ["nesterov", "momentum", "dampening"]
        return {k: hp[k] for k in dict.fromkeys(keys)}

    def valid_group(self, overrides: dict[str, Any]) -> None:
        if self.kind == "SGD":
            valid_nesterov(overrides, self.ctor)


CASES = [
    *(
        pytest.param(kind, seed, "cpu", False, id=f"{kind}-{case_backend('cpu', seed)}-{seed}")
        for kind in PAIRS
        for seed in CPU_SEEDS
    ),
    *(
        pytest.param(kind, seed, "reference", False, id=f"{kind}-reference-{seed}")
        for kind in PAIRS
        for seed in REFERENCE_SEEDS
    ),
    *(
        pytest.param(
            kind, seed, "cpu", True, id=f"{kind}-{case_backend('cpu', seed)}-flatten-{seed}"
        )
        for kind in PAIRS
        for seed in FLATTEN_SEEDS
    ),
]


@ignore_scheduler_order
@pytest.mark.parametrize(("kind", "seed", "backend", "flatten"), CASES)
def test_fuzz_against_torch_optim(kind: str, seed: int, backend: str, flatten: bool) -> None:
    run_fuzz(TorchOptimFuzz, kind, seed, backend, F64, flatten)


# ------------------------------------------------------------------------------------------------
# What the fuzz found (kept as its own tests)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["constructor", "add_param_group"])
@pytest.mark.parametrize("override", [{"momentum": 0.0}, {"dampening": 0.1}], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_nesterov_checked_on_the_defaults_only(
    how: str, override: dict[str, float], backend: str
) -> None:
    """torch.optim.SGD checks nesterov's needs (momentum > 0, no dampening) on the constructor's
    arguments only: a group may turn momentum off (plain SGD, e.g. for biases) or add dampening
    under nesterov=True defaults, at construction or through add_param_group, and steps as
    torch's does. (onepass checked every group, and refused these.)"""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(5, generator=gen, dtype=F64), torch.randn(3, 2, generator=gen, dtype=F64)]
    params = {lib: [p.clone().requires_grad_() for p in base] for lib in ("onepass", "torch")}
    opts = {}
    for lib, (a, b) in params.items():
        groups = [{"params": [a]}, {"params": [b], **override}]
        if how == "add_param_group":
            groups = groups[:1]
        kwargs = {"lr": 0.1, "momentum": 0.9, "nesterov": True}
        if lib == "onepass":
            opts[lib] = onepass.SGD(groups, **kwargs, backend=backend)
        else:
            opts[lib] = torch.optim.SGD(groups, **kwargs)
        if how == "add_param_group":
            opts[lib].add_param_group({"params": [b], **override})
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen, dtype=F64) for p in base]
        for lib, ps in params.items():
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            opts[lib].step()
        for p, q in zip(params["onepass"], params["torch"], strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=RTOL, atol=ATOL)
