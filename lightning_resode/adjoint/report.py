"""What one backward of a stage measured, handed out through hooks registered on the stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .plan import StagePlan


@dataclass
class BackwardReport:
    """What one stage's backward did and measured (given to ``AdjointSequential.register_report_hook`` hooks)."""

    scheme: str
    gradient: str
    steps: int
    block_forwards: int
    #: ‖x̂_0 - x_0‖ / ‖x_0‖ at the input of the reconstructed part; None when x_0 was not kept. Behind an exact head,
    #: measured on every 4th row and column (all images and channels) of states of 8×8 positions or more
    reconstruction_error: float | None = None
    anchor_count: int = 0
    #: the approximate gradient was replaced by an exact recomputation (see ``AdjointSequential.fallback``)
    fell_back: bool = False
    #: why it fell back (non-finite reconstruction, reconstruction error above the stage's bound, overflow)
    fallback_reason: str | None = None
    #: the plan the call followed (its ``method`` is what ran, and ``reason`` why it differs from the stage's)
    plan: "StagePlan | None" = None

    @property
    def method(self) -> str | None:
        """The method this backward ran (``lightning_resode.adjoint.methods``)."""
        return None if self.plan is None else self.plan.method
