"""Callbacks that watch what the adjoint trades: memory saved, gradient fidelity, reconstruction error.

Each measurement runs on a small slice of a real training batch, every K steps, with BatchNorm running
statistics and RNG state restored afterwards, so sampling never changes the training trajectory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import resource
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ..adjoint import AdjointSequential
from ..convert import adjoint_stages, from_adjoint
from ..measure import saved_activation_bytes
from ._lightning_private import logging_step, request_stop_after_batch

_MIB = 2.0**20


# ---------------------------------------------------------------------- shared helpers
@contextlib.contextmanager
def _side_effect_free(model: nn.Module) -> Iterator[None]:
    """Run measurements without touching BatchNorm running statistics or the RNG streams training uses."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])


@contextlib.contextmanager
def _all_exact(stages: dict[str, AdjointSequential]) -> Iterator[None]:
    """Temporarily train every stage with plain backprop: the exact reference (and the memory baseline)."""
    previous = {name: stage.gradient for name, stage in stages.items()}
    try:
        for stage in stages.values():
            stage.configure(gradient="backprop")
        yield
    finally:
        for name, stage in stages.items():
            stage.configure(gradient=previous[name])


def _sample(batch: Any, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = batch[0], batch[1]
    return images[:count], targets[:count]


def _network(pl_module: pl.LightningModule) -> nn.Module:
    return getattr(pl_module, "model", pl_module)


def _due(trainer: pl.Trainer, every_n_steps: int) -> bool:
    # global_step has already advanced past the step that just finished
    return (trainer.global_step - 1) % every_n_steps == 0


def _log(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Write sampled measurements straight to the loggers at the step they were taken (``self.log`` would hold
    them until the next ``log_every_n_steps`` flush and repeat them there)."""
    step = logging_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def _check_every(every_n_steps: int) -> None:
    if every_n_steps < 1:
        raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")


def peak_memory_mib(device: torch.device) -> float:
    """CUDA max allocated on a GPU; the process's peak resident set on CPU (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------- memory
class MemoryMonitor(pl.Callback):
    """Logs ``mem/peak_mib`` and ``mem/activations_mib`` (saved MiB per image at rest, docs/design.md).

    The activation measure re-runs one training forward on ``sample_images`` images of the current batch
    every ``every_n_steps`` steps; the backprop figure for the same model (``mem/activations_backprop_mib``)
    is measured once, so the dashboard shows the saving next to the cost it avoids.
    """

    def __init__(self, every_n_steps: int = 50, sample_images: int = 2) -> None:
        super().__init__()
        _check_every(every_n_steps)
        if sample_images < 2:
            raise ValueError(f"sample_images must be >= 2 (BatchNorm needs two), got {sample_images}")
        self.every_n_steps, self.sample_images = every_n_steps, sample_images
        self.activations_mib: float | None = None
        self.backprop_activations_mib: float | None = None
        self.peak_mib = 0.0

    def _activations_per_image(self, trainer: pl.Trainer, model: nn.Module, images: torch.Tensor) -> float:
        images = images.clone()  # a slice of the batch would count the whole batch's storage as saved
        with _side_effect_free(model), trainer.precision_plugin.forward_context():
            saved = saved_activation_bytes(model, lambda: model(images))
        return saved / images.shape[0] / _MIB

    def _backprop_activations_per_image(self, trainer: pl.Trainer, model: nn.Module, images: torch.Tensor) -> float:
        """What plain backprop would store for the same model and images: the converted stem included."""
        try:
            plain = from_adjoint(copy.deepcopy(model))
        except TypeError:  # not a timm family (e.g. the ODE ResNet): its stages are the whole story
            with _all_exact(adjoint_stages(model)):
                return self._activations_per_image(trainer, model, images)
        return self._activations_per_image(trainer, plain, images)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.peak_mib = max(self.peak_mib, peak_memory_mib(pl_module.device))
        if not _due(trainer, self.every_n_steps):
            return
        model = _network(pl_module)
        images, _ = _sample(batch, self.sample_images)
        if images.shape[0] < 2:
            return
        self.activations_mib = self._activations_per_image(trainer, model, images)
        if self.backprop_activations_mib is None:
            self.backprop_activations_mib = self._backprop_activations_per_image(trainer, model, images)
        _log(
            trainer,
            {
                "mem/peak_mib": self.peak_mib,
                "mem/activations_mib": self.activations_mib,
                "mem/activations_backprop_mib": self.backprop_activations_mib,
            },
        )

    def state_dict(self) -> dict[str, Any]:
        return {"peak_mib": self.peak_mib}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.peak_mib = float(state_dict.get("peak_mib", 0.0))


# ---------------------------------------------------------------------- gradient fidelity
def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if not a:
        return float("nan")
    x = torch.cat([t.detach().double().flatten() for t in a])
    y = torch.cat([t.detach().double().flatten() for t in b])
    return float(F.cosine_similarity(x, y, dim=0, eps=1e-30))


class GradientFidelity(pl.Callback):
    """Every ``every_n_steps``, the adjoint gradient against exact backprop on one micro-batch.

    Logs ``adjoint/grad_cosine`` (all trainable parameters) and ``adjoint/grad_cosine/<stage>`` (each adjoint
    stage's own parameters). With ``fallback=True`` a stage whose cosine drops below ``threshold`` is switched
    to its exact ``fallback_gradient`` (``checkpoint``: exact, one stage of activations), logged as
    ``adjoint/fallback/<stage>`` and kept across resumes. Under DDP the decision uses the minimum over ranks.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        sample_images: int = 8,
        threshold: float = 0.99,
        fallback: bool = False,
        fallback_gradient: str = "checkpoint",
    ) -> None:
        super().__init__()
        _check_every(every_n_steps)
        if sample_images < 2:
            raise ValueError(f"sample_images must be >= 2 (BatchNorm needs two), got {sample_images}")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        if fallback_gradient not in ("checkpoint", "backprop"):
            raise ValueError(f"fallback_gradient must be 'checkpoint' or 'backprop', got {fallback_gradient!r}")
        self.every_n_steps, self.sample_images, self.threshold = every_n_steps, sample_images, threshold
        self.fallback, self.fallback_gradient = fallback, fallback_gradient
        self.switched: list[str] = []
        self.last_cosines: dict[str, float] = {}

    @staticmethod
    def _gradients(trainer: pl.Trainer, model: nn.Module, params: list[nn.Parameter], images: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        with _side_effect_free(model):
            with trainer.precision_plugin.forward_context():
                loss = F.cross_entropy(model(images).float(), targets)
            return list(torch.autograd.grad(loss, params, allow_unused=True))

    def measure(self, trainer: pl.Trainer, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Cosines of the current gradient vs exact: ``{"": whole model, stage name: that stage}``."""
        stages = {n: s for n, s in adjoint_stages(model).items() if s.gradient == "adjoint"}
        seen: dict[int, nn.Parameter] = {}
        for p in model.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
        params = list(seen.values())
        rng = torch.random.get_rng_state()
        approx = self._gradients(trainer, model, params, images, targets)
        torch.random.set_rng_state(rng)  # same dropout / drop-path draws for the reference
        with _all_exact(stages):
            exact = self._gradients(trainer, model, params, images, targets)
        index = {id(p): i for i, p in enumerate(params)}

        def pick(grads: list[torch.Tensor | None], subset: list[nn.Parameter]) -> list[torch.Tensor]:
            return [grads[index[id(p)]] for p in subset if id(p) in index and grads[index[id(p)]] is not None]

        cosines = {"": _cosine(pick(approx, params), pick(exact, params))}
        for name, stage in stages.items():
            stage_params = list({id(p): p for p in stage.parameters()}.values())
            cosines[name] = _cosine(pick(approx, stage_params), pick(exact, stage_params))
        return cosines

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stages = adjoint_stages(_network(pl_module))
        for name in self.switched:  # re-apply fallbacks after a resume
            if name in stages:
                stages[name].configure(gradient=self.fallback_gradient)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not _due(trainer, self.every_n_steps):
            return
        model = _network(pl_module)
        images, targets = _sample(batch, self.sample_images)
        if images.shape[0] < 2 or not adjoint_stages(model):
            return
        cosines = self.measure(trainer, model, images, targets)
        self.last_cosines = cosines
        metrics = {"adjoint/grad_cosine" + (f"/{name}" if name else ""): value for name, value in cosines.items()}
        if self.fallback:
            self._maybe_switch(pl_module, model, cosines)
            metrics.update({f"adjoint/fallback/{name}": 1.0 for name in self.switched})
        _log(trainer, metrics)

    def _maybe_switch(self, pl_module: pl.LightningModule, model: nn.Module, cosines: dict[str, float]) -> None:
        stages = adjoint_stages(model)
        for name, value in cosines.items():
            if not name or name in self.switched:
                continue
            worst = float(pl_module.all_gather(torch.tensor(value, device=pl_module.device)).min())
            if worst < self.threshold:
                stages[name].configure(gradient=self.fallback_gradient)
                self.switched.append(name)
                rank_zero_warn(
                    f"stage {name}: adjoint gradient cosine {worst:.4f} < {self.threshold}; switched it to "
                    f"gradient={self.fallback_gradient!r} (exact) for the rest of training"
                )

    def state_dict(self) -> dict[str, Any]:
        return {"switched": list(self.switched)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.switched = list(state_dict.get("switched", []))


# ---------------------------------------------------------------------- reconstruction
class ReconstructionMonitor(pl.Callback):
    """Logs each stage's relative reconstruction error ``adjoint/recon_error/<stage>`` from its last backward.

    Stages with a shape-changing head (most timm stages) measure it for free; ``keep_input=True`` makes the
    others keep their input too (one extra boundary activation per stage) so every stage reports.
    """

    def __init__(self, every_n_steps: int = 10, keep_input: bool = False) -> None:
        super().__init__()
        _check_every(every_n_steps)
        self.every_n_steps, self.keep_input = every_n_steps, keep_input
        self.last_errors: dict[str, float] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.keep_input:
            for stage in adjoint_stages(_network(pl_module)).values():
                stage.keep_input = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not _due(trainer, self.every_n_steps):
            return
        errors = {}
        for name, stage in adjoint_stages(_network(pl_module)).items():
            report = stage.last_backward
            if report is not None and report.reconstruction_error is not None:
                errors[name] = report.reconstruction_error
        if errors:
            metrics = {f"adjoint/recon_error/{name}": value for name, value in errors.items()}
            _log(trainer, {"adjoint/recon_error": max(errors.values()), **metrics})
        self.last_errors = errors


# ---------------------------------------------------------------------- interruption and summary
class InterruptCheckpoint(pl.Callback):
    """On SIGTERM / SIGINT (or a crash) mid-epoch, save ``last.ckpt`` where ``--ckpt_path last`` finds it.

    Lightning defers SIGTERM to the end of the current training batch and raises there, where the model,
    optimizer and loop counters agree. Ctrl-C would raise ``KeyboardInterrupt`` wherever Python happens to
    be (possibly between ``optimizer.step()`` and the loop's step counter), so it is routed to the same
    deferred path; a second Ctrl-C stops at once, without overwriting ``last.ckpt`` with a torn state.
    """

    def __init__(self) -> None:
        super().__init__()
        self._previous_sigint: Any = None
        self._trainer: pl.Trainer | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._trainer = trainer
            self._previous_sigint = signal.signal(signal.SIGINT, self._stop_after_this_batch)

    def _stop_after_this_batch(self, signum: int, frame: Any) -> None:
        if self._trainer.received_sigterm:  # Lightning's SIGTERM flag: checked after each batch
            raise KeyboardInterrupt
        request_stop_after_batch(self._trainer)
        rank_zero_info("Ctrl-C: finishing this batch, then saving last.ckpt (press Ctrl-C again to stop at once)")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit" or trainer.checkpoint_callback is None:
            return
        dirpath = trainer.checkpoint_callback.dirpath
        if dirpath is None:
            return
        if isinstance(exception, KeyboardInterrupt):
            rank_zero_warn("stopped at once mid-batch: last.ckpt was left as it was (it may be older)")
            return
        path = Path(dirpath) / "last.ckpt"
        trainer.save_checkpoint(str(path))
        rank_zero_info(f"interrupted by {type(exception).__name__}: saved {path}; resume with --ckpt_path last")


class FitSummary(pl.Callback):
    """At the end of ``fit``: a table (best accuracy, peak memory, activation MiB/img vs backprop), ``summary.json``
    in the log directory, and the same figures in the W&B run summary, next to each other on the dashboard."""

    def __init__(self, monitor: str = "val/acc") -> None:
        super().__init__()
        self.monitor = monitor
        self.best: float | None = None
        self.summary: dict[str, Any] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                run = logger.experiment
                run.define_metric("trainer/global_step")
                run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
                run.define_metric("val/acc", summary="max")
                run.define_metric("val/loss", summary="min")
                run.define_metric("train/loss", summary="min")
                run.define_metric("mem/peak_mib", summary="max")
                run.define_metric("adjoint/grad_cosine", summary="min")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None:
            self.best = max(float(value), self.best if self.best is not None else float("-inf"))

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        memory = next((c for c in trainer.callbacks if isinstance(c, MemoryMonitor)), None)
        stages = adjoint_stages(_network(pl_module))
        summary: dict[str, Any] = {
            f"best_{self.monitor.replace('/', '_')}": self.best,
            "peak_mib": round(max(peak_memory_mib(pl_module.device), memory.peak_mib if memory else 0.0), 1),
            "activations_mib_per_image": memory.activations_mib if memory else None,
            "backprop_activations_mib_per_image": memory.backprop_activations_mib if memory else None,
            "stages": {name: f"{s.scheme}/{s.gradient}" for name, s in stages.items()},
            "global_step": trainer.global_step,
            "epochs": trainer.current_epoch,
        }
        return summary

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.summary = self._collect(trainer, pl_module)
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank must call it
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update({f"summary/{k}": v for k, v in self.summary.items()})
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        (Path(log_dir) / "summary.json").write_text(json.dumps(self.summary, indent=2))
        _print_table(self.summary)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:.2f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def _print_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lightning-resode: fit summary")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key == "stages":
            value = ", ".join(f"{n}={v}" for n, v in value.items()) or "none"
        elif key.startswith("best_") and isinstance(value, float):
            value = f"{100 * value:.2f} %"
        table.add_row(key, _fmt(value))
    adjoint, backprop = summary.get("activations_mib_per_image"), summary.get("backprop_activations_mib_per_image")
    if adjoint and backprop:
        table.add_row("activation saving", f"{backprop / adjoint:.1f}× less than backprop")
    Console().print(table)
