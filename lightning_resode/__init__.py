"""lightning-resode: fine-tune very deep timm ResNets with memory-free residual stages."""

from .adjoint import (
    AdjointError,
    AdjointSequential,
    BackwardReport,
    DoubleBackwardError,
    ReconstructionError,
    ShapeChangeError,
)
from .convert import adjoint_stages, from_adjoint, to_adjoint
from .diagnose import diagnose
from .measure import saved_activation_bytes

__version__ = "0.1.0"

__all__ = [
    "AdjointError",
    "AdjointSequential",
    "BackwardReport",
    "DoubleBackwardError",
    "ReconstructionError",
    "ShapeChangeError",
    "adjoint_stages",
    "diagnose",
    "from_adjoint",
    "to_adjoint",
    "saved_activation_bytes",
]
