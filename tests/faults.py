"""Fault injection for the reliability tests: real signals and a real divergence, at a chosen step.

Used from the CLI as ``--trainer.callbacks+=faults.SignalAtStep`` (the tests folder is on ``sys.path``).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as pl


class SignalAtStep(pl.Callback):
    """Sends a real signal to this process once optimizer step ``step`` has finished."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class ExplodeLearningRate(pl.Callback):
    """From optimizer step ``step`` on, trains with a learning rate that makes any network diverge."""

    def __init__(self, step: int, lr: float = 1e12) -> None:
        self.step, self.lr = step, lr

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = self.lr


class FailAtStep(pl.Callback):
    """Raises in the middle of the batch that would make optimizer step ``step + 1`` (after its data was fetched)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"injected failure at step {self.step}")
