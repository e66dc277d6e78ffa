"""NovoGrad (Ginsburg et al., 2019, "Stochastic Gradient Methods with Layer-wise Adaptive Moments
for Training of Deep Networks"): spec and pure-torch reference.

Per tensor ("layer"), with t the tensor's own step count (a param whose grad was None did not
advance) and g the unscaled, maximize-signed gradient::

    n = ||g||^2                                   # a per-tensor reduction, summed in float64
    v = n                        if t == 1
    v = beta2 * v + (1 - beta2) * n               otherwise        # exp_avg_sq: ONE scalar
    v_max = max(v_max, v); use v_max below        if amsgrad       # max_exp_avg_sq: one scalar
    u = g / (sqrt(v) + eps) + wd * p
    m = u                        if t == 1
    m = beta1 * m + s * u                         otherwise        # s = 1 - beta1 if grad_averaging
    p = p - lr * m

No bias correction. The state names are those of torch-optimizer's NovoGrad (``step``,
``exp_avg``, ``exp_avg_sq`` and with amsgrad ``max_exp_avg_sq``, the last two 0-d), so its
checkpoints load. The scalar slots are kept in float32 for 16/32-bit params (float64 for float64),
whatever the param dtype: they cost nothing and a bf16 norm would lose precision at every step.

The step is two passes over the grads: the per-tensor sums of squares first (then the scalar
update of v per tensor), then the elementwise update, which reads the tensor's denominator.
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
    math_param,
    opmath_dtype,
    reference_steps,
    scalar,
    sr_seed,
    triton_launcher,
)


@dataclass(frozen=True)
class NovoGradScalars:
    """The runtime scalars of one step of one param group (never compile-time constants)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    grad_averaging: bool
    amsgrad: bool
    maximize: bool

    @property
    def update_scale(self) -> float:
        """s in ``m = beta1 * m + s * u`` after the first step."""
        return 1.0 - self.beta1 if self.grad_averaging else 1.0

    @classmethod
    def from_group(cls, group: Group, lr: float | None = None) -> NovoGradScalars:
        """The group's scalars; ``lr`` overrides the group's (see AdamScalars.from_group)."""
        beta1, beta2 = group["betas"]
        return cls(
            lr=scalar(group["lr"]) if lr is None else lr,
            beta1=scalar(beta1),
            beta2=scalar(beta2),
            eps=float(group["eps"]),
            weight_decay=scalar(group["weight_decay"]),
            grad_averaging=bool(group["grad_averaging"]),
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]),
        )


@torch.no_grad()
def novograd_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    step: int,
    s: NovoGradScalars,
    grad_scale: float = 1.0,
    rounding: Rounding = NEAREST,
) -> None:
    """One NovoGrad step of one tensor, in place; ``step`` is its count including this step.

    Elementwise math in float64 for float64 tensors, float32 otherwise; the scalar part (sum of
    squares, v, its square root) in float64 always, v rounded to its slot's dtype when stored and
    the stored value used (so a resumed run continues bitwise). ``grad_scale`` is the AMP loss
    scale the gradient still carries.
    """
    opmath = opmath_dtype(param.dtype)
    p = param.to(opmath)
    g = grad.to(opmath) / grad_scale
    if s.maximize:
        g = -g
    norm_sq = g.to(torch.float64).square().sum()
    first = step == 1
    v = norm_sq if first else s.beta2 * exp_avg_sq.to(torch.float64) + (1 - s.beta2) * norm_sq
    exp_avg_sq.copy_(v)
    used = exp_avg_sq
    if s.amsgrad:
        assert max_exp_avg_sq is not None
        max_exp_avg_sq.copy_(torch.maximum(max_exp_avg_sq, exp_avg_sq))
        used = max_exp_avg_sq
    denom = (used.to(torch.float64).sqrt() + s.eps).to(opmath)
    u = g / denom + s.weight_decay * p
    m = u if first else s.beta1 * exp_avg.to(opmath) + s.update_scale * u
    p = p - s.lr * m
    rounding.store(param, p)
    rounding.store_state(0, exp_avg, m)


def _check_group(group: Group) -> None:
    """torch-optimizer's checks, with torch.optim.Adam's messages."""
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
    if group["decay"] != "l2":
        # The paper's decay goes through the moment (u = g / denom + wd * p); there is no other.
        raise ValueError(f"onepass: NovoGrad has no decay mode {group['decay']!r}")


def _active_slots(group: Group) -> tuple[str, ...]:
    base = ("exp_avg", "exp_avg_sq")
    return (*base, "max_exp_avg_sq") if group["amsgrad"] else base


def _bytes_per_element(group: Group, itemsize: int) -> int:
    """Two passes: the reduction reads the grad; the update reads param, grad and exp_avg and
    writes param and exp_avg (the scalar slots are per tensor: nothing per element)."""
    return itemsize * (1 + 3 + 2)


def _reference_launch(
    bucket: Any,
    grads: Grads,
    group: Group,
    grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None,
) -> None:
    s = NovoGradScalars.from_group(group)

    def step_one(
        i: int, g: torch.Tensor, slots: dict[str, torch.Tensor], t: int, scale: float
    ) -> None:
        novograd_reference(
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
    s = NovoGradScalars.from_group(group, lr=0.0)
    native_op("novograd_")(
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
        s.grad_averaging,
        s.amsgrad,
        s.maximize,
        bucket.buffers.get(MASTER),
        sr_seed(group, bucket),
    )


NOVOGRAD: AlgorithmSpec = AlgorithmSpec(
    name="novograd",
    device_hyper=("lr", "betas", "eps", "weight_decay"),
    slots=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    active_slots=_active_slots,
    step_in_state=True,
    check_group=_check_group,
    optional_slots=("max_exp_avg_sq",),
    bytes_per_element=_bytes_per_element,
    reference=novograd_reference,
    reduction="per_tensor",
    scalar_slots=("exp_avg_sq", "max_exp_avg_sq"),
    launchers={
        "reference": _reference_launch,
        "cpu": _native_launch,
        "cuda": _native_launch,
        "triton": triton_launcher("novograd"),
    },
    native_grads=True,
)
