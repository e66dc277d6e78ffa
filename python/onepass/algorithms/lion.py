"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"): spec and pure-torch
reference.

Per element, with decoupled decay as in the paper (Chen et al., 2023b, "Lion secretly solves
constrained optimization" reads it as a box constraint ||p||_inf <= 1/wd)::

    p = p * (1 - lr * wd)
    c = beta1 * m + (1 - beta1) * g       # the update direction interpolates with beta1 ...
    p = p - lr * sign(c)                  # sign(0) = 0, as torch.sign
    m = beta2 * m + (1 - beta2) * g       # ... the momentum tracks with beta2

The state is one slot, ``exp_avg`` (lion-pytorch's name, so its checkpoints load). Lion needs no
bias correction and, like lion-pytorch, keeps no ``step`` in its state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from onepass._ops import native_op
from onepass.algorithms.base import (
    MASTER,
    NEAREST,
    AlgorithmSpec,
    Grads,
    Group,
    Rounding,
    bucket_rounding,
    decay_coefficient,
    elementwise_bytes,
    l2_decays,
    math_param,
    opmath_dtype,
    reference_steps,
    scalar,
    sr_seed,
    triton_launcher,
)


@dataclass(frozen=True)
class LionScalars:
    """The runtime scalars of one step of one param group (never compile-time constants)."""

    lr: float
    beta1: float
    beta2: float
    weight_decay: float  # L2 decay (0 unless decay == "l2")
    decay_coefficient: float  # p *= 1 - lr * decay_coefficient before the update
    l2_decay: bool
    maximize: bool

    @property
    def decay_factor(self) -> float:
        return 1.0 - self.lr * self.decay_coefficient

    @classmethod
    def from_group(cls, group: Group, lr: float | None = None) -> LionScalars:
        """The group's scalars; ``lr`` overrides the group's (see AdamScalars.from_group)."""
        beta1, beta2 = group["betas"]
        weight_decay = scalar(group["weight_decay"])
        l2 = group["decay"] == "l2"
        return cls(
            lr=scalar(group["lr"]) if lr is None else lr,
            beta1=scalar(beta1),
            beta2=scalar(beta2),
            weight_decay=weight_decay if l2 else 0.0,
            decay_coefficient=decay_coefficient(group),
            l2_decay=l2_decays(group, weight_decay),
            maximize=bool(group["maximize"]),
        )


@torch.no_grad()
def lion_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    s: LionScalars,
    grad_scale: float = 1.0,
    rounding: Rounding = NEAREST,
) -> None:
    """One Lion step of one tensor, in place (math in float64 for float64 tensors, float32
    otherwise). ``grad_scale`` is the AMP loss scale the gradient still carries."""
    opmath = opmath_dtype(param.dtype)
    p = param.to(opmath)
    g = grad.to(opmath) / grad_scale
    m = exp_avg.to(opmath)
    if s.maximize:
        g = -g
    if s.l2_decay:
        g = g + s.weight_decay * p
    p = p * s.decay_factor
    c = s.beta1 * m + (1 - s.beta1) * g
    p = p - s.lr * torch.sign(c)
    m = s.beta2 * m + (1 - s.beta2) * g
    rounding.store(param, p)
    rounding.store_state(0, exp_avg, m)


def _check_group(group: Group) -> None:
    """lion-pytorch's checks, with torch.optim.Adam's messages."""
    lr, (beta1, beta2) = group["lr"], group["betas"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not scalar(lr) >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= scalar(beta1) <= 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    if not 0.0 <= scalar(beta2) <= 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
    if not scalar(group["weight_decay"]) >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")


def _active_slots(group: Group) -> tuple[str, ...]:
    return ("exp_avg",)


def _reference_launch(
    bucket: Any,
    grads: Grads,
    group: Group,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    s = LionScalars.from_group(group)

    def step_one(
        i: int, g: torch.Tensor, slots: dict[str, torch.Tensor], t: int, scale: float
    ) -> None:
        # the engine counts Lion's steps too; its math never reads them
        lion_reference(
            math_param(bucket, i, slots),
            g,
            slots["exp_avg"],
            s,
            scale,
            bucket_rounding(bucket, group, i),
        )

    reference_steps(bucket, grads, grad_scale, found_inf, step_one)


def _native_launch(
    bucket: Any,
    grads: Grads,
    group: Group,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    s = LionScalars.from_group(group, lr=0.0)
    native_op("lion_")(
        bucket.params,
        grads,
        bucket.buffers["exp_avg"],
        bucket.step,
        bucket.state_table,
        grad_scale,
        found_inf,
        bucket.lr_tensor(group["lr"]),
        s.beta1,
        s.beta2,
        s.weight_decay,
        s.decay_coefficient,
        s.maximize,
        s.l2_decay,
        bucket.buffers.get(MASTER),
        sr_seed(group, bucket),
    )


LION: AlgorithmSpec = AlgorithmSpec(
    name="lion",
    device_hyper=("lr", "betas", "weight_decay"),
    decay_in_block=True,
    slots=("exp_avg",),
    active_slots=_active_slots,
    step_in_state=False,  # lion-pytorch keeps none; the engine still counts steps per tensor
    check_group=_check_group,
    bytes_per_element=elementwise_bytes(_active_slots),
    reference=lion_reference,
    launchers={
        "reference": _reference_launch,
        "cpu": _native_launch,
        "cuda": _native_launch,
        "triton": triton_launcher("lion"),
    },
    native_grads=True,
)
