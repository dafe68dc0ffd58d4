"""Say what went wrong when numbers stop being finite: the input, or the training itself.

Checked in ``training_step`` before the backward, so a NaN image or a diverged loss is reported as such
(naming the step) instead of surfacing later as a reconstruction failure inside an adjoint stage.
"""

from __future__ import annotations

import torch


class TrainingDivergedError(FloatingPointError):
    """The loss is NaN or infinite on finite inputs: the training diverged (learning rate, precision, data scale)."""


class NonFiniteInputError(ValueError):
    """A training batch holds NaN or infinite values: the data, not the model, is at fault."""


def check_finite_input(images: torch.Tensor, step: int) -> None:
    """Raise ``NonFiniteInputError`` naming the step and how many values are bad."""
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images)).sum())
        raise NonFiniteInputError(
            f"training batch at step {step} holds {bad} NaN or infinite input value(s) of {images.numel()}; "
            "check the dataset and its transforms (normalisation by a zero std, corrupt files)"
        )


def check_finite_loss(loss: torch.Tensor, step: int, lr: float | None = None) -> None:
    """Raise ``TrainingDivergedError`` naming the step (and the learning rate) when the loss is not finite."""
    if not bool(torch.isfinite(loss.detach()).all()):
        at_lr = f" at learning rate {lr:.3g}" if lr is not None else ""
        raise TrainingDivergedError(
            f"the training diverged: loss is {float(loss.detach().float().mean())} at step {step}{at_lr} on finite "
            "inputs. Lower model.lr (or add warm-up: model.warmup_epochs), or train in 32-bit or bf16-mixed "
            "precision; resume from a checkpoint saved before the divergence"
        )
