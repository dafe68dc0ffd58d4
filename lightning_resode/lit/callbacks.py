"""Callbacks that watch what the adjoint trades: memory saved, gradient fidelity, reconstruction error.

Each measurement runs on a small slice of a real training batch, every K steps, with BatchNorm running
statistics and RNG state restored afterwards, so sampling never changes the training trajectory.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..adjoint import AdjointError, ReconstructionError
from ..adjoint.methods import METHODS
from ..convert import adjoint_stages, from_adjoint, policy_of
from ..adjoint import planned
from ..fidelity import exact_stages, side_effect_free, stage_fidelity
from ..measure import peak_per_image, saved_activation_bytes
from ._lightning_private import logging_step, optimizer_stepped_on_this_batch
from .checkpointing import InterruptCheckpoint  # noqa: F401  (re-exported: it used to live here)
from .loggers import log_stage_rows

_MIB = 2.0**20


# ---------------------------------------------------------------------- shared helpers
def _sample(batch: Any, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = batch[0], batch[1]
    return images[:count], targets[:count]


def _network(pl_module: pl.LightningModule) -> nn.Module:
    return getattr(pl_module, "model", pl_module)


def _due(trainer: pl.Trainer, every_n_steps: int, upcoming: bool = False) -> bool:
    """Steps 1, 1+n, …; after a batch, only on the micro-batch that stepped (once per step when accumulating)."""
    if not upcoming and not optimizer_stepped_on_this_batch(trainer):
        return False  # gradients are being accumulated: no optimizer step ended with this batch
    # after a step, global_step has already advanced past the step that just finished
    return (trainer.global_step - (0 if upcoming else 1)) % every_n_steps == 0


def _log(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Write sampled measurements straight to the loggers at the step they were taken (``self.log`` would hold
    them until the next ``log_every_n_steps`` flush and repeat them there)."""
    step = logging_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def _check_every(every_n_steps: int) -> None:
    if every_n_steps < 1:
        raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")


def peak_memory_mib(device: torch.device) -> float | None:
    """The allocator's peak since the last reset on a GPU; None on CPU (measured per image by MemoryMonitor)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _MIB
    return None


# ---------------------------------------------------------------------- memory
class MemoryMonitor(pl.Callback):
    """What a training step costs in memory, next to what plain backprop would cost the same model.

    Logged every ``every_n_steps`` steps, on ``sample_images`` images of the current batch:

    - ``mem/peak_mib_per_image``: the peak of one training step per image, the figure users pay
      (``lightning_resode.measure.peak_per_image``: profiler allocator events on CPU, the CUDA allocator on
      GPU), and ``mem/peak_backprop_mib_per_image`` for the same model with plain autograd (once);
    - ``mem/activations_mib``: saved MiB per image at rest, and ``mem/activations_backprop_mib`` (once);
    - on a GPU also ``mem/peak_mib``: the allocator's peak over the logged steps (the whole step, weights,
      optimizer state and batch included).
    """

    def __init__(self, every_n_steps: int = 50, sample_images: int = 2) -> None:
        super().__init__()
        _check_every(every_n_steps)
        if sample_images < 2:
            raise ValueError(f"sample_images must be >= 2 (BatchNorm needs two), got {sample_images}")
        self.every_n_steps, self.sample_images = every_n_steps, sample_images
        self.activations_mib: float | None = None
        self.backprop_activations_mib: float | None = None
        self.peak_mib_per_image: float | None = None
        self.backprop_peak_mib_per_image: float | None = None
        self.peak_mib = 0.0

    def _activations_per_image(self, trainer: pl.Trainer, model: nn.Module, images: torch.Tensor) -> float:
        images = images.clone()  # a slice of the batch would count the whole batch's storage as saved
        with side_effect_free(model, train=False), trainer.precision_plugin.forward_context():
            saved = saved_activation_bytes(model, lambda: model(images))
        return saved / images.shape[0] / _MIB

    def _peak_per_image(self, trainer: pl.Trainer, model: nn.Module, images: torch.Tensor) -> float:
        """Peak of a training step per image on k and 2k copies of the sample (gradients of the model untouched)."""
        grads = {p: p.grad for p in model.parameters()}
        try:
            # a measurement (not a training step: no calibration, no step count, no fallback report)
            with side_effect_free(model), planned(adjoint_stages(model)), trainer.precision_plugin.forward_context():
                result = peak_per_image(
                    model, lambda b: images.repeat((b + len(images) - 1) // len(images), 1, 1, 1)[:b].clone(),
                    small=len(images), large=2 * len(images), warmup=False,
                )
        finally:
            for p, g in grads.items():
                p.grad = g
        return result.mib_per_image

    def _backprop_model(self, model: nn.Module) -> nn.Module | None:
        try:
            return from_adjoint(copy.deepcopy(model))
        except TypeError:  # not a timm family (e.g. the ODE ResNet): its stages are the whole story
            return None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if pl_module.device.type == "cuda" and _due(trainer, self.every_n_steps, upcoming=True):
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not _due(trainer, self.every_n_steps):
            return
        model = _network(pl_module)
        images, _ = _sample(batch, self.sample_images)
        if images.shape[0] < 2:
            return
        metrics: dict[str, float] = {}
        step_peak = peak_memory_mib(pl_module.device)
        if step_peak is not None:
            self.peak_mib = max(self.peak_mib, step_peak)
            metrics["mem/peak_mib"] = self.peak_mib
        self.activations_mib = self._activations_per_image(trainer, model, images)
        self.peak_mib_per_image = self._peak_per_image(trainer, model, images)
        if self.backprop_activations_mib is None:
            plain = self._backprop_model(model)
            if plain is None:
                with exact_stages(adjoint_stages(model)):
                    self.backprop_activations_mib = self._activations_per_image(trainer, model, images)
                    self.backprop_peak_mib_per_image = self._peak_per_image(trainer, model, images)
            else:
                self.backprop_activations_mib = self._activations_per_image(trainer, plain, images)
                self.backprop_peak_mib_per_image = self._peak_per_image(trainer, plain, images)
                del plain
        metrics.update(
            {
                "mem/peak_mib_per_image": self.peak_mib_per_image,
                "mem/peak_backprop_mib_per_image": self.backprop_peak_mib_per_image,
                "mem/activations_mib": self.activations_mib,
                "mem/activations_backprop_mib": self.backprop_activations_mib,
            }
        )
        _log(trainer, metrics)
        log_stage_rows(trainer, "mem/stages", [{"stage": "model", "activations_mib": self.activations_mib, "activations_backprop_mib": self.backprop_activations_mib, "peak_mib_per_image": self.peak_mib_per_image, "peak_backprop_mib_per_image": self.backprop_peak_mib_per_image}])  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"peak_mib": self.peak_mib}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.peak_mib = float(state_dict.get("peak_mib", 0.0))


# ---------------------------------------------------------------------- gradient fidelity
class GradientFidelity(pl.Callback):
    """Every ``every_n_steps``, each stage's gradient against exact backprop on one micro-batch.

    Logs ``adjoint/grad_cosine`` (all trainable parameters) and ``adjoint/grad_cosine/<stage>`` (each
    approximate stage's own parameters; stages with exact methods or without trainable parameters are not
    measured, so nothing is logged as NaN). With ``fallback=True`` a stage whose cosine drops below
    ``threshold`` is switched to ``fallback_method`` (default ``block``: exact, per-block inputs), logged as
    ``adjoint/fallback/<stage>`` and kept across resumes. Under DDP the decision uses the minimum over ranks.
    The measurement is the one ``diagnose`` and the auto policy use (``lightning_resode.fidelity``).
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        sample_images: int = 8,
        threshold: float = 0.99,
        fallback: bool = False,
        fallback_method: str = "block",
    ) -> None:
        super().__init__()
        _check_every(every_n_steps)
        if sample_images < 2:
            raise ValueError(f"sample_images must be >= 2 (BatchNorm needs two), got {sample_images}")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        exact = [name for name, m in METHODS.items() if m.exact]
        if fallback_method not in exact:
            raise ValueError(f"fallback_method must be an exact method, one of {exact}; got {fallback_method!r}")
        self.every_n_steps, self.sample_images, self.threshold = every_n_steps, sample_images, threshold
        self.fallback, self.fallback_method = fallback, fallback_method
        self.switched: list[str] = []
        self.last_cosines: dict[str, float] = {}

    def measure(self, trainer: pl.Trainer, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Cosines of the current gradient vs exact: ``{"": whole model, stage name: that stage}``."""
        stages = {n: s for n, s in adjoint_stages(model).items() if not METHODS[s.method].exact}
        if not stages:
            return {}
        with trainer.precision_plugin.forward_context():
            try:
                fidelity = stage_fidelity(model, stages, images, targets)
            except (ReconstructionError, AdjointError):
                return {"": -1.0, **{name: -1.0 for name in stages}}  # the method failed outright on this batch
        return {name: cosine for name, (cosine, _) in fidelity.items()}

    def _switch(self, model: nn.Module, name: str, reason: str) -> None:
        """Move a stage to the exact method for good: through the stage policy where there is one (its owner)."""
        policy = policy_of(model)
        if policy is not None and name in policy.stages:
            policy.pin(name, self.fallback_method, reason)
        else:
            stage = adjoint_stages(model)[name]
            stage.configure(method=self.fallback_method)
            stage.fallback = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = _network(pl_module)
        stages = adjoint_stages(model)
        for name in self.switched:  # re-apply fallbacks after a resume
            if name in stages:
                self._switch(model, name, "switched by GradientFidelity before the resume")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not _due(trainer, self.every_n_steps):
            return
        model = _network(pl_module)
        images, targets = _sample(batch, self.sample_images)
        if images.shape[0] < 2 or not adjoint_stages(model):
            return
        cosines = self.measure(trainer, model, images, targets)
        self.last_cosines = cosines
        if not cosines:
            return
        metrics = {"adjoint/grad_cosine" + (f"/{name}" if name else ""): value for name, value in cosines.items()}
        if self.fallback:
            self._maybe_switch(pl_module, model, cosines)
            metrics.update({f"adjoint/fallback/{name}": 1.0 for name in self.switched})
        _log(trainer, metrics)
        log_stage_rows(trainer, "adjoint/stages", [{"stage": n, "grad_cosine": c, "fallback": n in self.switched} for n, c in cosines.items() if n])  # fmt: skip

    def _maybe_switch(self, pl_module: pl.LightningModule, model: nn.Module, cosines: dict[str, float]) -> None:
        stages = adjoint_stages(model)
        for name, value in cosines.items():
            if not name or name in self.switched:
                continue
            worst = float(pl_module.all_gather(torch.tensor(value, device=pl_module.device)).min())
            if worst < self.threshold and name in stages:
                self._switch(model, name, f"GradientFidelity measured a gradient cosine of {worst:.4f} < {self.threshold}")
                self.switched.append(name)
                rank_zero_warn(
                    f"stage {name}: gradient cosine {worst:.4f} < {self.threshold}; switched it to "
                    f"scheme {self.fallback_method!r} (exact) for the rest of training"
                )

    def state_dict(self) -> dict[str, Any]:
        return {"switched": list(self.switched)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.switched = list(state_dict.get("switched", []))


# ---------------------------------------------------------------------- reconstruction
class ReconstructionMonitor(pl.Callback):
    """Logs each stage's relative reconstruction error ``adjoint/recon_error/<stage>`` from its last backward.

    Stages with a shape-changing head (most timm stages) measure it for free (on every 4th row and column of the
    state: ``BackwardReport.reconstruction_error``); ``keep_input=True`` makes the
    others keep their input too (one extra boundary activation per stage) so every stage reports.
    """

    def __init__(self, every_n_steps: int = 10, keep_input: bool = False) -> None:
        super().__init__()
        _check_every(every_n_steps)
        self.every_n_steps, self.keep_input = every_n_steps, keep_input
        self.last_errors: dict[str, float] = {}
        self._latest: dict[str, float] = {}
        self._handles: list = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, stage in adjoint_stages(_network(pl_module)).items():
            if self.keep_input:
                stage.keep_input = True
            self._handles.append(stage.register_report_hook(functools.partial(self._record, name)))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, name: str, _stage: Any, report: Any) -> None:
        if report.plan is not None and report.plan.measurement:
            return  # a fidelity or memory measurement, not the training step
        if report.reconstruction_error is None:
            self._latest.pop(name, None)
        else:
            self._latest[name] = report.reconstruction_error

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not _due(trainer, self.every_n_steps):
            return
        errors = dict(self._latest)
        if errors:
            metrics = {f"adjoint/recon_error/{name}": value for name, value in errors.items()}
            _log(trainer, {"adjoint/recon_error": max(errors.values()), **metrics})
        self.last_errors = errors


# ---------------------------------------------------------------------- summary
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
            "peak_mib": round(max(peak_memory_mib(pl_module.device) or 0.0, memory.peak_mib if memory else 0.0), 1) or None,
            "peak_mib_per_image": memory.peak_mib_per_image if memory else None,
            "backprop_peak_mib_per_image": memory.backprop_peak_mib_per_image if memory else None,
            "activations_mib_per_image": memory.activations_mib if memory else None,
            "backprop_activations_mib_per_image": memory.backprop_activations_mib if memory else None,
            "stages": {name: s.method for name, s in stages.items()},
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
    ours, backprop = summary.get("peak_mib_per_image"), summary.get("backprop_peak_mib_per_image")
    if ours and backprop:
        table.add_row("peak memory per image", f"{backprop / ours:.1f}× less than backprop")
    adjoint, backprop = summary.get("activations_mib_per_image"), summary.get("backprop_activations_mib_per_image")
    if adjoint and backprop:
        table.add_row("kept at rest per image", f"{backprop / adjoint:.1f}× less than backprop")
    Console().print(table)
