"""Loggers every run gets: CSV always (plain files next to the checkpoints), W&B offline unless a key is set."""

from __future__ import annotations

import importlib
import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger


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
    root = Path(root_dir)
    loggers: list[Logger] = [CSVLogger(save_dir=str(root), name="csv")]
    if wandb:
        offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not wandb_credentials_available()
        (root / "wandb").mkdir(parents=True, exist_ok=True)
        loggers.append(WandbLogger(save_dir=str(root), project=project, name=run_name, offline=offline))
    if tensorboard:
        loggers.append(TensorBoardLogger(save_dir=str(root), name="tensorboard"))
    return loggers
