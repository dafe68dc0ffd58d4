"""The engine: memory-free residual stages (depends on torch only)."""

from .errors import AdjointError, DoubleBackwardError, ReconstructionError, ShapeChangeError
from .plan import MIN_VALUES_PER_CHANNEL, PlanLog, StagePlan, measuring, min_values_per_channel, planned
from .report import BackwardReport
from .schemes import SCHEMES, Scheme, get_scheme
from .stage import GRADIENTS, AdjointSequential

__all__ = [
    "GRADIENTS",
    "MIN_VALUES_PER_CHANNEL",
    "SCHEMES",
    "AdjointError",
    "AdjointSequential",
    "BackwardReport",
    "DoubleBackwardError",
    "PlanLog",
    "ReconstructionError",
    "Scheme",
    "ShapeChangeError",
    "StagePlan",
    "get_scheme",
    "measuring",
    "min_values_per_channel",
    "planned",
]
