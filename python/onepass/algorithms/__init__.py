"""One module per algorithm: its spec (what every backend reads) and its pure-torch reference."""

from onepass.algorithms.adam import ADAM, AdamScalars, adam_reference
from onepass.algorithms.base import AlgorithmSpec
from onepass.algorithms.fadam import FADAM, FAdamScalars, fadam_reference
from onepass.algorithms.lion import LION, LionScalars, lion_reference
from onepass.algorithms.muon import MUON, MuonScalars, muon_reference
from onepass.algorithms.novograd import NOVOGRAD, NovoGradScalars, novograd_reference
from onepass.algorithms.sgd import SGD_SPEC, SgdScalars, sgd_reference

__all__ = [
    "ADAM",
    "FADAM",
    "LION",
    "MUON",
    "NOVOGRAD",
    "SGD_SPEC",
    "AdamScalars",
    "AlgorithmSpec",
    "FAdamScalars",
    "LionScalars",
    "MuonScalars",
    "NovoGradScalars",
    "SgdScalars",
    "adam_reference",
    "fadam_reference",
    "lion_reference",
    "muon_reference",
    "novograd_reference",
    "sgd_reference",
]
