"""lightning-resode: fine-tune very deep timm ResNets with memory-free residual stages.

The names below are imported on first use, so ``lightning-resode --help`` and other light commands start
without loading torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AdjointError": ".adjoint",
    "AdjointSequential": ".adjoint",
    "BackwardReport": ".adjoint",
    "DoubleBackwardError": ".adjoint",
    "ReconstructionError": ".adjoint",
    "ShapeChangeError": ".adjoint",
    "adjoint_stages": ".convert",
    "diagnose": ".diagnose",
    "from_adjoint": ".convert",
    "to_adjoint": ".convert",
    "policy_of": ".convert",
    "saved_activation_bytes": ".measure",
    "peak_per_image": ".measure",
    "OdeResNet": ".ode_resnet",  # importing it also registers the "ode_resnet" timm model
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .adjoint import (
        AdjointError,
        AdjointSequential,
        BackwardReport,
        DoubleBackwardError,
        ReconstructionError,
        ShapeChangeError,
    )
    from .convert import adjoint_stages, from_adjoint, policy_of, to_adjoint
    from .diagnose import diagnose
    from .measure import peak_per_image, saved_activation_bytes
    from .ode_resnet import OdeResNet


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_resode' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _Package(types.ModuleType):
    """Keeps ``lightning_resode.diagnose`` the function: importing the submodule of the same name (which the import
    system records as an attribute of the package) must not replace it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == f".{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
