"""One module per algorithm: its spec (what every backend reads) and its pure-torch reference."""

from onepass.algorithms.adam import ADAM, AdamScalars, adam_reference
from onepass.algorithms.base import AlgorithmSpec
from onepass.algorithms.fadam import FADAM, FAdamScalars, fadam_reference
from onepass.algorithms.lion import LION, LionScalars, lion_reference
from onepass.algorithms.novograd import NOVOGRAD, NovoGradScalars, novograd_reference
from onepass.algorithms.sgd import SGD_SPEC, SgdScalars, sgd_reference

__all__ = [
    "ADAM",
    "FADAM",
    "LION",
    "NOVOGRAD",
    "SGD_SPEC",
    "AdamScalars",
    "AlgorithmSpec",
    "FAdamScalars",
    "LionScalars",
    "NovoGradScalars",
    "SgdScalars",
    "adam_reference",
    "fadam_reference",
    "lion_reference",
    "novograd_reference",
    "sgd_reference",
]
