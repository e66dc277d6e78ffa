"""Drop-in torch.optim optimizers with fused steps."""

from onepass.optim.adam import Adam, AdamW
from onepass.optim.base import FusedOptimizer
from onepass.optim.fadam import FAdam
from onepass.optim.lion import Lion
from onepass.optim.muon import Muon
from onepass.optim.novograd import NovoGrad
from onepass.optim.sgd import SGD, SGDW

__all__ = [
    "SGD",
    "SGDW",
    "Adam",
    "AdamW",
    "FAdam",
    "FusedOptimizer",
    "Lion",
    "Muon",
    "NovoGrad",
]
