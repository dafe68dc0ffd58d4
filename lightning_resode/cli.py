"""lightning-resode: fine-tune timm ResNets with memory-free stages (fit, validate, test, predict, diagnose).

    lightning-resode fit --config recipes/quickstart.yaml [--trainer.max_epochs=3 --model.scheme=heun …]
    lightning-resode fit --config recipes/quickstart.yaml --ckpt_path last        # resume
    lightning-resode diagnose --config recipes/quickstart.yaml [--diagnose.output diag.json]

The recipe is the source of truth: every option is a typed constructor argument, parsed (and rejected,
naming the bad key or value) before anything trains. Besides ``trainer``/``model``/``data``, a recipe has
``memory``, ``fidelity``, ``reconstruction`` and ``checkpoint`` (the callbacks) and ``logging`` (loggers).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from .convert import adjoint_stages
from .lit import data as _data  # noqa: F401  (makes the DataModules resolvable by class name)
from .lit.callbacks import FitSummary, GradientFidelity, InterruptCheckpoint, MemoryMonitor, ReconstructionMonitor
from .lit.loggers import build_loggers
from .lit.module import ResodeClassifier

_DIAGNOSE = "diagnose"


def _checkpoint_dir(root_dir: str | None) -> str:
    """Checkpoints live at a fixed place under the run root, so ``--ckpt_path last`` finds them on resume."""
    return os.path.join(root_dir or os.getcwd(), "checkpoints")


def _diagnose_options(batch_images: int = 8, output: str | None = None) -> None:
    """Options of ``lightning-resode diagnose``.

    Args:
        batch_images: how many images of one training batch the per-stage diagnosis runs on.
        output: also write the records as JSON to this path.
    """


class _SaveConfigToLoggers(SaveConfigCallback):
    """Writes ``config.yaml`` to the log directory and the full resolved config to W&B (not just the model's)."""

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)


class ResodeCLI(LightningCLI):
    """LightningCLI with the callbacks, loggers and checkpoint layout every lightning-resode run shares."""

    diagnose_mode = False

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(MemoryMonitor, "memory")
        parser.add_lightning_class_args(GradientFidelity, "fidelity")
        parser.add_lightning_class_args(ReconstructionMonitor, "reconstruction")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:02d}-step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        parser.add_function_arguments(build_loggers, "logging", skip={"root_dir"})
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        if self.diagnose_mode:
            parser.add_function_arguments(_diagnose_options, _DIAGNOSE)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config["trainer"]
        if trainer_config.get("logger") in (None, True) and not self.diagnose_mode:
            root = trainer_config.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = build_loggers(root, **config["logging"].as_dict())
        elif self.diagnose_mode:
            kwargs["logger"] = False
        extra = [FitSummary(), InterruptCheckpoint()]
        if trainer_config.get("enable_progress_bar") is not False:
            extra.append(RichProgressBar())
        callbacks = list(kwargs.pop("callbacks", None) or trainer_config.get("callbacks") or [])
        kwargs["callbacks"] = callbacks + extra
        return super().instantiate_trainer(**kwargs)


def _make_cli(args: list[str] | None, *, run: bool) -> ResodeCLI:
    return ResodeCLI(
        ResodeClassifier,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_callback=_SaveConfigToLoggers,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        parser_kwargs={"description": __doc__.split("\n")[0]} if run else None,
        auto_configure_optimizers=False,
    )


def _diagnose(args: list[str]) -> None:
    """Per-stage reconstruction error, gradient fidelity and saved memory on one real batch of the recipe."""
    from .diagnose import diagnose, diagnose_table, write_diagnosis_json

    ResodeCLI.diagnose_mode = True
    try:
        with warnings.catch_warnings():  # args are sys.argv minus "diagnose", on purpose
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            cli = _make_cli(args, run=False)
    finally:
        ResodeCLI.diagnose_mode = False
    options = cli.config[_DIAGNOSE]
    datamodule = cli.datamodule
    datamodule.prepare_data()
    datamodule.setup("fit")
    images, targets = next(iter(datamodule.train_dataloader()))
    model = cli.model.model
    if not adjoint_stages(model):
        raise SystemExit("diagnose: the recipe converts no stage (model.stages is empty)")
    model.train()
    records = diagnose(model, (images[: options.batch_images], targets[: options.batch_images]))
    print(diagnose_table(records))
    if options.output:
        print(f"wrote {write_diagnosis_json(records, options.output)}")


def main(args: list[str] | None = None) -> None:
    """Console-script entry point: LightningCLI subcommands, or ``diagnose``."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == _DIAGNOSE:
        _diagnose(argv[1:])
        return
    cli = _make_cli(None if args is None else argv, run=True)  # None: LightningCLI reads sys.argv itself
    _finish_wandb(cli.trainer)


def _finish_wandb(trainer: Trainer) -> None:
    """Close W&B runs when the command ends, so the offline run file holds the last step and the summary."""
    # wandb.finish() closes the active run if the logger started one, and never starts one just to close it
    if "wandb" in sys.modules and any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        sys.modules["wandb"].finish()


if __name__ == "__main__":  # pragma: no cover
    main()
