"""onepass.Lion: the Lion optimizer with a fused step."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from onepass.algorithms.lion import LION
from onepass.optim.base import FusedOptimizer, Options

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from onepass.algorithms.base import AlgorithmSpec


class Lion(FusedOptimizer):
    r"""Lion, EvoLved Sign Momentum (Chen et al., 2023, "Symbolic Discovery of Optimization
    Algorithms"; its decoupled decay read as a constraint in Chen, Liang, Liu & Liu, 2023, "Lion
    secretly solves constrained optimization").

    For each param with a gradient::

        g = -g if maximize else g
        g = g + wd * p                        if decay == "l2"
        p = p * (1 - lr * wd)                 if decay == "decoupled" (the paper's, default)
        p = p * (1 - lr / initial_lr * wd)    if decay == "independent"
        c = beta1 * m + (1 - beta1) * g
        p = p - lr * sign(c)                  # sign(0) = 0
        m = beta2 * m + (1 - beta2) * g       # exp_avg

    Every element moves by exactly lr (plus decay), so Lion wants an lr 3-10x smaller than
    AdamW's and a weight decay 3-10x larger. State: ``exp_avg`` only (lion-pytorch's name and
    layout, no ``step``). One pass over memory per (group, device, dtype) bucket; math in float32
    for bf16/fp16 and float64 for float64. ``backend`` and ``flatten`` are as in
    :class:`onepass.Adam`.
    """

    spec: ClassVar[AlgorithmSpec] = LION
    torch_keys: ClassVar[Mapping[str, Any]] = {"maximize": False}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        decay: str = "decoupled",
        capturable: bool = False,
        **options: Unpack[Options],
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "decay": decay,
            "capturable": capturable,
        }
        super().__init__(params, defaults, options)
