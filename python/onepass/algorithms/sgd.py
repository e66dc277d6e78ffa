"""SGD with momentum and SGDW (Loshchilov & Hutter): spec and pure-torch reference.

Same semantics as torch.optim.SGD: a tensor's first momentum step starts its buffer from the
(decayed, maximize-signed) gradient; dampening applies from the second step; nesterov looks ahead.
SGDW decouples the decay: p = p - lr*d - lr*wd*p_old.
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
class SgdScalars:
    """The runtime scalars of one step of one param group."""

    lr: float
    momentum: float
    dampening: float
    weight_decay: float  # L2 decay (0 unless decay == "l2")
    decay_coefficient: float  # p *= 1 - lr * decay_coefficient before the update
    l2_decay: bool
    nesterov: bool
    maximize: bool

    @property
    def decay_factor(self) -> float:
        return 1.0 - self.lr * self.decay_coefficient

    @classmethod
    def from_group(cls, group: Group, lr: float | None = None) -> SgdScalars:
        """The group's scalars; ``lr`` overrides the group's (see AdamScalars.from_group)."""
        weight_decay = scalar(group["weight_decay"])
        l2 = group["decay"] == "l2"
        return cls(
            lr=scalar(group["lr"]) if lr is None else lr,
            momentum=float(group["momentum"]),
            dampening=float(group["dampening"]),
            weight_decay=weight_decay if l2 else 0.0,
            decay_coefficient=decay_coefficient(group),
            l2_decay=l2_decays(group, weight_decay),
            nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]),
        )


@torch.no_grad()
def sgd_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    first_step: bool,
    s: SgdScalars,
    grad_scale: float = 1.0,
    rounding: Rounding = NEAREST,
) -> None:
    """One SGD step of one tensor, in place. ``first_step``: the momentum buffer is new."""
    opmath = opmath_dtype(param.dtype)
    p = param.to(opmath)
    d = grad.to(opmath) / grad_scale
    if s.maximize:
        d = -d
    if s.l2_decay:
        d = d + s.weight_decay * p
    p = p * s.decay_factor
    if s.momentum != 0:
        assert momentum_buffer is not None
        if first_step:
            buf = d.clone()
        else:
            buf = s.momentum * momentum_buffer.to(opmath) + (1 - s.dampening) * d
        rounding.store_state(0, momentum_buffer, buf)
        d = d + s.momentum * buf if s.nesterov else buf
    rounding.store(param, p - s.lr * d)


def _check_group(group: Group) -> None:
    """torch.optim.SGD's checks and messages."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if scalar(lr) < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if group["momentum"] < 0.0:
        raise ValueError(f"Invalid momentum value: {group['momentum']}")
    if scalar(group["weight_decay"]) < 0.0:
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")


def _check_arguments(defaults: Group) -> None:
    """nesterov's needs, which torch.optim.SGD checks on the constructor's arguments only: a
    group may turn momentum off, or add dampening, under nesterov=True defaults."""
    if defaults["nesterov"] and (defaults["momentum"] <= 0 or defaults["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def _active_slots(group: Group) -> tuple[str, ...]:
    return ("momentum_buffer",) if group["momentum"] != 0 else ()


def _reference_launch(
    bucket: Any,
    grads: Grads,
    group: Group,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    s = SgdScalars.from_group(group)

    def step_one(
        i: int, g: torch.Tensor, slots: dict[str, torch.Tensor], t: int, scale: float
    ) -> None:
        # a tensor's first step with momentum starts its buffer from the gradient
        sgd_reference(
            math_param(bucket, i, slots),
            g,
            slots.get("momentum_buffer"),
            t == 1,
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
    s = SgdScalars.from_group(group, lr=0.0)
    native_op("sgd_")(
        bucket.params,
        grads,
        bucket.buffers.get("momentum_buffer"),
        bucket.step,
        bucket.state_table,
        grad_scale,
        found_inf,
        bucket.lr_tensor(group["lr"]),
        s.momentum,
        s.dampening,
        s.weight_decay,
        s.decay_coefficient,
        s.nesterov,
        s.maximize,
        s.l2_decay,
        bucket.buffers.get(MASTER),
        sr_seed(group, bucket),
    )


SGD_SPEC: AlgorithmSpec = AlgorithmSpec(
    name="sgd",
    device_hyper=("lr", "weight_decay"),
    decay_in_block=True,
    slots=("momentum_buffer",),
    active_slots=_active_slots,
    step_in_state=False,
    check_group=_check_group,
    check_arguments=_check_arguments,
    optional_slots=("momentum_buffer",),
    bytes_per_element=elementwise_bytes(_active_slots),
    reference=sgd_reference,
    launchers={
        "reference": _reference_launch,
        "cpu": _native_launch,
        "cuda": _native_launch,
        "triton": triton_launcher("sgd"),
    },
    native_grads=True,
)
