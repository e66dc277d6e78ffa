"""onepass.NovoGrad: NovoGrad with a fused step."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from onepass.algorithms.novograd import NOVOGRAD
from onepass.optim.base import FusedOptimizer, Options

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from onepass.algorithms.base import AlgorithmSpec


class NovoGrad(FusedOptimizer):
    r"""NovoGrad (Ginsburg, Castonguay, Hrinchuk, Kuchaiev, Lavrukhin, Leary, Li, Nguyen, Zhang &
    Cohen, 2019, "Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training of
    Deep Networks"): Adam-like, but with ONE second moment per tensor (layer) instead of one per
    element, and the decay inside the momentum.

    For each param with a gradient, t its own step count (a param whose grad was None does not
    advance)::

        g = -g if maximize else g
        n = sum(g ** 2)                                 # per tensor, accumulated in float64
        v = n                     if t == 1             # exp_avg_sq (0-d)
        v = beta2 * v + (1 - beta2) * n   otherwise
        v_max = max(v_max, v), used for v               if amsgrad (max_exp_avg_sq, 0-d)
        u = g / (sqrt(v) + eps) + weight_decay * p
        m = u                     if t == 1             # exp_avg
        m = beta1 * m + s * u     otherwise,  s = 1 - beta1 if grad_averaging else 1
        p = p - lr * m

    No bias correction (as the paper). State: ``step``, ``exp_avg`` (param-shaped),
    ``exp_avg_sq`` and with amsgrad ``max_exp_avg_sq`` (0-d, float32 for 16/32-bit params,
    float64 for float64): torch-optimizer's NovoGrad names, so its checkpoints load.

    Deviations from torch-optimizer's NovoGrad: the first step is chosen by the tensor's step
    count, not by ``exp_avg_sq == 0`` (a tensor whose first grads are all zero starts its
    averages when it starts, not later); the first step's ``exp_avg`` is ``u`` itself, as in the
    paper, also with ``grad_averaging=True`` (torch-optimizer starts it from 0 and adds
    ``(1 - b1) * u``, so its first ``exp_avg`` is ``(1 - b1) * u`` there); ``maximize``,
    GradScaler and ``backend``/``flatten`` are onepass additions (``flatten=True`` keeps the
    params in one buffer, but the step is per tensor, since the second moment is). Math in
    float32 for bf16/fp16 (float64 for float64), the sums of squares in float64 for every dtype.
    """

    spec: ClassVar[AlgorithmSpec] = NOVOGRAD
    torch_keys: ClassVar[Mapping[str, Any]] = {
        "maximize": False,
        "grad_averaging": False,
        "amsgrad": False,
    }

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.95, 0.98),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        grad_averaging: bool = False,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        capturable: bool = False,
        **options: Unpack[Options],
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "grad_averaging": grad_averaging,
            "amsgrad": amsgrad,
            "maximize": maximize,
            # The paper's decay, inside the momentum; kept as a key because every onepass group
            # has one (the engine and state_dict code read it).
            "decay": "l2",
            "capturable": capturable,
        }
        super().__init__(params, defaults, options)
