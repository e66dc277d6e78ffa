"""onepass: fused optimizer steps for PyTorch, one pass over memory.

Swap ``torch.optim.AdamW`` for ``onepass.AdamW`` (same arguments, param groups and state_dict).
"""

import torch

from onepass._engine import BACKENDS
from onepass._ops import (
    cpu_capabilities,
    cpu_capability,
    native_available,
    set_cpu_capability,
)
from onepass.amp import GradScaler
from onepass.optim import SGD, SGDW, Adam, AdamW, FAdam, FusedOptimizer, Lion, Muon, NovoGrad


def clip_grad_norm_(
    optimizer: FusedOptimizer,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over ``optimizer``'s params, fused into its next step:
    returns the total norm now; the step scales the grads in its own pass (no pass rewriting
    them) and skips on a non-finite norm. See :meth:`FusedOptimizer.clip_grad_norm_`."""
    return optimizer.clip_grad_norm_(max_norm, norm_type, error_if_nonfinite)


__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "SGD",
    "SGDW",
    "Adam",
    "AdamW",
    "FAdam",
    "FusedOptimizer",
    "GradScaler",
    "Lion",
    "Muon",
    "NovoGrad",
    "clip_grad_norm_",
    "cpu_capabilities",
    "cpu_capability",
    "native_available",
    "set_cpu_capability",
]
