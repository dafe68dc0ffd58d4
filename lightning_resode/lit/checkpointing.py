"""Checkpoints that survive failures: atomic writes, an emergency file of its own, exact resume state.

- ``AtomicCheckpointIO`` writes every checkpoint to a temporary file next to its target, flushes it to disk
  and renames it over the target (``os.replace``), so a crash or a full disk never leaves a torn file.
  Lightning's own writer stages the file in the system temporary folder and *moves* it, which is a copy
  into the target path whenever that folder is on another filesystem (the usual case on clusters).
  Reading, it says "not a checkpoint" for a file ``torch.save`` did not write, and refuses pickled code
  without advising the unsafe load.
- ``ResodeModelCheckpoint`` writes ``last.ckpt`` at every epoch end, at ``max_steps`` and on a clean stop,
  whatever the monitored metric did (never ``last-v1.ckpt`` after a resume); ``--ckpt_path last`` resumes the
  file with the most training progress (``resolve_last``), and stale temporary files are removed at start.
- ``InterruptCheckpoint`` writes ``interrupted.ckpt`` when a fit stops on a signal or an error, only once the
  run has taken an optimizer step of its own, never with non-finite weights and never over another file;
  SIGTERM and Ctrl-C end the process with status 128 + signal number.
- ``ResumeOptions`` makes the config win over the checkpoint on resume: a changed learning rate, schedule or
  optimizer is applied (a switched optimizer starts with fresh state) and said in one line.
- ``RandomStateCheckpoint`` stores the torch (CPU and CUDA), NumPy and Python random streams in every
  checkpoint and restores them before the first resumed batch, so dropout and mixup draw what an
  uninterrupted run would have drawn.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
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
class CheckpointError(ValueError):
    """A checkpoint that cannot be used here: unreadable, truncated, holding pickled code, or of another model."""


class CheckpointWriteError(OSError):
    """The disk refused a checkpoint write (full, over quota, read-only…); the previous file is untouched."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return self.strerror or super().__str__()


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _os_error(error: BaseException) -> OSError | None:
    """The ``OSError`` behind ``error``: torch's zip writer reports a failed write as its own ``RuntimeError``
    ('unexpected pos …'), with the real cause (``No space left on device``) only in the exception chain."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno is not None:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _write_error(path: Path, error: BaseException) -> CheckpointWriteError | None:
    cause = _os_error(error)
    if cause is None:
        return None
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    if cause.errno in _DISK_FULL:
        reason = f"{os.strerror(cause.errno).lower()} ({free})"
        fix = "free space there or set trainer.default_root_dir to a folder on another disk"
    else:
        reason = cause.strerror or str(cause)
        fix = "check that the folder exists and is writable, or set trainer.default_root_dir elsewhere"
    return CheckpointWriteError(
        cause.errno, f"cannot write checkpoint {str(path)!r}: {reason}; {fix} (the previous file, if any, is untouched)"
    )


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the target's folder, fsync, then rename it over the target.

    A write the disk refuses (full, quota, permissions) raises ``CheckpointWriteError`` naming the path and
    the cause, instead of torch's 'unexpected pos' from deep inside its zip writer.
    """
    path = Path(path)
    temporary = _temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as err:
        refused = _write_error(path, err)
        if refused is None:
            raise
        raise refused from None
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


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete ``.NAME.tmp-PID`` files left in ``folder`` by a write that was killed (its process is gone).

    ``atomic_save`` removes its temporary file on every error, but not when the process is killed mid-write
    (SIGKILL, out of memory, a node failure): each leftover is a whole checkpoint's size.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if match and path.is_file() and int(match["pid"]) != os.getpid() and not _process_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def unreadable_checkpoint(path: str | Path, error: BaseException) -> CheckpointError:
    """The error for a file ``torch.load`` rejected, without torch's advice to retry with ``weights_only=False``."""
    if not zipfile.is_zipfile(str(path)):
        return CheckpointError(
            f"{str(path)!r} is not a checkpoint: torch.save did not write it (a .ckpt, .pth or .pt file is a zip "
            "archive); check the path, or whether the copy was truncated"
        )
    unsafe = re.search(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)", str(error))
    if unsafe:
        return CheckpointError(
            f"refusing to load {str(path)!r}: it holds a pickled Python object ({unsafe.group(1)}), which loading "
            "would execute; checkpoints of this package hold only tensors and plain values"
        )
    return CheckpointError(
        f"{str(path)!r} is not a readable checkpoint ({type(error).__name__}: {_first_line(error)}); check whether "
        "the copy is complete, or give another file"
    )


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:200] if lines else "no message"


def safe_load(path: str | Path, map_location: Any = "cpu", *, mmap: bool = False) -> Any:
    """``torch.load(..., weights_only=True)`` whose errors say what the file is, naming it.

    ``mmap=True`` maps the tensors instead of reading them: reading a few entries of a large checkpoint
    (its step, its hyperparameters) then costs almost nothing.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(str(path), map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError) as err:
        raise unreadable_checkpoint(path, err) from None


def checkpoint_step(path: str | Path) -> int | None:
    """The ``global_step`` a checkpoint was saved at; ``None`` when the file cannot be read."""
    try:
        checkpoint = safe_load(path, mmap=True)
    except (CheckpointError, FileNotFoundError):
        return None
    step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    return int(step) if isinstance(step, int) else None


def resolve_last(dirpath: str | Path) -> Path | None:
    """What ``--ckpt_path last`` resumes: of ``last.ckpt`` and ``interrupted.ckpt``, the one with the most training
    progress (the newer file on a tie); ``None`` when neither exists.

    Not simply the newest file: a fresh run started in the same folder could otherwise leave a step-0 file that
    wins over the good run's later ``last.ckpt``. A file that cannot be read is passed over, with a warning.
    """
    ranked: list[tuple[int, int, Path]] = []
    for name in (f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}", f"{INTERRUPTED_NAME}.ckpt"):
        path = Path(dirpath) / name
        if not path.is_file():
            continue
        step = checkpoint_step(path)
        if step is None:
            rank_zero_warn(f"--ckpt_path last: passing over {str(path)!r}, which is not a readable checkpoint")
            continue
        ranked.append((step, path.stat().st_mtime_ns, path))
    return max(ranked)[2] if ranked else None


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
                "checkpoint with the most progress in this run's checkpoints folder"
            )
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, zipfile.BadZipFile, OSError) as err:
            if not _is_local(path):
                raise
            raise unreadable_checkpoint(path, err) from None


def _is_local(path: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(get_filesystem(path), LocalFileSystem)


# ---------------------------------------------------------------------- last.ckpt
class ResodeModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the newest state of the run.

    Lightning 2.6 rewrites "last" only in a step where it also saved a monitored checkpoint, so an epoch whose
    ``val/acc`` did not improve left ``last.ckpt`` at an older step (a resume then trained those steps again).
    Here ``last.ckpt`` is written at every epoch end, at the step ``max_steps`` stops on and on a clean stop,
    whatever the monitor did. Lightning also versions it to ``last-v1.ckpt`` when the file exists but this
    callback did not write it (a resume), which would leave the documented ``last.ckpt`` stale. Once
    ``last.ckpt`` holds a newer state, an ``interrupted.ckpt`` from before is obsolete and removed, and
    ``--ckpt_path last`` picks the file with the most progress (``resolve_last``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._step_in_last: int | None = None  # global_step of the state this fit last wrote to last.ckpt

    @property
    def state_key(self) -> str:
        """Lightning's ``ModelCheckpoint`` key, so checkpoints written before this subclass restore its state."""
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero and self.dirpath is not None and _is_local(self.dirpath):
            for path in remove_stale_temporaries(self.dirpath):
                rank_zero_info(f"removed {path.name}, left by a checkpoint write that was killed")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # a resumed fit that ends before training further has nothing newer to write
        self._step_in_last = trainer.global_step if trainer.ckpt_path else None

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if not (self.save_last and self.dirpath is not None):
            return
        name = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        self.last_model_path = name  # the file this run owns: overwrite it (atomically), do not version it
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._step_in_last = trainer.global_step
        emergency = Path(self.dirpath) / f"{INTERRUPTED_NAME}{self.FILE_EXTENSION}"
        if trainer.is_global_zero and _is_local(self.dirpath) and emergency.is_file():
            trainer.strategy.remove_checkpoint(emergency)  # last.ckpt now holds this run's newer state

    def _save_last_if_behind(self, trainer: pl.Trainer) -> None:
        if (
            self.save_last
            and not trainer.fast_dev_run
            and not trainer.sanity_checking
            and trainer.state.fn == "fit"
            and self._step_in_last != trainer.global_step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):  # else Lightning saves the best one at the epoch end,
            self._save_last_if_behind(trainer)  # and a last.ckpt written first would make it skip that step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every epoch end, validated or not (``check_val_every_n_epoch``, ``limit_val_batches=0``)."""
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_if_behind(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """A fit that reaches ``max_steps`` mid-epoch leaves that step in ``last.ckpt`` (Lightning would not save it)."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 < trainer.max_steps <= trainer.global_step:
            self._save_last_if_behind(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A clean stop (``max_epochs``, ``max_steps``, early stopping) leaves its final state in ``last.ckpt``."""
        super().on_train_end(trainer, pl_module)
        self._save_last_if_behind(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Never write ``last.ckpt`` or a top-k file from a failing run: ``InterruptCheckpoint`` owns that case."""
        if self.save_on_exception:
            rank_zero_warn("checkpoint.save_on_exception is ignored: a failing fit saves checkpoints/interrupted.ckpt instead")

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """Lightning resumes the newest of what this returns: return only the file with the most progress."""
        if self.dirpath is None or not _is_local(self.dirpath):
            return super()._find_last_checkpoints(trainer)
        best = resolve_last(self.dirpath)
        return set() if best is None else {os.path.normpath(str(best))}


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
    once and saves nothing (the state may be torn). Nothing is saved when the run stopped before its first
    optimizer step (a missing or mismatched ``--ckpt_path``, a data error in ``setup``, a first batch that
    fails: the files on disk already hold that state, and a step-0 file must not become the resume point of
    the folder), when the training diverged, when the disk refused a write, or when any weight or optimizer
    value is not finite; other errors under multi-process training save nothing either (the other ranks would
    not join the write). The file is written atomically and never replaces ``last.ckpt`` or a best
    checkpoint. A signal ends the process with status 128 + signal number (143 for SIGTERM, 130 for Ctrl-C),
    so a scheduler can tell it from a finished run.
    """

    def __init__(self, filename: str = INTERRUPTED_NAME) -> None:
        super().__init__()
        self.filename = filename
        self._previous_sigint: Any = None
        self._trainer: pl.Trainer | None = None
        self._signum = int(signal.SIGTERM)
        self._training_started = False
        self._start_step = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training_started = False
        self._signum = int(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():
            self._trainer = trainer
            self._previous_sigint = signal.signal(signal.SIGINT, self._stop_after_this_batch)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training_started = True  # Lightning has restored weights, optimizer and loops by now
        self._start_step = trainer.global_step

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

    def _cause(self, exception: BaseException) -> str:
        """What stopped the run, in the user's words: the signal's name rather than Lightning's ``SIGTERMException``."""
        if isinstance(exception, SIGTERMException):
            name = signal.Signals(self._signum).name
            return f"{name} (Ctrl-C)" if self._signum == signal.SIGINT else name
        if isinstance(exception, KeyboardInterrupt):
            return "a second Ctrl-C"
        return type(exception).__name__

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
            rank_zero_warn(f"stopped by {self._cause(exception)}: no checkpoint saved ({reason}); existing checkpoints are untouched")
            return
        _rewind_unfinished_batch(trainer)
        try:
            trainer.save_checkpoint(str(path))
        except CheckpointWriteError as err:  # the run's own error is what the user must see; this one is a note
            rank_zero_warn(f"stopped by {self._cause(exception)}: {err}")
            return
        rank_zero_info(
            f"stopped by {self._cause(exception)} at step {trainer.global_step}: saved {path}; resume with --ckpt_path last"
        )

    def _reason_not_to_save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> str:
        from ..adjoint import ReconstructionError

        if isinstance(exception, KeyboardInterrupt):
            return "stopped at once mid-batch, the state may be torn"
        if not self._training_started:
            return "the run failed before training started"
        if trainer.global_step == self._start_step:
            return f"no optimizer step was taken since the run started at step {self._start_step}"
        if isinstance(exception, CheckpointWriteError):
            return "the disk refused the last write"
        if isinstance(exception, (TrainingDivergedError, ReconstructionError)):
            return "the training diverged"
        if trainer.world_size > 1 and not isinstance(exception, SIGTERMException):
            return "an error on one process of a multi-process run; the others would not join the write"
        if not _weights_and_optimizer_finite(trainer, pl_module):
            return "some weights or optimizer values are not finite"
        return ""


# ---------------------------------------------------------------------- checkpoint against config
def _architecture(model_name: Any) -> str:
    """timm's architecture of a model name: ``resnet50.a1_in1k`` and ``resnet50`` build the same network."""
    return str(model_name).split(".", 1)[0]


def _describe(hparams: Any) -> str:
    kwargs = hparams.get("model_kwargs")
    return f"{hparams.get('model_name')} with {hparams.get('num_classes')} classes" + (f" and model_kwargs {kwargs}" if kwargs else "")


def _first_weight_mismatch(module: pl.LightningModule, state: dict[str, Any], prefix: str = "model.") -> str:
    def weights(items: Any) -> dict[str, Any]:  # a frozen BatchNorm (model.freeze) has no step counter
        return {k: v for k, v in items if k.startswith(prefix) and not k.endswith("num_batches_tracked")}

    own, saved = weights(module.state_dict().items()), weights(state.items())
    for key in sorted(own):
        if key not in saved:
            return f"no weight {key!r} in the checkpoint"
        if tuple(saved[key].shape) != tuple(own[key].shape):
            return f"{key!r} is {tuple(saved[key].shape)} there, {tuple(own[key].shape)} here"
    unknown = sorted(set(saved) - set(own))
    return f"the checkpoint has {len(unknown)} weight(s) the model lacks, e.g. {unknown[0]!r}" if unknown else ""


def check_checkpoint_fits(module: pl.LightningModule, checkpoint: Any, path: str | Path) -> None:
    """Refuse, in one line naming both, a checkpoint whose model is not the one the config builds.

    The config is the source of truth: its model name and number of classes must be the checkpoint's, every
    network weight must have the same shape, and every stage method the checkpoint's auto policy chose must be
    one the config's policy may use (an Euler reconstruction on a Heun network would train a different
    network). Without this, Lightning either dumps a size-mismatch list or, through LightningCLI, silently
    builds the checkpoint's model instead of the config's.
    """
    where = str(path)
    hyper = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hyper, dict) or "model_name" not in hyper or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(
            f"{where!r} is not a lightning-resode checkpoint (no model hyperparameters or weights); give a "
            "checkpoint written by `lightning-resode fit`"
        )
    config = dict(module.hparams)
    same = _architecture(hyper["model_name"]) == _architecture(config.get("model_name")) and hyper.get("num_classes") == config.get(
        "num_classes"
    )
    mismatch = _first_weight_mismatch(module, checkpoint["state_dict"])
    if not same or mismatch:
        detail = f" ({mismatch})" if same else ""
        raise CheckpointError(
            f"checkpoint {where!r} holds a {_describe(hyper)}, but the config builds a {_describe(config)}{detail}; "
            "pass the recipe the checkpoint was trained with (--config), or a checkpoint of this model"
        )
    policy = getattr(module, "policy", None)
    saved_methods = (checkpoint.get("resode_policy") or {}).get("methods", {})
    if policy is None or getattr(policy, "mode", None) != "auto":
        return
    for stage, method in saved_methods.items():
        if stage in policy.stages and method not in policy.candidates:
            raise CheckpointError(
                f"checkpoint {where!r} trained stage {stage} with {method!r}, which the config's "
                f"{config.get('model_name')} cannot use (its auto policy allows {list(policy.candidates)}); pass the "
                "recipe the checkpoint was trained with (--config)"
            )


# the module options whose state a resumed fit restores from the checkpoint instead of the config
_OPTIMIZER_OPTIONS = frozenset({"optimizer", "lr", "weight_decay", "momentum"})
_SCHEDULE_OPTIONS = frozenset({
    "lr", "scheduler", "warmup_epochs", "min_lr", "warmup_lr", "decay_epochs", "decay_milestones", "decay_rate",
    "patience_epochs", "plateau_monitor", "plateau_mode", "cooldown_epochs", "cycle_limit", "cycle_mul", "cycle_decay",
})
# where the checkpoint's weights win by design: not options a resume changes
_WEIGHT_SOURCES = frozenset({"pretrained", "weights_file", "weights_partial"})


class ResumeOptions(pl.Callback):
    """On resume, the config wins over what the checkpoint restores, and the differences are said in one line.

    A resumed fit restores the optimizer's parameter groups (learning rate, weight decay) and the schedule's
    state from the checkpoint, which would silently keep the old values of ``--model.lr`` or
    ``--model.scheduler`` given on the command line. Here the config's values replace them before Lightning
    restores that state: changed optimizer settings are applied to the restored groups (the moments are kept),
    a changed schedule starts from the config at the current step, and a different optimizer (or other
    trainable parameters, e.g. after changing ``freeze``) starts with fresh state. Every other option is read
    from the config anyway; the line lists them all.
    """

    def __init__(self) -> None:
        super().__init__()
        self._checkpoint: dict[str, Any] | None = None
        self._changed: dict[str, tuple[Any, Any]] = {}
        self._reschedule = False

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._checkpoint, self._reschedule, self._changed = None, False, {}
        if trainer.state.fn != "fit":  # validate/test/predict restore weights only
            return
        saved = checkpoint.get("hyper_parameters") or {}
        config = dict(pl_module.hparams)
        self._changed = {
            key: (saved[key], value)
            for key, value in config.items()
            if key in saved and key not in _WEIGHT_SOURCES and saved[key] != value
        }
        if not self._changed:
            return
        self._checkpoint = checkpoint  # the dict Lightning restores the optimizer from, after on_fit_start
        listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in self._changed.items())
        rank_zero_info(f"resuming with options that differ from the checkpoint's, the config's apply: {listed}")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        checkpoint, self._checkpoint = self._checkpoint, None
        if checkpoint is None:
            return
        changed = set(self._changed)
        states = checkpoint.get("optimizer_states") or []
        fresh_groups = [[len(g["params"]) for g in o.param_groups] for o in trainer.optimizers]
        saved_groups = [[len(g["params"]) for g in s.get("param_groups", [])] for s in states]
        if "optimizer" in changed or fresh_groups != saved_groups:
            old, new = self._changed.get("optimizer", (None, None))
            why = f"model.optimizer changed from {old!r} to {new!r}" if "optimizer" in changed else "the trainable parameters changed"
            rank_zero_info(f"{why}: the optimizer starts with fresh state (weights and progress come from the checkpoint)")
            checkpoint["optimizer_states"], checkpoint["lr_schedulers"] = [], []
            self._reschedule = True
            return
        if changed & _OPTIMIZER_OPTIONS:
            for optimizer, state in zip(trainer.optimizers, states):
                for group, saved in zip(optimizer.param_groups, state["param_groups"]):
                    saved.update({key: value for key, value in group.items() if key != "params"})
            self._reschedule = True
        if changed & _SCHEDULE_OPTIONS:
            checkpoint["lr_schedulers"] = []
            self._reschedule = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A schedule stepped per update (timm's) sets the config's rate for the current step before the first batch."""
        if not self._reschedule:
            return
        self._reschedule = False
        for config in trainer.lr_scheduler_configs:
            step_update = getattr(config.scheduler, "step_update", None)
            if callable(step_update):
                step_update(num_updates=trainer.global_step)


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
    "CheckpointError",
    "CheckpointWriteError",
    "InterruptCheckpoint",
    "RandomStateCheckpoint",
    "ResodeModelCheckpoint",
    "ResumeOptions",
    "atomic_save",
    "check_checkpoint_fits",
    "checkpoint_step",
    "remove_stale_temporaries",
    "resolve_last",
    "safe_load",
    "unreadable_checkpoint",
]
