"""The only places lightning-resode touches Lightning internals, kept together so an upgrade breaks here.

Each function below does one thing Lightning has no public API for, and says why we need it. Every other
module calls these instead of reaching into Lightning's private attributes itself. If Lightning renames or
drops one of them, ``LightningInternalsChanged`` names the attribute and what it was used for, and
tests/test_lightning_private.py fails on a real Trainer before any user sees it.
"""

from __future__ import annotations

from typing import Any

import lightning
import lightning.pytorch as pl
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import ParallelStrategy

__all__ = [
    "LIGHTNING_PRIVATE_METHODS",
    "LightningInternalsChanged",
    "averaged_model",
    "forget_train_loader",
    "logging_step",
    "optimizer_stepped_on_this_batch",
    "quiet_wandb_init",
    "request_stop_after_batch",
    "sync_batchnorm_requested",
    "train_loaders",
]


#: Private methods of Lightning classes that our subclasses override or call, because no public hook does the job:
#: ("module.Class", method) -> (the parameters it has in the Lightning release we test, why we need it).
#: tests/test_lightning_private.py fails if a subclass overrides or calls another Lightning private method without
#: listing it here, or if Lightning changes one of these (gone, or other parameters).
LIGHTNING_PRIVATE_METHODS: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("lightning.pytorch.cli.LightningCLI", "_parse_ckpt_path"): (
        ("self",),
        "ResodeCLI: LightningCLI rebuilds the model from the checkpoint's hyperparameters over the config; ours keeps "
        "the config the source of truth and resolves 'last' to the file with the most progress",
    ),
    ("lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint", "_save_last_checkpoint"): (
        ("self", "trainer", "monitor_candidates"),
        "ResodeModelCheckpoint: last.ckpt overwritten atomically (never versioned) at every epoch end, max_steps and "
        "clean stop; Lightning writes it only with a monitored checkpoint",
    ),
    ("lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint", "_find_last_checkpoints"): (
        ("self", "trainer"),
        "ResodeModelCheckpoint: --ckpt_path last resumes the checkpoint with the most progress, not the newest file",
    ),
    ("lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint", "_monitor_candidates"): (
        ("self", "trainer"),
        "ResodeModelCheckpoint: the metrics a last.ckpt name is formatted with, as Lightning's own saves use",
    ),
    ("lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint", "_should_save_on_train_epoch_end"): (
        ("self", "trainer"),
        "ResodeModelCheckpoint: whether Lightning saves at the epoch end (then last.ckpt waits for it, or Lightning "
        "would skip that step's monitored save)",
    ),
}


class LightningInternalsChanged(RuntimeError):
    """Lightning no longer has an internal attribute lightning-resode relies on (a Lightning upgrade changed it)."""


def _internal(owner: Any, name: str, purpose: str) -> Any:
    try:
        return getattr(owner, name)
    except AttributeError:
        raise LightningInternalsChanged(
            f"lightning-resode reads Lightning's private {type(owner).__name__}.{name} to {purpose}, and "
            f"lightning {lightning.__version__} no longer has it. Install the Lightning version lightning-resode "
            "was tested with (2.6) or update lightning_resode/lit/_lightning_private.py"
        ) from None


def logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning's loggers give the metrics of the current training batch (what ``self.log`` writes).

    Callbacks that log straight to ``trainer.loggers`` use it so their points line up with the module's on
    the same x axis. It counts batches that stepped the optimizer (not ``global_step``, which counts
    optimizer steps and has already advanced in ``on_train_batch_end``); Lightning's own
    ``LearningRateMonitor`` and ``DeviceStatsMonitor`` read the same counter, which has no public accessor.
    """
    loop = trainer.fit_loop.epoch_loop
    return int(_internal(loop, "_batches_that_stepped", "log callback metrics at the step Lightning logs"))


def request_stop_after_batch(trainer: pl.Trainer) -> None:
    """Raise the flag Lightning sets on SIGTERM, so training stops after the current batch as for SIGTERM.

    Lightning then raises ``SIGTERMException`` at the end of the batch, where model, optimizer and loop
    counters agree. The public ``trainer.received_sigterm`` only reads this flag; sending ourselves SIGTERM
    instead would also make Lightning kill child processes and broadcast from inside a signal handler.
    """
    connector = _internal(trainer, "_signal_connector", "stop after this batch on Ctrl-C as on SIGTERM")
    _internal(connector, "received_sigterm", "stop after this batch on Ctrl-C as on SIGTERM")
    connector.received_sigterm = True


def sync_batchnorm_requested(trainer: pl.Trainer) -> bool:
    """Whether ``Trainer(sync_batchnorm=True)`` will convert BatchNorm layers to SyncBatchNorm.

    Lightning converts them in ``strategy.setup``, after ``LightningModule.setup``; the request is only
    visible earlier as the parallel strategy's layer-sync plugin (there is no public accessor). Strategies
    that do not run several processes ignore the flag.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, ParallelStrategy):
        return False
    return _internal(strategy, "_layer_sync", "refuse sync_batchnorm=True before it converts adjoint stages") is not None


def quiet_wandb_init(logger: WandbLogger) -> None:
    """Drop the ``anonymous`` argument ``WandbLogger`` always passes to ``wandb.init``.

    W&B warns at every start that the setting has no effect, whatever its value (``None`` included); the
    logger's constructor has no way to leave it out, and ``wandb.init`` reads the arguments only when the run
    starts, so removing it before then is enough.
    """
    arguments = _internal(logger, "_wandb_init", "keep W&B from warning about the anonymous setting")
    arguments.pop("anonymous", None)


def averaged_model(callback: WeightAveraging) -> Any:
    """The ``AveragedModel`` of Lightning's weight averaging (``None`` before it is created).

    ``ModelEma`` creates it later than Lightning does (once the module has its final layers) and moves it to
    the module's device; the callback keeps it in an attribute without a public accessor.
    """
    return _internal(callback, "_average_model", "create the EMA copy once the module is final")


def optimizer_stepped_on_this_batch(trainer: pl.Trainer) -> bool:
    """In ``on_train_batch_end``: whether this batch ended an optimizer step (not an accumulation micro-batch).

    Sampling callbacks measure once per optimizer step; with ``accumulate_grad_batches=k`` the step count
    stays the same for k batches. Lightning's own decision (last batch of the window, or of the epoch) has no
    public accessor.
    """
    loop = trainer.fit_loop.epoch_loop
    should_accumulate = _internal(loop, "_should_accumulate", "measure once per optimizer step when accumulating")
    return not should_accumulate()


def train_loaders(trainer: pl.Trainer) -> list[Any]:
    """The training DataLoaders of the running fit (empty before the fit loop built them)."""
    combined = _internal(trainer.fit_loop, "_combined_loader", "rewind resumable loaders on a failed batch")
    return [] if combined is None else list(combined.flattened)


def forget_train_loader(trainer: pl.Trainer) -> None:
    """Drop a training loader built before the checkpoint restore (``configure_optimizers`` needs its length).

    The fit loop then builds it again after the restore, which is when Lightning hands resumable loaders their
    position from the checkpoint; a loader kept from before would silently restart the epoch.
    """
    _internal(trainer.fit_loop, "_combined_loader", "rebuild the training loader after the checkpoint restore")
    trainer.fit_loop._combined_loader = None
