"""FAdam (Hwang, 2024, "FAdam: Adam is a natural gradient optimizer using diagonal empirical Fisher
information", Algorithm 1 of the latest version): spec and pure-torch reference.

Per tensor, with t the tensor's own step count from 1 (a param whose grad was None did not
advance) and g the unscaled, maximize-signed gradient; RMS(x) = sqrt(mean(x^2)) over the tensor::

    b2t = b2 * (1 - b2^(t-1)) / (1 - b2^t)           # 0 at t = 1: F = g^2
    F = b2t * F + (1 - b2t) * g^2                      # fim
    eps_t = eps * min(1, RMS(g))                       # eps if g is all zeros
    den = F^p + eps_t
    gn = g / den;  gn /= max(1, RMS(gn) / clip)
    m = b1 * m + (1 - b1) * gn                         # momentum
    wn = param / den;  wn /= max(1, RMS(wn) / clip)
    param = param - lr * (m + wd * wn)

Three passes over each tensor: the sum of g^2 (then eps_t), the sums of gn^2 and wn^2 with the new
den (then the two clip divisors), then the update of F, m and the param. The native CPU op
(``fadam_``) reads F in the second pass without writing it and recomputes the new F and den in the
third, where it writes F: the den of the last pass is then exactly the one the sums were taken
with, also for bf16/fp16 storage (writing F in pass 2 would round it to the storage dtype before
pass 3 reads it back). The per-tensor scalars run in float64 (sums accumulated in float64), the
elementwise math in the opmath dtype.
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
    math_param,
    opmath_dtype,
    reference_steps,
    scalar,
    sr_seed,
    triton_launcher,
)


@dataclass(frozen=True)
class FAdamScalars:
    """The runtime scalars of one step of one param group."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    clip: float
    p: float
    weight_decay: float
    maximize: bool

    def beta2_t(self, step: int) -> float:
        """b2 * (1 - b2^(t-1)) / (1 - b2^t): the bias-corrected decay of F at step t (0 at t=1)."""
        return self.beta2 * (1.0 - self.beta2 ** (step - 1)) / (1.0 - self.beta2**step)

    @classmethod
    def from_group(cls, group: Group, lr: float | None = None) -> FAdamScalars:
        beta1, beta2 = group["betas"]
        return cls(
            lr=scalar(group["lr"]) if lr is None else lr,
            beta1=scalar(beta1),
            beta2=scalar(beta2),
            eps=float(group["eps"]),
            clip=float(group["clip"]),
            p=float(group["p"]),
            weight_decay=scalar(group["weight_decay"]),
            maximize=bool(group["maximize"]),
        )


def rms_from_sum(sum_sq: float, numel: int) -> float:
    """sqrt(sum / numel), 0 for an empty tensor (nothing to update there anyway)."""
    return math.sqrt(sum_sq / numel) if numel > 0 else 0.0


def clip_divisor(sum_sq: float, numel: int, clip: float) -> float:
    """max(1, RMS / clip), NaN where the RMS is (math.h op_max, torch.clamp): a non-finite
    element makes the whole tensor's update NaN on every backend, not only its own element."""
    ratio = rms_from_sum(sum_sq, numel) / clip
    return ratio if math.isnan(ratio) or ratio > 1.0 else 1.0


@torch.no_grad()
def fadam_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    fim: torch.Tensor,
    momentum: torch.Tensor,
    step: int,
    s: FAdamScalars,
    grad_scale: float = 1.0,
    rounding: Rounding = NEAREST,
) -> None:
    """One FAdam step of one tensor, in place; ``step`` is its count including this step.

    Elementwise math in float64 for float64 tensors, float32 otherwise; the per-tensor sums and
    scalars in float64. ``grad_scale`` is the AMP loss scale the gradient still carries.
    """
    opmath = opmath_dtype(param.dtype)
    w = param.to(opmath)
    g = grad.to(opmath) / grad_scale
    if s.maximize:
        g = -g
    n = g.numel()
    rms_g = rms_from_sum(float(g.to(torch.float64).square().sum()), n)
    eps_t = s.eps * (min(1.0, rms_g) if rms_g > 0.0 else 1.0)  # all zeros: eps (no 0 / 0)
    b2t = s.beta2_t(step)
    f = b2t * fim.to(opmath) + (1.0 - b2t) * g * g
    den = f.pow(s.p) + eps_t
    gn = g / den
    gn = gn / clip_divisor(float(gn.to(torch.float64).square().sum()), n, s.clip)
    m = s.beta1 * momentum.to(opmath) + (1.0 - s.beta1) * gn
    wn = w / den
    wn = wn / clip_divisor(float(wn.to(torch.float64).square().sum()), n, s.clip)
    w = w - s.lr * (m + s.weight_decay * wn)
    rounding.store_state(0, fim, f)
    rounding.store_state(1, momentum, m)
    rounding.store(param, w)


def _check_group(group: Group) -> None:
    """torch.optim.Adam's checks and messages, plus clip > 0 and 0 < p <= 1."""
    lr, (beta1, _) = group["lr"], group["betas"]  # (beta2: _check_step)
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not scalar(lr) >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not group["eps"] >= 0.0:
        raise ValueError(f"Invalid epsilon value: {group['eps']}")
    if not 0.0 <= scalar(beta1) < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    _check_step(group, constructing=True)
    if not 0.0 < group["p"] <= 1.0:
        raise ValueError(f"Invalid p value: {group['p']}")
    if not scalar(group["weight_decay"]) >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
    if group["decay"] != "l2":
        raise ValueError(f"onepass: FAdam has no decay mode {group['decay']!r}")


def _check_step(group: Group, constructing: bool = False) -> None:
    """The constructor's ranges for beta2 and clip, checked at every step too: set after
    construction, b2 = 1 divides by zero in b2t and clip = 0 in RMS / clip (the reference
    failing part-way, the kernels writing non-finite params); beyond them the rule means
    nothing."""
    check_beta(group, 1, constructing)
    if not group["clip"] > 0.0:
        raise ValueError(f"Invalid clip value: {group['clip']}")


def _active_slots(group: Group) -> tuple[str, ...]:
    return ("fim", "momentum")


def _bytes_per_element(group: Group, itemsize: int) -> int:
    """Three passes: read g; read param, g and F; read param, g, F and m, write param, F and m."""
    return itemsize * (1 + 3 + 7)


def _reference_launch(
    bucket: Any,
    grads: Grads,
    group: Group,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    s = FAdamScalars.from_group(group)

    def step_one(
        i: int, g: torch.Tensor, slots: dict[str, torch.Tensor], t: int, scale: float
    ) -> None:
        fadam_reference(
            math_param(bucket, i, slots),
            g,
            slots["fim"],
            slots["momentum"],
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
    s = FAdamScalars.from_group(group, lr=0.0)
    native_op("fadam_")(
        bucket.params,
        grads,
        bucket.buffers["fim"],
        bucket.buffers["momentum"],
        bucket.step,
        bucket.state_table,
        grad_scale,
        found_inf,
        bucket.lr_tensor(group["lr"]),
        s.beta1,
        s.beta2,
        s.eps,
        s.clip,
        s.p,
        s.weight_decay,
        s.maximize,
        bucket.buffers.get(MASTER),
        sr_seed(group, bucket),
    )


FADAM: AlgorithmSpec = AlgorithmSpec(
    name="fadam",
    device_hyper=("lr", "betas", "eps", "weight_decay"),
    slots=("fim", "momentum"),
    active_slots=_active_slots,
    step_in_state=True,
    check_group=_check_group,
    check_step=_check_step,
    bytes_per_element=_bytes_per_element,
    reference=fadam_reference,
    reduction="per_tensor",
    launchers={
        "reference": _reference_launch,
        "cpu": _native_launch,
        "cuda": _native_launch,
        "triton": triton_launcher("fadam"),
    },
    native_grads=True,
)
