"""onepass.FAdam: FAdam with a fused step."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from onepass.algorithms.fadam import FADAM
from onepass.optim.base import FusedOptimizer, Options

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from onepass.algorithms.base import AlgorithmSpec


class FAdam(FusedOptimizer):
    r"""FAdam (Hwang, 2024, "FAdam: Adam is a natural gradient optimizer using diagonal empirical
    Fisher information", Algorithm 1 of the paper's latest version): Adam read as natural
    gradient, with the momentum taken of the natural gradient, the gradient and the weight decay
    both divided by the Fisher diagonal, and both clipped by their RMS.

    For each param with a gradient, t its own step count from 1 (a param whose grad was None does
    not advance), RMS(x) = sqrt(mean(x ** 2)) over the tensor::

        g = -g if maximize else g
        b2t = b2 * (1 - b2 ** (t - 1)) / (1 - b2 ** t)      # 0 at t = 1: F = g ** 2
        F = b2t * F + (1 - b2t) * g ** 2                     # fim
        eps_t = eps * min(1, RMS(g))                         # eps if g is all zeros
        den = F ** p + eps_t
        gn = g / den;        gn = gn / max(1, RMS(gn) / clip)
        m = b1 * m + (1 - b1) * gn                           # momentum
        wn = param / den;    wn = wn / max(1, RMS(wn) / clip)
        param = param - lr * (m + weight_decay * wn)

    State: ``step``, ``fim`` and ``momentum`` (param-shaped). The RMS values are per-tensor
    reductions (sums of squares accumulated in float64); the elementwise math runs in float32 for
    bf16/fp16/fp32 params (float64 for float64).

    Notes and deviations: the rule above is Algorithm 1 as stated; no code by the paper's author
    was found to check it against. One version of a widely used community port
    (lessw2020/FAdam_PyTorch, ``fadam.py``) differs: its eps_t is ``min(eps, eps2 * RMS(g))``
    with a second ``eps2=1e-3``; its clip divisor is ``max(1, RMS) / clip`` (which also scales
    updates UP when clip > 1 and RMS <= 1) instead of ``max(1, RMS / clip)``; it initializes F to
    ones and rebinds ``fim`` without storing it, so its stored F stays at ones and each step uses
    ``b2t * 1 + (1 - b2t) * g^2``; defaults eps=1e-7, weight_decay=0.01. onepass follows the
    paper. An all-zero grad takes eps_t = eps: the rule's eps_t = 0 makes den = 0 wherever F is
    0 too (a param the forward pass did not use, after ``zero_grad(set_to_none=False)``), and
    0 / 0 would turn the whole tensor to NaN (pytorch-optimizer guards the same case). An empty
    tensor has RMS 0 (nothing to update). Without a GradScaler to skip the step, a NaN or inf
    in a tensor's gn or wn makes its RMS non-finite, and max(1, NaN) is NaN on every backend (as
    torch.clamp's): the whole tensor's update goes NaN, not only that element's. ``maximize``,
    GradScaler (grads
    unscaled before every reduction; an inf/nan skips the
    whole step, step counts included) and ``backend``/``flatten`` are onepass additions
    (``flatten=True`` keeps the params in one buffer, but the step stays per tensor).
    Checks: lr >= 0, eps >= 0, 0 <= betas < 1, clip > 0, 0 < p <= 1, weight_decay >= 0.
    """

    spec: ClassVar[AlgorithmSpec] = FADAM
    torch_keys: ClassVar[Mapping[str, Any]] = {"maximize": False}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        clip: float = 1.0,
        p: float = 0.5,
        weight_decay: float = 0.1,
        *,
        maximize: bool = False,
        capturable: bool = False,
        **options: Unpack[Options],
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "clip": clip,
            "p": p,
            "weight_decay": weight_decay,
            "maximize": maximize,
            # FAdam's decay is its own (wd * param / den, clipped); the key exists because every
            # onepass group has one (the engine and state_dict code read it).
            "decay": "l2",
            "capturable": capturable,
        }
        super().__init__(params, defaults, options)
