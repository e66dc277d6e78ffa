"""onepass: fused optimizer steps for PyTorch, one pass over memory.

Swap ``torch.optim.AdamW`` for ``onepass.AdamW`` (same arguments, param groups and state_dict).
"""

from onepass._engine import BACKENDS
from onepass._ops import (
    cpu_capabilities,
    cpu_capability,
    native_available,
    set_cpu_capability,
)
from onepass.optim import SGD, SGDW, Adam, AdamW, FAdam, FusedOptimizer, Lion, Muon, NovoGrad

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "SGD",
    "SGDW",
    "Adam",
    "AdamW",
    "FAdam",
    "FusedOptimizer",
    "Lion",
    "Muon",
    "NovoGrad",
    "cpu_capabilities",
    "cpu_capability",
    "native_available",
    "set_cpu_capability",
]
