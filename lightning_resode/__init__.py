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


def __getattr__(name: str) -> object:
    # OdeResNet needs timm (seconds to import); load it on first use so `import lightning_resode` stays light.
    # Importing lightning_resode.ode_resnet also registers the "ode_resnet" timm model.
    if name == "OdeResNet":
        from .ode_resnet import OdeResNet

        return OdeResNet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdjointError",
    "AdjointSequential",
    "BackwardReport",
    "DoubleBackwardError",
    "ReconstructionError",
    "OdeResNet",
    "ShapeChangeError",
    "adjoint_stages",
    "diagnose",
    "from_adjoint",
    "to_adjoint",
    "saved_activation_bytes",
]
