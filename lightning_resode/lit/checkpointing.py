"""Checkpoints that survive failures: atomic writes, an emergency file of its own, exact resume state.

- ``AtomicCheckpointIO`` writes every checkpoint to a temporary file next to its target, flushes it to disk
  and renames it over the target (``os.replace``), so a crash or a full disk never leaves a torn file.
  Lightning's own writer stages the file in the system temporary folder and *moves* it, which is a copy
  into the target path whenever that folder is on another filesystem (the usual case on clusters).
  Reading, it says "not a checkpoint" for a file ``torch.save`` did not write, and refuses pickled code
  without advising the unsafe load.
- ``ResodeModelCheckpoint`` always writes ``last.ckpt`` (never ``last-v1.ckpt`` after a resume), and lets
  ``--ckpt_path last`` pick the emergency checkpoint when it is the newer one.
- ``InterruptCheckpoint`` writes ``interrupted.ckpt`` when a fit stops on a signal or an error, only once the
  run has restored what it resumes from, never with non-finite weights and never over another file; SIGTERM
  and Ctrl-C end the process with status 128 + signal number.
- ``RandomStateCheckpoint`` stores the torch (CPU and CUDA), NumPy and Python random streams in every
  checkpoint and restores them before the first resumed batch, so dropout and mixup draw what an
  uninterrupted run would have drawn.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import signal
import threading
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ._lightning_private import request_stop_after_batch, train_loaders
from .guards import TrainingDivergedError

INTERRUPTED_NAME = "interrupted"
"""Stem of the emergency checkpoint, next to ``last.ckpt`` (``checkpoints/interrupted.ckpt``)."""


# ---------------------------------------------------------------------- reading and writing files
def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the target's folder, fsync, then rename it over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    try:  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)
    return path


def unreadable_checkpoint(path: str | Path, error: BaseException) -> ValueError:
    """The error for a file ``torch.load`` rejected, without torch's advice to retry with ``weights_only=False``."""
    if not zipfile.is_zipfile(str(path)):
        return ValueError(
            f"{str(path)!r} is not a checkpoint: torch.save did not write it (a .ckpt, .pth or .pt file is a zip "
            "archive); check the path, or whether the copy was truncated"
        )
    unsafe = re.search(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)", str(error))
    if unsafe:
        return ValueError(
            f"refusing to load {str(path)!r}: it holds a pickled Python object ({unsafe.group(1)}), which loading "
            "would execute; checkpoints of this package hold only tensors and plain values"
        )
    return ValueError(f"{str(path)!r} is not a readable checkpoint ({type(error).__name__})")


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(..., weights_only=True)`` whose errors say what the file is, naming it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(str(path), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise unreadable_checkpoint(path, err) from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local writes and clear errors for files that are not checkpoints."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None) -> dict[str, Any]:
        if _is_local(path) and not Path(path).is_file():
            raise FileNotFoundError(
                f"--ckpt_path {str(path)!r} does not exist; give an existing .ckpt file, or 'last' to resume the "
                "newest checkpoint of this run's checkpoints folder"
            )
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, zipfile.BadZipFile) as err:
            if not _is_local(path):
                raise
            raise unreadable_checkpoint(path, err) from None


def _is_local(path: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(get_filesystem(path), LocalFileSystem)


# ---------------------------------------------------------------------- last.ckpt
class ResodeModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the newest state of the run.

    Lightning versions ``last.ckpt`` to ``last-v1.ckpt`` when the file exists but this callback did not write
    it (a resume from the emergency checkpoint, or from a ``last.ckpt`` of an earlier process), which leaves the
    documented ``last.ckpt`` stale. ``--ckpt_path last`` also considers ``interrupted.ckpt`` (newest file wins).
    """

    @property
    def state_key(self) -> str:
        """Lightning's ``ModelCheckpoint`` key, so checkpoints written before this subclass restore its state."""
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if self.save_last and self.dirpath is not None:
            name = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
            self.last_model_path = name  # the file this run owns: overwrite it (atomically), do not version it
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """A fit that reaches ``max_steps`` mid-epoch leaves that step in ``last.ckpt`` (Lightning would not save it)."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        reached = 0 < trainer.max_steps <= trainer.global_step
        if self.save_last and reached and not trainer.fast_dev_run and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Never write ``last.ckpt`` or a top-k file from a failing run: ``InterruptCheckpoint`` owns that case."""
        if self.save_on_exception:
            rank_zero_warn("checkpoint.save_on_exception is ignored: a failing fit saves checkpoints/interrupted.ckpt instead")

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        found = super()._find_last_checkpoints(trainer)
        if self.dirpath is not None:
            emergency = Path(self.dirpath) / f"{INTERRUPTED_NAME}{self.FILE_EXTENSION}"
            if emergency.is_file():
                found.add(os.path.normpath(str(emergency)))
        return found


# ---------------------------------------------------------------------- interruption
def _finite(tensors: Any) -> bool:
    if isinstance(tensors, torch.Tensor):
        return not tensors.is_floating_point() or bool(torch.isfinite(tensors).all())
    if isinstance(tensors, dict):
        return all(_finite(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return all(_finite(v) for v in tensors)
    return True


def _weights_and_optimizer_finite(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    if not _finite(list(pl_module.state_dict().values())):
        return False
    return all(_finite(optimizer.state_dict()["state"]) for optimizer in trainer.optimizers)


def _rewind_unfinished_batch(trainer: pl.Trainer) -> None:
    """Make a checkpoint taken mid-batch look like one taken after the previous batch (as a SIGTERM one is).

    The failed batch was fetched and maybe half-run: the loop counters forget it (Lightning then resumes as from
    a batch boundary) and resumable loaders hand it out again, so a resume trains it as the first batch.
    """
    progress = trainer.fit_loop.epoch_loop.batch_progress
    unfinished = progress.current.ready - progress.current.completed
    if unfinished <= 0:
        return
    for tracker in (progress.current, progress.total):
        tracker.ready = tracker.started = tracker.processed = tracker.completed
    for dataloader in train_loaders(trainer):
        rewind = getattr(dataloader, "rewind", None)
        if callable(rewind):
            rewind(unfinished)


class InterruptCheckpoint(pl.Callback):
    """On SIGTERM / Ctrl-C (or an error) during ``fit``, save ``checkpoints/interrupted.ckpt`` to resume from.

    Lightning defers SIGTERM to the end of the current training batch and raises there, where the model,
    optimizer and loop counters agree. Ctrl-C is routed to the same deferred path; a second Ctrl-C stops at
    once and saves nothing (the state may be torn). Nothing is saved when the run failed before training
    started (a missing or mismatched ``--ckpt_path``, a data error in ``setup``: the files on disk are the only
    good state), when the training diverged, or when any weight or optimizer value is not finite; other errors
    under multi-process training save nothing either (the other ranks would not join the write). The file is
    written atomically and never replaces ``last.ckpt`` or a best checkpoint. A signal ends the process with
    status 128 + signal number (143 for SIGTERM, 130 for Ctrl-C), so a scheduler can tell it from a finished run.
    """

    def __init__(self, filename: str = INTERRUPTED_NAME) -> None:
        super().__init__()
        self.filename = filename
        self._previous_sigint: Any = None
        self._trainer: pl.Trainer | None = None
        self._signum = int(signal.SIGTERM)
        self._training_started = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training_started = False
        self._signum = int(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():
            self._trainer = trainer
            self._previous_sigint = signal.signal(signal.SIGINT, self._stop_after_this_batch)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training_started = True  # Lightning has restored weights, optimizer and loops by now

    def _stop_after_this_batch(self, signum: int, frame: Any) -> None:
        if self._trainer.received_sigterm:  # type: ignore[union-attr]  # Lightning's flag: checked after each batch
            raise KeyboardInterrupt
        self._signum = signum
        request_stop_after_batch(self._trainer)  # type: ignore[arg-type]
        rank_zero_info("Ctrl-C: finishing this batch, then saving a checkpoint (press Ctrl-C again to stop at once)")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def path(self, trainer: pl.Trainer) -> Path | None:
        callback = trainer.checkpoint_callback
        dirpath = getattr(callback, "dirpath", None)
        return None if dirpath is None else Path(dirpath) / f"{self.filename}.ckpt"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            exception.code = 128 + self._signum
        if trainer.state.fn != "fit":
            return
        path = self.path(trainer)
        if path is None:
            return
        reason = self._reason_not_to_save(trainer, pl_module, exception)
        if reason:
            rank_zero_warn(f"{type(exception).__name__}: no checkpoint saved ({reason}); existing checkpoints are untouched")
            return
        _rewind_unfinished_batch(trainer)
        trainer.save_checkpoint(str(path))
        rank_zero_info(
            f"stopped by {type(exception).__name__} at step {trainer.global_step}: saved {path}; resume with --ckpt_path last"
        )

    def _reason_not_to_save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> str:
        from ..adjoint import ReconstructionError

        if isinstance(exception, KeyboardInterrupt):
            return "stopped at once mid-batch, the state may be torn"
        if not self._training_started:
            return "the run failed before training started"
        if isinstance(exception, (TrainingDivergedError, ReconstructionError)):
            return "the training diverged"
        if trainer.world_size > 1 and not isinstance(exception, SIGTERMException):
            return "an error on one process of a multi-process run; the others would not join the write"
        if not _weights_and_optimizer_finite(trainer, pl_module):
            return "some weights or optimizer values are not finite"
        return ""


# ---------------------------------------------------------------------- random streams
def _numpy_state() -> dict[str, Any]:
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached"]))


class RandomStateCheckpoint(pl.Callback):
    """Every checkpoint carries the random streams; a resumed fit restores them just before its first batch.

    Saved with tensors and plain values only, so the checkpoint still loads with ``weights_only=True``.
    Data augmentation does not depend on them: each sample draws from its own seed (see ``ResumableSampler``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, Any] | None = None
        self._batch_start: dict[str, Any] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_start = self._capture()  # what a checkpoint of a batch that fails half-way must hold

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batch_start = None

    def state_dict(self) -> dict[str, Any]:
        return self._batch_start if self._batch_start is not None else self._capture()

    @staticmethod
    def _capture() -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        state: dict[str, Any] = {
            "torch": torch.random.get_rng_state(),
            "numpy": _numpy_state(),
            "python": {"version": version, "state": list(internal), "gauss": gauss},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._pending = self._pending, None
        if not state:
            return
        torch.random.set_rng_state(state["torch"].cpu())
        _set_numpy_state(state["numpy"])
        python = state["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
        if "cuda" in state and pl_module.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"].cpu(), device=pl_module.device)


__all__ = [
    "INTERRUPTED_NAME",
    "AtomicCheckpointIO",
    "InterruptCheckpoint",
    "RandomStateCheckpoint",
    "ResodeModelCheckpoint",
    "atomic_save",
    "safe_load",
    "unreadable_checkpoint",
]
