"""Seeded differential fuzz of the weight-decay family: onepass.Muon against torch.optim.Muon,
onepass.Lion against lion-pytorch's Lion, and the onepass-only rules (NovoGrad, FAdam, Lion's
maximize / l2 / independent decay) on the CPU kernels against the float64 reference backend,
under the same random sequence of user operations (the engine: tests/fuzz.py, as for
tests/test_fuzz_torch_optim.py).

Each case builds two identical sets of params (odd shapes, a zero-size one, a non-contiguous one,
a frozen one that never gets a grad; Muon: matrices only, as torch.optim.Muon takes), one
optimizer per side with the same random hyperparameters (sometimes two param groups), and applies
~25 random operations to both: grads (some None) and steps, steps on the grads already there,
zero_grad, hyperparameter changes between steps, an LR scheduler, add_param_group, and
state_dict round trips (same library or backend) and cross-loads (each side continues in the
other library or backend from its own state_dict). Params are compared after every operation;
state and the state_dicts after every state_dict operation and at the end. A failure names the
case and lists the operations so far. CPU-backend seeds cycle through the SIMD builds this CPU
runs; a few run with flatten=True (same results, README).

The peers, read against README's rules:

- torch.optim.Muon runs Newton-Schulz in bfloat16, always, with the standard iteration; onepass
  gives its results with ``ns_dtype=torch.bfloat16, ns_method="standard"`` (its defaults pick
  float32 / float64 and Gram Newton-Schulz). See MUON_TORCH_LIKE and MUON_SLACK.
- lion-pytorch's ``update_fn`` is README's Lion rule with decoupled decay, ``p *= 1 - lr*wd``,
  and sign(0) = 0 (``sgn_``), state ``exp_avg`` alone: compared directly, cross-loads included.
  It has no ``maximize`` and no L2 decay, and its ``decoupled_weight_decay=True`` divides wd by
  the constructor's lr, one value for the whole optimizer, where onepass's "independent" decay
  divides by each group's ``initial_lr`` (its lr at construction, or the scheduler's: OneCycleLR
  sets it). Those parts run as "Lion-options", the CPU kernels against the reference backend.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest
import torch

import onepass

from fuzz import F32, F64, Fuzz, case_backend, ignore_scheduler_order, run_fuzz

try:
    import lion_pytorch
except ImportError:  # not a test dependency: its cases skip
    lion_pytorch = None

#: (rtol, atol) where both sides do the same math in the same dtype and differ only in operation
#: order (~1 ulp a step): float64 as in test_fuzz_torch_optim.py; float32 at its ulp (6e-8 at
#: 1.0), over ~25 steps of one-ulp differences in params and moments of magnitude up to ~10.
TIGHT = {F64: (1e-12, 1e-14), F32: (1e-5, 1e-6)}

#: onepass.Muon settings that run torch.optim.Muon's step: torch casts the update to bfloat16
#: and runs the standard quintic iteration (``_zeropower_via_newtonschulz``). onepass's own
#: defaults differ on purpose (ns_dtype None: float32 on CPUs without native bf16 matmuls,
#: float64 for float64 params; ns_method "gram"). With these the reference backend is torch's
#: step operation for operation, so it is compared bit for bit (rtol = atol = 0).
MUON_TORCH_LIKE = {"ns_dtype": torch.bfloat16, "ns_method": "standard"}

#: The CPU backend runs the same bfloat16 iteration, but batches same-shape matrices (bmm: another
#: accumulation order inside each bf16 product), folds lr'/lr into the last iteration (one more
#: bf16 rounding where lr' != lr) and computes the momentum in its own fused pass (a float32 ulp
#: here and there, which the cast to bf16 can turn into a bf16 ulp). Two bf16 runs that round
#: differently land a few bf16 eps (2^-7) of the update's largest element apart: each iteration
#: ends with a*X + B@X, whose terms are up to a = 3.4445 times the result and rounded to bf16, so
#: the sum cancels digits. Each param's tolerance therefore grows, at every step, by MUON_SLACK
#: times the largest element of that step's update, lr'*O = p_new - p_old*(1 - lr*wd), on either
#: side. Nothing feeds a difference back (the update depends on the grads only; the decay
#: shrinks it), so it adds up over steps and no further. Over 300 seeded runs (150 per dtype)
#: the largest difference used 0.31 of this (2.5 eps, on a 3x5 matrix; ~0.1 typically); an lr'
#: 10% off would exceed it at its first step. The momentum buffers see no Newton-Schulz: TIGHT.
MUON_SLACK = 8 * torch.finfo(torch.bfloat16).eps

#: Side A starts in the first library (or backend), side B in the second; a cross-load swaps.
PAIRS: dict[str, tuple[str, str]] = {
    "Muon": ("onepass", "torch"),
    "Lion": ("onepass", "lion-pytorch"),
    "Lion-options": ("cpu", "reference"),
    "NovoGrad": ("cpu", "reference"),
    "FAdam": ("cpu", "reference"),
}
ONEPASS: dict[str, type[torch.optim.Optimizer]] = {
    "Muon": onepass.Muon,
    "Lion": onepass.Lion,
    "Lion-options": onepass.Lion,
    "NovoGrad": onepass.NovoGrad,
    "FAdam": onepass.FAdam,
}
#: Group keys both sides keep with the same meaning (compared in the state_dicts).
SHARED_KEYS: dict[str, tuple[str, ...]] = {
    "Muon": (
        "lr",
        "initial_lr",
        "weight_decay",
        "momentum",
        "nesterov",
        "ns_coefficients",
        "eps",
        "ns_steps",
        "adjust_lr_fn",
    ),
    "Lion": ("lr", "initial_lr", "betas", "weight_decay"),
    "Lion-options": ("lr", "initial_lr", "betas", "weight_decay", "maximize", "decay"),
    "NovoGrad": (
        "lr",
        "initial_lr",
        "betas",
        "eps",
        "weight_decay",
        "grad_averaging",
        "amsgrad",
        "maximize",
    ),
    "FAdam": ("lr", "initial_lr", "betas", "eps", "clip", "p", "weight_decay", "maximize"),
}
#: The keys op_set_hparam changes between steps (the new value: Fuzz.draw_value).
MUTABLE: dict[str, tuple[str, ...]] = {
    "Muon": ("lr", "weight_decay", "momentum", "nesterov", "adjust_lr_fn", "ns_steps"),
    "Lion": ("lr", "weight_decay", "betas"),
    "Lion-options": ("lr", "weight_decay", "betas", "maximize"),
    "NovoGrad": (
        "lr",
        "weight_decay",
        "betas",
        "eps",
        "maximize",
        "grad_averaging",
        "amsgrad",
    ),
    "FAdam": ("lr", "weight_decay", "betas", "eps", "maximize", "clip", "p"),
}


# ------------------------------------------------------------------------------------------------
# Random draws
# ------------------------------------------------------------------------------------------------


def draw_hparams(kind: str, rng: random.Random) -> dict[str, Any]:
    """A full set of hyperparameters for a constructor or a param group (floats, no tensors)."""
    if kind == "Muon":
        return {
            "lr": 10 ** rng.uniform(-3, -1),
            "weight_decay": rng.choice([0.0, rng.uniform(0.0, 0.3)]),
            "momentum": rng.choice([0.0, rng.uniform(0.5, 0.99)]),
            "nesterov": rng.random() < 0.6,
            "adjust_lr_fn": rng.choice([None, "original", "match_rms_adamw"]),
            "ns_steps": rng.choice([5, 5, 3]),
        }
    if kind in ("Lion", "Lion-options"):
        hp: dict[str, Any] = {
            "lr": 10 ** rng.uniform(-4, -1.5),
            "betas": (rng.uniform(0.5, 0.95), rng.uniform(0.9, 0.999)),
            "weight_decay": rng.choice([0.0, rng.uniform(0.0, 1.0)]),
        }
        if kind == "Lion-options":
            hp["maximize"] = rng.random() < 0.5
        return hp
    hp = {
        "lr": 10 ** rng.uniform(-3, -1),
        "eps": 10 ** rng.uniform(-10, -6),
        "weight_decay": rng.choice([0.0, rng.uniform(0.0, 0.3)]),
        "maximize": rng.random() < 0.3,
    }
    if kind == "NovoGrad":
        hp["betas"] = (rng.uniform(0.5, 0.98), rng.uniform(0.5, 0.999))
        hp["grad_averaging"] = rng.random() < 0.5
        hp["amsgrad"] = rng.random() < 0.5
    else:  # FAdam
        hp["betas"] = (rng.uniform(0.5, 0.95), rng.uniform(0.9, 0.9999))
        hp["clip"] = rng.choice([1.0, rng.uniform(0.05, 2.0)])
        hp["p"] = rng.choice([0.5, rng.uniform(0.1, 1.0)])
    return hp


def initial_shapes(kind: str, dtype: torch.dtype) -> list[tuple[int, ...]]:
    if kind == "Muon":
        # Wide, tall, square, 1x1, zero-size (torch's lr' divides by the column count: (0, 3)
        # only), a same-shape pair (one batched Newton-Schulz), non-contiguous (4, 3).
        return [(3, 5), (3, 5), (7, 2), (1, 1), (0, 3), (4, 3), (9, 9), (40, 17)]
    # 0-d, 1-element, zero-size, non-contiguous (4, 3), and one over a CPU chunk (2^15 elements,
    # NovoGrad's and FAdam's multi-chunk reductions). Not in float32 against lion-pytorch: an
    # element whose c = b1*m + (1-b1)*g is within a float32 ulp of 0 may take the other sign
    # there (a 2*lr step apart, legitimately); 33k elements x 25 steps would make that likely.
    big = (17, 19) if dtype == F32 else (129, 257)
    return [(3, 5), (), (1,), (0, 3), (2, 3, 2), (4, 3), (6,), big]


def draw_new_shape(kind: str, rng: random.Random) -> tuple[int, ...]:
    if kind == "Muon":
        return rng.choice([(3, 5), (2, 7), (5, 5), (1, 4), (6, 2), (0, 4)])
    return rng.choice([(3, 5), (7,), (2, 3, 2), (1, 4), (11,), (4, 1, 3), (), (1,), (0, 3)])


# ------------------------------------------------------------------------------------------------
# The two runs
# ------------------------------------------------------------------------------------------------


class FamilyFuzz(Fuzz):
    """Side A starts in PAIRS[kind][0], side B in PAIRS[kind][1]."""

    GEN_SEED = 2000

    def pair(self) -> tuple[str, str]:
        return PAIRS[self.kind]

    def build(self, lib: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if lib == "torch":
            return torch.optim.Muon(groups, **self.ctor)
        if lib == "lion-pytorch":
            assert lion_pytorch is not None
            return lion_pytorch.Lion(groups, **self.ctor)
        backend = self.backend if lib == "onepass" else lib
        extra: dict[str, Any] = MUON_TORCH_LIKE if self.kind == "Muon" else {}
        cls = ONEPASS[self.kind]
        return cls(groups, **self.ctor, **extra, backend=backend, flatten=self.flatten)

    def tolerance(self) -> tuple[float, float]:
        if self.kind == "Muon" and self.backend == "reference":
            return 0.0, 0.0  # torch's operations, in torch's order: bit for bit
        return TIGHT[self.dtype]

    def slack_rate(self) -> float:
        """Muon's bf16 allowance (MUON_SLACK) on the CPU backend; none on the reference."""
        return MUON_SLACK if self.kind == "Muon" and self.backend != "reference" else 0.0

    def shared_keys(self) -> Sequence[str]:
        return SHARED_KEYS[self.kind]

    def mutable_keys(self, group: dict[str, Any]) -> Sequence[str]:
        return MUTABLE[self.kind]

    def one_cycle_max_lr(self) -> float:
        return 0.01 if self.kind.startswith("Lion") else 0.05

    # -- random draws ---------------------------------------------------------------------------

    def draw_hparams(self) -> dict[str, Any]:
        return draw_hparams(self.kind, self.rng)

    def draw_ctor(self) -> dict[str, Any]:
        ctor = draw_hparams(self.kind, self.rng)
        if self.kind == "Lion-options":
            ctor["decay"] = self.rng.choice(["decoupled", "independent", "l2"])
        return ctor

    def initial_shapes(self) -> list[tuple[int, ...]]:
        return initial_shapes(self.kind, self.dtype)

    def new_shape(self) -> tuple[int, ...]:
        return draw_new_shape(self.kind, self.rng)


def _cases(
    kind: str, backend: str, dtype: torch.dtype, seeds: range, flatten: bool = False
) -> list[Any]:
    name = str(dtype).removeprefix("torch.")
    suffix = "-flatten" if flatten else ""
    return [
        pytest.param(
            kind,
            seed,
            backend,
            dtype,
            flatten,
            id=f"{kind}-{case_backend(backend, seed)}-{name}{suffix}-{seed}",
        )
        for seed in seeds
    ]


CASES = [
    *_cases("Muon", "reference", F32, range(5)),
    *_cases("Muon", "reference", F64, range(5)),
    *_cases("Muon", "cpu", F32, range(20)),
    *_cases("Muon", "cpu", F64, range(20)),
    *_cases("Lion", "cpu", F32, range(16)),
    *_cases("Lion", "cpu", F64, range(16)),
    *_cases("Lion", "cpu", F64, range(100, 104), flatten=True),
    *_cases("Lion", "reference", F64, range(4)),
    *_cases("Lion-options", "cpu", F64, range(24)),
    *_cases("Lion-options", "cpu", F64, range(100, 104), flatten=True),
    *_cases("NovoGrad", "cpu", F64, range(30)),
    *_cases("NovoGrad", "cpu", F64, range(100, 105), flatten=True),
    *_cases("FAdam", "cpu", F64, range(30)),
    *_cases("FAdam", "cpu", F64, range(100, 105), flatten=True),
]


@ignore_scheduler_order
@pytest.mark.parametrize(("kind", "seed", "backend", "dtype", "flatten"), CASES)
def test_fuzz_family(kind: str, seed: int, backend: str, dtype: torch.dtype, flatten: bool) -> None:
    if kind == "Muon" and not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch 2.9+")
    if kind == "Lion" and lion_pytorch is None:
        pytest.skip("lion-pytorch is not installed")
    run_fuzz(FamilyFuzz, kind, seed, backend, dtype, flatten)


# ------------------------------------------------------------------------------------------------
# Where lion-pytorch differs (kept as its own test; the fuzz runs those parts as "Lion-options")
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(lion_pytorch is None, reason="lion-pytorch is not installed")
def test_lion_pytorch_decoupled_weight_decay_divides_by_the_constructor_lr() -> None:
    """lion-pytorch's ``decoupled_weight_decay=True`` is ``p *= 1 - lr * wd / init_lr`` with
    init_lr the constructor's lr, one value for the optimizer: onepass's ``decay="independent"``
    where a group has that lr, but a group with its own lr is divided by the constructor's lr
    there and by its own ``initial_lr`` in onepass (README: the group's lr at construction)."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(5, generator=gen, dtype=F64), torch.randn(3, 2, generator=gen, dtype=F64)]
    ours = [p.clone().requires_grad_() for p in base]
    theirs = [p.clone().requires_grad_() for p in base]
    wd = 0.5
    opt = onepass.Lion(
        [{"params": [ours[0]]}, {"params": [ours[1]], "lr": 0.01}],
        lr=0.1,
        weight_decay=wd,
        decay="independent",
    )
    peer = lion_pytorch.Lion(
        [{"params": [theirs[0]]}, {"params": [theirs[1]], "lr": 0.01}],
        lr=0.1,
        weight_decay=wd,
        decoupled_weight_decay=True,
    )
    for p, q in zip(ours, theirs, strict=True):
        p.grad = torch.zeros_like(p)  # m = 0, c = 0, sign(0) = 0: the decay alone
        q.grad = torch.zeros_like(q)
    opt.step()
    peer.step()
    rtol, atol = TIGHT[F64]
    for p, b in zip(ours, base, strict=True):  # onepass: lr / initial_lr = 1 in both groups
        torch.testing.assert_close(p.detach(), b * (1 - wd), rtol=rtol, atol=atol)
    torch.testing.assert_close(theirs[0].detach(), base[0] * (1 - wd), rtol=rtol, atol=atol)
    # lion-pytorch: the second group's wd divided by the constructor's lr, 0.1, not its own
    torch.testing.assert_close(
        theirs[1].detach(), base[1] * (1 - 0.01 * wd / 0.1), rtol=rtol, atol=atol
    )
