"""Which Lightning strategies can train adjoint stages, checked when training starts.

An adjoint stage recomputes its blocks inside its own backward. That is safe under data parallelism
(DDP keeps a full replica per rank; every parameter is an input of the stage's autograd Function, so
each gets its gradient exactly once per backward and DDP's hooks fire once). It is not safe where
recomputation would touch other ranks:

- SyncBatchNorm all-gathers batch statistics. Replayed in backward, only the rank that reaches that
  block issues the collective, in an order the other ranks do not share: a hang, or mixed statistics.
- FSDP and DeepSpeed shard parameters and gather them around each module's forward/backward with hooks.
  The stage's recomputation runs inside one autograd Function, outside those hooks, so it would see
  sharded (or freed) weights.

``validate_distributed`` turns these into a clear error at ``setup`` time, before the first batch,
instead of a hang or an error deep inside the first backward.
"""

from __future__ import annotations

from collections.abc import Iterable

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from torch import nn

from ..adjoint import AdjointError, AdjointSequential
from ._lightning_private import sync_batchnorm_requested

#: the strategy names users can pass as ``--trainer.strategy`` with adjoint stages (tested on gloo + CPU)
SUPPORTED_STRATEGIES: tuple[str, ...] = ("ddp", "ddp_spawn", "single-device")


class DistributedSetupError(AdjointError, ValueError):
    """A Trainer setting that cannot train the model's adjoint stages (raised before training starts)."""


def validate_distributed(trainer: Trainer, module: nn.Module) -> None:
    """Raise ``DistributedSetupError`` if ``trainer`` cannot train ``module``'s adjoint stages.

    Call it from ``LightningModule.setup``: it runs on every rank after the strategy is chosen and before
    Lightning applies ``sync_batchnorm``. Stages configured with ``gradient="backprop"`` use plain autograd
    and are not restricted. A module without adjoint stages passes unchanged.
    """
    stages = _recomputing_stages(module.modules())
    if not stages:
        return
    _check_strategy(trainer.strategy, stages)
    _check_sync_batchnorm(trainer, stages)


def _recomputing_stages(modules: Iterable[nn.Module]) -> list[AdjointSequential]:
    return [m for m in modules if isinstance(m, AdjointSequential) and m.gradient != "backprop"]


def _stage_names(stages: list[AdjointSequential]) -> str:
    return ", ".join(stage.display_name for stage in stages)


def _check_strategy(strategy: Strategy, stages: list[AdjointSequential]) -> None:
    # DDPStrategy covers ddp, ddp_spawn, ddp_fork and ddp_notebook (same wrapper, other launchers).
    if isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)):
        return
    name = getattr(strategy, "strategy_name", None) or type(strategy).__name__
    raise DistributedSetupError(
        f"strategy {name!r} ({type(strategy).__name__}) cannot train adjoint stages ({_stage_names(stages)}): "
        "it shards or gathers parameters around each module with hooks, and the stages recompute their "
        "blocks inside their own backward, outside those hooks. Supported strategies: "
        f"{', '.join(SUPPORTED_STRATEGIES)}. To keep this strategy, convert the stages back (gradient='backprop')"
    )


def _check_sync_batchnorm(trainer: Trainer, stages: list[AdjointSequential]) -> None:
    # Lightning converts BatchNorm to SyncBatchNorm in strategy.setup, after LightningModule.setup.
    if sync_batchnorm_requested(trainer):
        raise DistributedSetupError(
            f"Trainer(sync_batchnorm=True) would turn the BatchNorm layers of the adjoint stages "
            f"({_stage_names(stages)}) into SyncBatchNorm, whose statistics collective cannot be replayed in "
            "the stages' backward (unmatched collectives across ranks). Use sync_batchnorm=False: plain "
            "BatchNorm with per-device statistics, the usual choice when each device holds a batch of 16+ "
            "images. Or train these stages with gradient='backprop'"
        )
    offenders = [
        f"{stage.display_name}.{name}"
        for stage in stages
        for name, sub in stage.named_modules()
        if isinstance(sub, nn.SyncBatchNorm)
    ]
    if offenders:
        raise DistributedSetupError(
            f"SyncBatchNorm inside adjoint stages ({', '.join(offenders)}) cannot be replayed in backward "
            "(unmatched collectives across ranks). Convert them back to BatchNorm "
            "(lightning.pytorch.plugins.TorchSyncBatchNorm().revert(model)) for per-device statistics, "
            "or train these stages with gradient='backprop'"
        )
