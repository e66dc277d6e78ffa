"""onepass.SGD and onepass.SGDW: drop-in torch.optim.SGD with a fused step."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from onepass.algorithms.sgd import SGD_SPEC
from onepass.optim.base import FusedOptimizer, Options

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from onepass.algorithms.base import AlgorithmSpec


class SGD(FusedOptimizer):
    r"""SGD with momentum, the same arguments, defaults, state and results as torch.optim.SGD.

    For each param with a gradient::

        d = -g if maximize else g
        d = d + wd * p                        if decay == "l2" (torch.optim.SGD)
        p = p * (1 - lr * wd)                 if decay == "decoupled" (SGDW)
        p = p * (1 - lr / initial_lr * wd)    if decay == "independent"
        if momentum != 0:
            buf = d on the tensor's first step, else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d

    One pass over memory per (group, device, dtype) bucket; math in float32 for bf16/fp16 and
    float64 for float64. ``foreach`` and ``fused`` are accepted and ignored. ``backend`` and
    ``flatten`` are as in :class:`onepass.Adam`.
    """

    spec: ClassVar[AlgorithmSpec] = SGD_SPEC
    torch_keys: ClassVar[Mapping[str, Any]] = {
        "nesterov": False,
        "maximize": False,
        "foreach": None,
        "differentiable": False,
        "fused": None,
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        decay: str = "l2",
        capturable: bool = False,
        **options: Unpack[Options],
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
            "decay": decay,
            "capturable": capturable,
        }
        super().__init__(params, defaults, options)


class SGDW(SGD):
    r"""SGDW (Loshchilov & Hutter, 2019): SGD with decoupled weight decay.

    ``p = p - lr * d - lr * wd * p_old``, i.e. ``decay="decoupled"`` in :class:`SGD`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        decay: str = "decoupled",
        capturable: bool = False,
        **options: Unpack[Options],
    ) -> None:
        super().__init__(
            params,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
            decay=decay,
            capturable=capturable,
            **options,
        )
