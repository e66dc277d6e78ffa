"""onepass.GradScaler: torch.amp.GradScaler without its own pass over the grads when the step
clips anyway."""

from __future__ import annotations

from typing import Any

import torch

from onepass.optim.base import FusedOptimizer


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler``, the same arguments and behaviour, plus one saving: before a
    onepass optimizer's step that clips (``max_grad_norm=``, or ``onepass.clip_grad_norm_`` called
    before ``scaler.step``), it takes ``found_inf`` from the global grad norm that the clip
    computes anyway (a non-finite grad makes the norm non-finite) instead of its own inf check,
    which reads and rewrites every grad. The step then unscales, clips and updates in one pass.

    Any other optimizer, and any onepass optimizer that does not clip, goes through torch's
    check unchanged. One difference: on a GPU, where the norm is torch's in the grads' dtype, a
    norm that overflows it (fp16 grads whose norm passes 65504) counts as an inf, so the scale
    backs off (the CPU norm is float32).
    """

    def _check_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict[Any, Any]:
        if not isinstance(optimizer, FusedOptimizer) or not optimizer.clips_next_step():
            return super()._check_inf_per_device(optimizer)
        scale, _ = self._check_scale_growth_tracker("_check_inf_per_device")
        norm = optimizer.norm_for_next_step()
        found_inf = (~torch.isfinite(norm)).to(torch.float32).to(scale.device).reshape(())
        per_device = {scale.device: found_inf}
        self._per_optimizer_states[id(optimizer)]["found_inf_per_device"] = per_device
        return per_device
