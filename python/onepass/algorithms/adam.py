"""Adam and AdamW (Kingma & Ba; Loshchilov & Hutter): spec and pure-torch reference.

Same semantics as torch.optim.Adam / AdamW: the moments are torch's (``exp_avg`` by lerp,
``exp_avg_sq``, ``max_exp_avg_sq`` with amsgrad), bias corrections use each tensor's own ``step``,
and weight decay is L2 (Adam), decoupled (AdamW) or independent of the peak lr.
"""

from __future__ import annotations

import math
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
    check_beta,
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
class AdamScalars:
    """The runtime scalars of one step of one param group (never compile-time constants)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float  # L2 decay (0 unless decay == "l2")
    decay_coefficient: float  # p *= 1 - lr * decay_coefficient before the update
    l2_decay: bool
    amsgrad: bool
    maximize: bool

    @property
    def decay_factor(self) -> float:
        return 1.0 - self.lr * self.decay_coefficient

    @classmethod
    def from_group(cls, group: Group, lr: float | None = None) -> AdamScalars:
        """The group's scalars; ``lr`` overrides the group's (the native kernels take the lr as a
        tensor of its own, so they pass 0.0 here and never read a tensor lr on the host)."""
        beta1, beta2 = group["betas"]
        weight_decay = scalar(group["weight_decay"])
        l2 = group["decay"] == "l2"
        return cls(
            lr=scalar(group["lr"]) if lr is None else lr,
            beta1=scalar(beta1),
            beta2=scalar(beta2),
            eps=float(group["eps"]),
            weight_decay=weight_decay if l2 else 0.0,
            decay_coefficient=decay_coefficient(group),
            l2_decay=l2_decays(group, weight_decay),
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]),
        )


@torch.no_grad()
def adam_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    step: int,
    s: AdamScalars,
    grad_scale: float = 1.0,
    rounding: Rounding = NEAREST,
) -> None:
    """One Adam step of one tensor, in place; ``step`` is t after this step (t >= 1).

    Math in float64 for float64 tensors, float32 otherwise; results are written back in the
    tensors' own dtypes. ``grad_scale`` is the AMP loss scale the gradient still carries.
    """
    opmath = opmath_dtype(param.dtype)
    p = param.to(opmath)
    g = grad.to(opmath) / grad_scale
    m = exp_avg.to(opmath)
    v = exp_avg_sq.to(opmath)
    if s.maximize:
        g = -g
    if s.l2_decay:
        g = g + s.weight_decay * p
    p = p * s.decay_factor
    m = m + (1 - s.beta1) * (g - m)
    v = s.beta2 * v + (1 - s.beta2) * g * g
    second_moment = v
    if s.amsgrad:
        assert max_exp_avg_sq is not None
        vmax = torch.maximum(max_exp_avg_sq.to(opmath), v)
        rounding.store_state(2, max_exp_avg_sq, vmax)
        second_moment = vmax
    bias_correction1 = 1 - s.beta1**step
    bias_correction2 = 1 - s.beta2**step
    denom = second_moment.sqrt() / math.sqrt(bias_correction2) + s.eps
    p = p - (s.lr / bias_correction1) * m / denom
    rounding.store(param, p)
    rounding.store_state(0, exp_avg, m)
    rounding.store_state(1, exp_avg_sq, v)


def _check_group(group: Group) -> None:
    """torch.optim.Adam's checks and messages."""
    lr, (beta1, beta2) = group["lr"], group["betas"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not scalar(lr) >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not group["eps"] >= 0.0:
        raise ValueError(f"Invalid epsilon value: {group['eps']}")
    if not 0.0 <= scalar(beta1) < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    if not 0.0 <= scalar(beta2) < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
    if not scalar(group["weight_decay"]) >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
    _check_step(group)


def _check_step(group: Group) -> None:
    """torch.optim.Adam's ``decoupled_weight_decay`` and onepass's ``decay`` name one choice
    (Muon's AdamW groups have only ``decay``); the step follows ``decay``, so the two must
    agree: one changed alone in a param group is refused, not half applied. The betas keep
    torch's range (the bias corrections divide by 1 - beta^t)."""
    check_beta(group, 0)
    check_beta(group, 1)
    decoupled = group.get("decoupled_weight_decay")
    if decoupled is not None and bool(decoupled) != (group["decay"] != "l2"):
        raise ValueError(
            f"decoupled_weight_decay={decoupled} but decay={group['decay']!r}; set both "
            "('l2' is decoupled_weight_decay=False, 'decoupled' and 'independent' are True)"
        )


def _active_slots(group: Group) -> tuple[str, ...]:
    base = ("exp_avg", "exp_avg_sq")
    return (*base, "max_exp_avg_sq") if group["amsgrad"] else base


def _reference_launch(
    bucket: Any,
    grads: Grads,
    group: Group,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    s = AdamScalars.from_group(group)

    def step_one(
        i: int, g: torch.Tensor, slots: dict[str, torch.Tensor], t: int, scale: float
    ) -> None:
        adam_reference(
            math_param(bucket, i, slots),
            g,
            slots["exp_avg"],
            slots["exp_avg_sq"],
            slots.get("max_exp_avg_sq"),
            t,
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
    s = AdamScalars.from_group(group, lr=0.0)
    native_op("adam_")(
        bucket.params,
        grads,
        bucket.buffers["exp_avg"],
        bucket.buffers["exp_avg_sq"],
        bucket.buffers.get("max_exp_avg_sq"),
        bucket.step,
        bucket.state_table,
        grad_scale,
        found_inf,
        bucket.lr_tensor(group["lr"]),
        s.beta1,
        s.beta2,
        s.eps,
        s.weight_decay,
        s.decay_coefficient,
        s.amsgrad,
        s.maximize,
        s.l2_decay,
        bucket.buffers.get(MASTER),
        sr_seed(group, bucket),
    )


ADAM: AlgorithmSpec = AlgorithmSpec(
    name="adam",
    device_hyper=("lr", "betas", "eps", "weight_decay"),
    decay_in_block=True,
    slots=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    active_slots=_active_slots,
    step_in_state=True,
    check_group=_check_group,
    optional_slots=("max_exp_avg_sq",),
    check_step=_check_step,
    bytes_per_element=elementwise_bytes(_active_slots),
    reference=adam_reference,
    launchers={
        "reference": _reference_launch,
        "cpu": _native_launch,
        "cuda": _native_launch,
        "triton": triton_launcher("adam"),
    },
    native_grads=True,
)
