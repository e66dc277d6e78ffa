"""One module per algorithm: its spec (what every backend reads) and its pure-torch reference."""

from onepass.algorithms.adam import ADAM, AdamScalars, adam_reference
from onepass.algorithms.base import AlgorithmSpec
from onepass.algorithms.sgd import SGD_SPEC, SgdScalars, sgd_reference

__all__ = [
    "ADAM",
    "SGD_SPEC",
    "AdamScalars",
    "AlgorithmSpec",
    "SgdScalars",
    "adam_reference",
    "sgd_reference",
]
