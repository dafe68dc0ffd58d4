"""Loud failures of the engine: each names the stage and block, and what would be valid."""


class AdjointError(RuntimeError):
    """Base class for the engine's errors."""


class ShapeChangeError(AdjointError, ValueError):
    """A block inside an adjoint stage changed the shape of the state, so it cannot be reconstructed."""


class ReconstructionError(AdjointError):
    """A backward reconstruction produced non-finite values; the step is stopped before weights change."""


class DoubleBackwardError(AdjointError):
    """Double backward (``create_graph=True``) through an adjoint stage is not supported."""
