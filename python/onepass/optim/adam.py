"""onepass.Adam and onepass.AdamW: drop-in torch.optim.Adam / AdamW with a fused step."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from onepass.algorithms.adam import ADAM
from onepass.optim.base import FusedOptimizer, Options

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from onepass.algorithms.base import AlgorithmSpec

_TORCH_ADAM_KEYS = {
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
}


class Adam(FusedOptimizer):
    r"""Adam (Kingma & Ba, 2015): the arguments, defaults, state and results of torch.optim.Adam.

    For each param with a gradient, with t its own step count::

        g = -g if maximize else g
        g = g + wd * p                        if decay == "l2"          (Adam)
        p = p * (1 - lr * wd)                 if decay == "decoupled"   (AdamW)
        p = p * (1 - lr / initial_lr * wd)    if decay == "independent" (Wortsman et al.)
        m = lerp(m, g, 1 - beta1)             # exp_avg
        v = beta2 * v + (1 - beta2) * g^2     # exp_avg_sq
        v_hat = max(v_max, v) if amsgrad else v   # max_exp_avg_sq
        p = p - lr / (1 - beta1^t) * m / (sqrt(v_hat) / sqrt(1 - beta2^t) + eps)

    All of it is one pass over memory per (group, device, dtype) bucket. Math in float32 for
    bf16/fp16 params (torch's for-loop Adam rounds every intermediate to the param dtype instead)
    and in float64 for float64. ``foreach`` and ``fused`` are accepted for compatibility and
    ignored (the step is always fused); ``differentiable`` is refused. ``capturable=True`` (CUDA
    params, backend "cuda") keeps the lr, betas, eps and weight decay on the device (the group's
    entries become views of one device block, onepass._capturable), so that a step captured in
    a CUDA graph replays with the values current at each replay.

    Args:
        decay: "l2" (default for Adam), "decoupled" (AdamW) or "independent" (decay follows the
            lr schedule's shape but not its peak: p *= 1 - lr/initial_lr * wd).
        backend: "auto" (the native CPU kernels for CPU tensors; on CUDA the faster of the
            CUDA and Triton kernels as measured, onepass._engine.auto_gpu_backend; the pure-torch
            reference where neither applies, with a RuntimeWarning for CPU and CUDA tensors),
            "cpu", "cuda", "triton" or "reference". An explicit backend this build or device
            cannot run is refused with the reason.
        flatten: move the params that have a grad into one flat buffer per bucket at the first
            step (``p.data`` and ``p.grad`` become views), so a step is one contiguous pass with
            no per-tensor work: the fast path for thousands of small tensors, while the grads
            stay those views: ``zero_grad(set_to_none=False)`` zeroes them in place, where
            ``zero_grad()`` drops them as torch.optim does (a param backward does not reach is
            not stepped; backward's fresh grads take the per-tensor path). Params that never
            get a grad are not flattened.
    """

    spec: ClassVar[AlgorithmSpec] = ADAM
    capture_needs_capturable: ClassVar[bool] = True
    torch_keys: ClassVar[Mapping[str, Any]] = {**_TORCH_ADAM_KEYS, "decoupled_weight_decay": False}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        decay: str | None = None,
        **options: Unpack[Options],
    ) -> None:
        if decay is None:
            decay = "decoupled" if decoupled_weight_decay else "l2"
        elif decoupled_weight_decay and decay == "l2":  # (False may be the default: not told)
            raise ValueError(
                "decoupled_weight_decay=True but decay='l2'; give one of them ('l2' is "
                "decoupled_weight_decay=False, 'decoupled' and 'independent' are True)"
            )
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decay != "l2",
            "decay": decay,
        }
        super().__init__(params, defaults, options)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # A group that gives torch's key or onepass's gets the other to match, not the
        # constructor's default (torch.optim.Adam reads decoupled_weight_decay per group).
        if "decay" not in param_group and "decoupled_weight_decay" in param_group:
            param_group["decay"] = "decoupled" if param_group["decoupled_weight_decay"] else "l2"
        elif "decay" in param_group and "decoupled_weight_decay" not in param_group:
            param_group["decoupled_weight_decay"] = param_group["decay"] != "l2"
        super().add_param_group(param_group)

    def _decay_from_torch(self, group: Mapping[str, Any]) -> str:
        return "decoupled" if group.get("decoupled_weight_decay") else "l2"


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay, = torch.optim.AdamW.

    ``p = p * (1 - lr * wd)`` before the Adam update (see :class:`Adam` for the whole rule).
    ``decay="independent"`` gives ``p = p * (1 - lr / initial_lr * wd)`` instead.
    """

    torch_keys: ClassVar[Mapping[str, Any]] = {**_TORCH_ADAM_KEYS, "decoupled_weight_decay": True}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decay: str = "decoupled",
        **options: Unpack[Options],
    ) -> None:
        if "decoupled_weight_decay" in options:  # Adam's keyword, which torch's AdamW refuses
            raise TypeError(
                "AdamW.__init__() got an unexpected keyword argument 'decoupled_weight_decay'"
            )
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decay=decay,
            **options,
        )

    def _decay_from_torch(self, group: Mapping[str, Any]) -> str:
        return "decoupled"
