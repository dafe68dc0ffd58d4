"""Model EMA on Lightning's own weight averaging, created after the module has taken its final shape."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging

from ._lightning_private import averaged_model


class ModelEma(EMAWeightAveraging):
    """An exponential moving average of the weights (``ResodeClassifier(ema_decay=…)`` adds it to ``fit``).

    Lightning's ``EMAWeightAveraging``: validation runs on the averaged weights, checkpoints store them as
    ``state_dict`` (the live ones under ``current_model_state``, for resuming) and the module ends ``fit``
    holding them. Lightning copies the module in the callbacks' ``setup``, which runs before the module's own
    ``setup`` where ``ResodeClassifier`` converts stages (``scheme=auto``) and freezes layers (frozen BatchNorm
    has other buffers); the copy is therefore taken when the module is final: when a checkpoint is restored or
    when ``fit`` starts, whichever comes first.
    """

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1) -> None:
        super().__init__(decay=decay, update_every_n_steps=update_every_n_steps)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Deferred (see the class docstring)."""

    def _average_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        average = averaged_model(self)
        if average is None:
            super().setup(trainer, pl_module, "fit")
        else:  # taken on restore, before the strategy moved the module to its device
            average.to(pl_module.device)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == "fit":
            self._average_now(trainer, pl_module)
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._average_now(trainer, pl_module)
