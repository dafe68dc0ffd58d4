"""Loggers every run gets: CSV always (plain files next to the checkpoints), W&B offline unless a key is set."""

from __future__ import annotations

import importlib
import netrc
import os
import weakref
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger, WandbLogger

from ._lightning_private import logging_step, quiet_wandb_init

_TABLES: weakref.WeakKeyDictionary[WandbLogger, dict[str, Any]] = weakref.WeakKeyDictionary()


def wandb_credentials_available() -> bool:
    """True when W&B could sync: an API key in the environment or in ~/.netrc (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _tensorboard_available() -> bool:
    for name in ("tensorboard", "tensorboardX"):  # what Lightning's TensorBoardLogger can write with
        try:
            importlib.import_module(name)
            return True
        except ImportError:
            continue
    return False


def logger_specs(
    root_dir: str | Path,
    wandb: bool = True,
    project: str = "lightning-resode",
    run_name: str | None = None,
    tensorboard: bool = False,
) -> list[dict[str, Any]]:
    """The loggers ``build_loggers`` creates, as ``class_path``/``init_args`` entries (what ``--print_config`` shows)."""
    root = str(root_dir)
    specs: list[dict[str, Any]] = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": root, "name": "csv"}}]
    if wandb:
        offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not wandb_credentials_available()
        specs.append(
            {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"save_dir": root, "project": project, "name": run_name, "offline": offline},
            }
        )
    if tensorboard:
        specs.append({"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": root, "name": "tensorboard"}})
    return specs


def build_loggers(
    root_dir: str | Path,
    wandb: bool = True,
    project: str = "lightning-resode",
    run_name: str | None = None,
    tensorboard: bool = False,
) -> list[Logger]:
    """CSV under ``<root_dir>/csv``; W&B under ``<root_dir>/wandb`` (offline without credentials: ``wandb sync`` later).

    Args:
        root_dir: the trainer's ``default_root_dir``; every logger writes below it.
        wandb: also log to Weights & Biases.
        project, run_name: W&B project and run name.
        tensorboard: also write TensorBoard event files under ``<root_dir>/tensorboard``.
    """
    if tensorboard and not _tensorboard_available():
        raise ImportError(
            "logging.tensorboard=true needs TensorBoard, which is not installed: "
            "pip install 'lightning-resode[tensorboard]' (or: pip install tensorboard)"
        )
    loggers = []
    for spec in logger_specs(root_dir, wandb=wandb, project=project, run_name=run_name, tensorboard=tensorboard):
        loggers.append(_instantiate(spec))
    return loggers


def _instantiate(spec: dict[str, Any]) -> Logger:
    module, _, name = spec["class_path"].rpartition(".")
    return prepare_logger(getattr(importlib.import_module(module), name)(**spec.get("init_args", {})))


def prepare_logger(logger: Logger) -> Logger:
    """W&B: its directory exists before the run starts, and no warning about the ``anonymous`` setting (Lightning
    always passes it to ``wandb.init``, which then warns that it has no effect). Other loggers as they are."""
    if isinstance(logger, WandbLogger):
        Path(logger.save_dir or ".", "wandb").mkdir(parents=True, exist_ok=True)
        quiet_wandb_init(logger)
    return logger


def log_stage_rows(trainer: pl.Trainer, key: str, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` (one per stage, same keys each time) to the W&B table ``key``, with the training step as
    first column, so the dashboard shows per-stage figures without custom panels. Loggers other than W&B
    already get the same figures as metrics: for them this does nothing.

    The table is logged incrementally (``wandb.Table(log_mode="INCREMENTAL")``): each call uploads its new rows.
    """
    if not rows or not trainer.is_global_zero:
        return
    step = logging_step(trainer)  # the step the same measurement has in the other loggers
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger):
            continue
        tables = _TABLES.setdefault(logger, {})
        if key not in tables:
            import wandb

            tables[key] = wandb.Table(columns=["step", *rows[0]], log_mode="INCREMENTAL")
        table = tables[key]
        for row in rows:
            unknown = set(row) - set(table.columns)
            if unknown:
                raise ValueError(f"table {key!r} has columns {table.columns}; rows cannot add {sorted(unknown)}")
            table.add_data(step, *(row.get(column) for column in table.columns[1:]))
        logger.log_metrics({key: table}, step=step)
