"""The engine: memory-free residual stages (depends on torch only)."""

from .errors import AdjointError, DoubleBackwardError, ReconstructionError, ShapeChangeError
from .function import BackwardReport
from .schemes import SCHEMES, Scheme, get_scheme
from .stage import GRADIENTS, AdjointSequential

__all__ = [
    "GRADIENTS",
    "SCHEMES",
    "AdjointError",
    "AdjointSequential",
    "BackwardReport",
    "DoubleBackwardError",
    "ReconstructionError",
    "Scheme",
    "ShapeChangeError",
    "get_scheme",
]
