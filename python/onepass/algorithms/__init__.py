"""One module per algorithm: its spec (what every backend reads) and its pure-torch reference."""

from onepass.algorithms.adam import ADAM, AdamScalars, adam_reference
from onepass.algorithms.base import AlgorithmSpec
from onepass.algorithms.lion import LION, LionScalars, lion_reference
from onepass.algorithms.sgd import SGD_SPEC, SgdScalars, sgd_reference

__all__ = [
    "ADAM",
    "LION",
    "SGD_SPEC",
    "AdamScalars",
    "AlgorithmSpec",
    "LionScalars",
    "SgdScalars",
    "adam_reference",
    "lion_reference",
    "sgd_reference",
]
