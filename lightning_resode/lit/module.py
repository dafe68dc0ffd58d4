"""The LightningModule: a timm classifier whose residual stages train with the discrete adjoint.

Every hyperparameter is a typed constructor argument, so a recipe YAML (and ``--print_config``) is the
complete description of a run. The wrapped network stays a timm model with timm's state_dict keys
(``self.model``), so fine-tuned weights load back into ``timm.create_model`` (see ``export_timm_weights``).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
import timm
import timm.data
import timm.optim
import timm.scheduler
import timm.utils
import torch
import torch.nn.functional as F
from timm.data import Mixup
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .. import ode_resnet as _ode_resnet  # noqa: F401  (registers the "ode_resnet" timm model)
from ..adjoint import AdjointSequential
from ..adjoint.stage import check_reconstruction_options
from ..adjoint.methods import METHODS, get_method
from ..convert import adjoint_stages, policy_of, supported_stage_names, to_adjoint
from ..policy import AUTO_CANDIDATES, StagePolicy, check_policy_options
from ..pretrained import PretrainedWeightsUnavailable, create_model
from .distributed import validate_distributed
from ._lightning_private import forget_train_loader, train_loaders
from .checkpointing import atomic_save, safe_load
from .guards import check_finite_input, check_finite_loss
from .ema import ModelEma

SchedulerName = Literal["cosine", "step", "multistep", "plateau", "poly", "tanh", "none"]
_SCHEDULERS = ("cosine", "step", "multistep", "plateau", "poly", "tanh", "none")
Scheme = Literal["auto", "euler_fast", "euler", "heun", "block_fp16", "block_bf16", "block", "checkpoint", "backprop"]
TopStepDtype = Literal["bfloat16", "float16", "float32", "none"]
_TOP_STEP_DTYPES: dict[str, torch.dtype | None] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "none": None,
}
_MODEL_PREFIX = "model."


class BatchTooSmallError(ValueError):
    """A training batch too small for BatchNorm: one value per channel has no variance to normalise with."""


def _batch_too_small(images: torch.Tensor, step: int, model_name: str, trainer: Any) -> BatchTooSmallError:
    """Name the batch, why BatchNorm refuses it, and the setting that fixes it (the batch size, or the epoch's
    last partial batch)."""
    count, size = images.shape[0], "x".join(str(d) for d in images.shape[-2:])
    datamodule = getattr(trainer, "datamodule", None)
    batch_size = getattr(datamodule, "batch_size", None)
    if isinstance(batch_size, int) and batch_size > count:
        train_set = getattr(datamodule, "train_set", None)
        total = f"{len(train_set)} training images" if train_set is not None else "the training set"
        fix = (
            f"it is the epoch's last, partial batch ({total} in batches of {batch_size}); choose a batch_size that "
            "does not leave a single image"
        )
    else:
        fix = "train with data.init_args.batch_size >= 2 (or larger images)"
    return BatchTooSmallError(
        f"a training batch of {count} image(s) of {size} pixels at step {step}: {model_name}'s BatchNorm then sees "
        f"one value per channel (its last stages reduce each image to 1x1) and cannot normalise it; {fix}"
    )


def _check_schedule_options(hp: Any) -> None:
    """Schedule options out of range fail here, naming the value, not at the first optimizer step."""
    if hp.scheduler not in _SCHEDULERS:
        raise ValueError(f"unknown scheduler {hp.scheduler!r}; valid: {list(_SCHEDULERS)}")
    if hp.decay_epochs is not None and hp.decay_epochs <= 0:
        raise ValueError(f"decay_epochs must be > 0, got {hp.decay_epochs}")
    if hp.decay_milestones is not None and (not hp.decay_milestones or any(m <= 0 for m in hp.decay_milestones)):
        raise ValueError(f"decay_milestones must be a non-empty list of epochs > 0, got {hp.decay_milestones}")
    if hp.decay_rate <= 0:
        raise ValueError(f"decay_rate must be > 0, got {hp.decay_rate}")
    if hp.patience_epochs < 0 or hp.cooldown_epochs < 0 or hp.warmup_epochs < 0:
        raise ValueError(
            "patience_epochs, cooldown_epochs and warmup_epochs must be >= 0, got "
            f"{hp.patience_epochs}, {hp.cooldown_epochs} and {hp.warmup_epochs}"
        )
    if hp.scheduler == "plateau" and hp.decay_rate >= 1:
        raise ValueError(f"plateau needs decay_rate < 1 (the factor applied on a plateau), got {hp.decay_rate}")
    if hp.plateau_mode not in ("min", "max"):
        raise ValueError(f"plateau_mode must be 'min' or 'max', got {hp.plateau_mode!r}")
    if hp.cycle_limit < 1 or hp.cycle_mul <= 0:
        raise ValueError(f"cycle_limit must be >= 1 and cycle_mul > 0, got {hp.cycle_limit} and {hp.cycle_mul}")
    if hp.ema_decay is not None and not 0.0 < hp.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1) or None, got {hp.ema_decay}")


def _check_model_name(model_name: str) -> None:
    if timm.is_model(model_name):
        return
    # suggest only the families to_adjoint converts (timm's resnet and resnetv2 modules): a close name of
    # another family would be refused next
    close = difflib.get_close_matches(model_name, timm.list_models(module=["resnet", "resnetv2"]), n=5, cutoff=0.6)
    hint = f"; did you mean {close}?" if close else "; see timm.list_models('resnet*')"
    raise ValueError(f"unknown timm model name {model_name!r}{hint}")


def _build_timm_model(model_name: str, pretrained: bool, num_classes: int, model_kwargs: dict[str, Any]) -> nn.Module:
    """timm model through ``pretrained.create_model``: hub weights fail fast offline, with the fix in the message."""
    try:
        return create_model(model_name, pretrained=pretrained, num_classes=num_classes, **model_kwargs)
    except PretrainedWeightsUnavailable as err:
        raise PretrainedWeightsUnavailable(
            f"{err}.\nIn a recipe or on the command line: --model.weights_file=weights.safetensors (that file), "
            "or --model.pretrained=false to start from random weights"
        ) from None


class ResodeClassifier(pl.LightningModule):
    """Image classification with a timm model whose residual stages are memory-free adjoint stages.

    Args:
        model_name: any timm model name (ResNet v1 / ResNetV2 families get adjoint stages; ``ode_resnet`` is
            the paper's deep ODE-style ResNet, registered by this package).
        pretrained: load timm's pretrained weights from the hub (or its local cache); offline this fails within
            seconds, saying how to pass the weights as ``weights_file`` instead. Ignored when ``weights_file``
            is set (the local file is the starting point).
        num_classes: classifier outputs (linked from the DataModule by the CLI).
        weights_file: a local ``.safetensors``/``.pth``/``.ckpt`` to initialise from (timm keys, or a Lightning
            checkpoint of this module); only the classifier may differ (another number of classes). The two-phase
            route loads the tied phase's checkpoint into the untied model this way.
        weights_partial: let ``weights_file`` differ beyond the classifier (keys of another shape, missing or
            unknown are skipped, with a warning listing them); otherwise that is an error naming the keys.
        model_kwargs: extra ``timm.create_model`` arguments (``drop_path_rate``, ODE ResNet ``depth``…).
        stages: stage names to convert (``["layer3", "layer4"]``, or one name); ``None`` converts all, ``[]`` none.
        scheme: how each converted stage computes its gradient. ``auto`` (default): per stage, the method
            with the least peak memory whose gradient cosine against exact backprop reaches ``min_cosine``,
            measured on the first training batch (on the training device and precision, on rank 0, the
            choice broadcast to every rank) and every ``recheck_every`` steps. Or one method for every stage:
            ``euler_fast``/``euler`` (reconstruct backwards: ODE-like weights only), ``heun`` (a Heun network),
            ``block_fp16``/``block_bf16`` (each block's input stored in 16 bits), ``block`` (exact),
            ``checkpoint`` (whole-stage, exact), ``backprop``. An approximate explicit method is measured
            once on the first batch and warns when its gradient is below ``min_cosine``.
        refine, anchor_every: reconstruction options for every converted stage.
        top_step_dtype: keep each stage's top-step increment in this dtype (``none``: reconstruct it too); one
            block forward less per stage in backward and a more exact top block, for half a state per stage.
        store_every: per-block methods in deep stages keep the first block input of each run of blocks and
            re-run the rest in backward (memory flat in depth, one extra forward per re-run block, same
            gradient); an int K: runs of K blocks; ``auto``: in stages of 9 or more blocks, runs that shorten
            towards the top, split to hold the fewest states while one is re-run; ``null``: keep every input.
        min_cosine: the gradient fidelity ``auto`` must reach (whole model and each stage).
        recheck_every: ``auto`` recalibrates every this many optimizer steps (0: first step only, and after a
            stage had to fall back to an exact gradient).
        freeze: module names to freeze (``["conv1", "bn1", "layer1"]``): no gradients, BatchNorm frozen.
        label_smoothing: cross-entropy label smoothing (also used for mixup targets).
        mixup_alpha, cutmix_alpha: timm ``Mixup``; both 0 disables it.
        optimizer: any ``timm.optim.create_optimizer_v2`` name (``sgd``, ``adamw``, ``lamb``…; torch's included).
        lr, weight_decay, momentum: optimizer settings.
        scheduler: a ``timm.scheduler`` name stepped every optimizer update, ``plateau`` (torch's
            ``ReduceLROnPlateau``, stepped once per epoch on ``plateau_monitor``), or ``none``.
        warmup_epochs: linear warm-up from ``warmup_lr`` (fractional epochs allowed).
        min_lr, warmup_lr: schedule bounds.
        decay_epochs: ``step``: epochs between two decays; ``None``: every 30 % of the run (timm's 90 of 300).
        decay_milestones: ``multistep``: the epochs at which to decay; ``None``: at 30, 60 and 90 % of the run.
        decay_rate: factor per decay (``step``, ``multistep``, ``plateau``); the power for ``poly``.
        patience_epochs: ``plateau``: epochs without improvement before a decay.
        plateau_monitor, plateau_mode: ``plateau``: the logged metric it watches and whether lower (``min``) or
            higher (``max``) is better.
        cooldown_epochs: ``cosine``/``tanh``/``poly``: the schedule ends this many epochs before the run does, and
            the last epochs train at ``min_lr``.
        cycle_limit, cycle_mul, cycle_decay: ``cosine``/``tanh``/``poly`` restarts: number of cycles, length
            multiplier and peak decay per cycle (one cycle by default).
        ema_decay: keep an exponential moving average of the weights with this decay (e.g. ``0.999``); the
            average is what validation measures and what checkpoints store. ``None`` disables it.
        channels_last: run the network and its inputs in ``torch.channels_last`` memory format (faster
            convolutions with mixed precision on recent GPUs).
        compile: ``torch.compile`` the network in place (state_dict keys unchanged) with this backend
            (``inductor``, ``aot_eager``, …; ``true``: inductor; ``false``: eager). The converted stages run
            eagerly inside the compiled model (one graph break each); the rest is compiled.
    """

    def __init__(
        self,
        model_name: str = "resnet18",
        pretrained: bool = False,
        num_classes: int = 10,
        weights_file: str | None = None,
        weights_partial: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        stages: list[str] | str | None = None,
        scheme: Scheme = "auto",
        refine: int = 0,
        anchor_every: int | None = None,
        top_step_dtype: TopStepDtype = "bfloat16",
        store_every: int | Literal["auto"] | None = "auto",
        min_cosine: float = 0.99,
        recheck_every: int = 500,
        freeze: list[str] | None = None,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        momentum: float = 0.9,
        scheduler: SchedulerName = "cosine",
        warmup_epochs: float = 0.0,
        min_lr: float = 0.0,
        warmup_lr: float = 1e-6,
        decay_epochs: float | None = None,
        decay_milestones: list[float] | None = None,
        decay_rate: float = 0.1,
        patience_epochs: int = 10,
        plateau_monitor: str = "val/loss",
        plateau_mode: Literal["min", "max"] = "min",
        cooldown_epochs: float = 0.0,
        cycle_limit: int = 1,
        cycle_mul: float = 1.0,
        cycle_decay: float = 0.1,
        ema_decay: float | None = None,
        channels_last: bool = False,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        if isinstance(stages, str):  # --model.stages=layer4: one stage, as to_adjoint takes it
            stages = [stages]
        self.save_hyperparameters()
        _check_schedule_options(self.hparams)
        _check_model_name(model_name)
        check_policy_options(scheme, min_cosine, recheck_every)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (a classifier with one class has nothing to learn), got {num_classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        check_reconstruction_options(refine, anchor_every, prefix="model.")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha} and {cutmix_alpha}")
        self.model = _build_timm_model(model_name, pretrained and weights_file is None, num_classes, model_kwargs or {})
        if weights_file is not None:
            load_weights_file(self.model, weights_file, partial=weights_partial)
        self._check_stage_names(stages)
        self.policy: StagePolicy | None = self._convert()
        self._check_freeze_names(freeze or [])
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            backend = "inductor" if compile is True else compile
            if backend not in torch.compiler.list_backends(exclude_tags=()):
                raise ValueError(f"model.compile: unknown torch.compile backend {backend!r}; valid: {torch.compiler.list_backends()}")
            self.model.compile(backend=backend)  # in place: the same module, keys and policy hooks
        self.mixup = (
            Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=label_smoothing, num_classes=num_classes)
            if mixup_alpha > 0 or cutmix_alpha > 0
            else None
        )
        top_k = min(5, num_classes)
        # top-1/top-5 as timm's validate reports them: right answers over images (torchmetrics' default, a mean
        # over classes, is balanced accuracy: it differs on unbalanced sets and printed 1.0000001 in float32)
        self.val_top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes=num_classes, top_k=top_k, average="micro")
        self.test_top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
        self.test_top5 = MulticlassAccuracy(num_classes=num_classes, top_k=top_k, average="micro")
        self._frozen = False
        #: (height, width) of the images the weights were last trained on, saved in checkpoints: evaluating at
        #: another size (a digits model trained at 32² scored chance at 64²) is said once, not left silent
        self.trained_image_size: tuple[int, int] | None = None
        self._size_noted = False

    # ------------------------------------------------------------------ model surgery
    def _has_native_stages(self) -> bool:
        """Models built from ``AdjointSequential`` already (the ODE ResNet) are configured, not converted."""
        return any(isinstance(m, AdjointSequential) for m in self.model.modules())

    def _check_stage_names(self, stages: list[str] | None) -> None:
        if stages is None or not stages:
            return
        valid = list(adjoint_stages(self.model)) if self._has_native_stages() else supported_stage_names(self.model)
        unknown = [s for s in stages if s not in valid]
        if unknown:
            raise ValueError(f"unknown stage name(s) {unknown} for {self.hparams.model_name}; valid: {valid}")

    def _check_freeze_names(self, names: list[str]) -> None:
        modules = dict(self.model.named_modules())
        unknown = [n for n in names if n not in modules or not n]
        if unknown:
            top_level = [n for n, _ in self.model.named_children()]
            raise ValueError(f"cannot freeze unknown module(s) {unknown} of {self.hparams.model_name}; e.g. {top_level}")

    def _convert(self) -> StagePolicy | None:
        """Convert (timm) or configure (ODE ResNet) the stages; returns the policy that measures them, if any."""
        hp = self.hparams
        if hp.stages is not None and not hp.stages:
            return None
        options = dict(
            refine=hp.refine, anchor_every=hp.anchor_every, top_step_dtype=_TOP_STEP_DTYPES[hp.top_step_dtype],
            store_every=hp.get("store_every", "auto"),
        )
        if not self._has_native_stages():
            to_adjoint(self.model, stages=hp.stages, scheme=hp.scheme, min_cosine=hp.min_cosine, recheck_every=hp.recheck_every, **options)
            policy = policy_of(self.model)
        else:
            stages = {n: s for n, s in adjoint_stages(self.model).items() if hp.stages is None or n in hp.stages}
            network = next(iter(stages.values())).scheme if stages else "euler"
            for stage in stages.values():
                method = "block" if hp.scheme == "auto" else hp.scheme
                stage.configure(method=method, scheme=get_method(method).scheme or network, **options)
            if hp.scheme == "auto":
                # an ODE ResNet is the network its scheme says (Heun or Euler): reconstruct with that scheme only
                reconstruction = ("heun",) if network == "heun" else ("euler_fast", "euler")
                candidates = reconstruction + tuple(c for c in AUTO_CANDIDATES if METHODS[c].gradient != "adjoint")
                policy = StagePolicy(stages, mode="auto", min_cosine=hp.min_cosine, recheck_every=hp.recheck_every, candidates=candidates)
            elif not METHODS[hp.scheme].exact:
                policy = StagePolicy(stages, mode="check", min_cosine=hp.min_cosine, recheck_every=0)
            else:
                policy = None
        if policy is not None:
            policy.external = True  # training_step calibrates with the real targets
        return policy

    def _apply_freeze(self) -> None:
        if self.hparams.freeze and not self._frozen:
            timm.utils.freeze(self.model, list(self.hparams.freeze))
            self._frozen = True

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        validate_distributed(self.trainer, self)
        self._apply_freeze()
        if self.policy is not None and self.trainer.world_size > 1:
            # rank 0 measures, every rank trains with its decisions (the same gradient method everywhere)
            self.policy.leader = self.trainer.is_global_zero
            self.policy.sync = self._broadcast_methods

    def _broadcast_methods(self, settings: dict[str, tuple[str, tuple[str, ...]]] | None) -> dict[str, tuple[str, tuple[str, ...]]]:
        return self.trainer.strategy.broadcast(settings, src=0)

    def _calibrate_if_due(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """The stage policy measures on this batch (first step, every ``recheck_every``), before the forward."""
        policy = self.policy
        if policy is None:
            return
        known = len(policy.decisions)
        calibrating = policy.due() and images.shape[0] >= 2  # the same on every rank: steps, not measurements
        policy.before_step(self.model, (images, targets))
        if calibrating:
            # every rank takes part (asking for the log directory is a collective under DDP); rank 0 writes
            self._log_decisions(policy.decisions[known:])

    def _log_decisions(self, decisions: list) -> None:
        """Decisions as ``policy/*`` metrics, console lines and ``policy.json`` (rank 0), on every rank's call."""
        order = list(METHODS)
        metrics: dict[str, float] = {}
        for d in decisions:
            metrics[f"policy/method_rank/{d.stage}"] = float(order.index(d.method))
            metrics[f"policy/grad_cosine/{d.stage}"] = float(d.grad_cosine)
        # log_dir is a collective under DDP: every rank asks, only rank 0 writes
        log_dir = self.trainer.log_dir if self.trainer.loggers else None
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers if metrics else ():
                logger.log_metrics(metrics, step=self.global_step)
            for d in decisions:
                rank_zero_info(f"stage policy, step {d.step}: {d.stage} -> {d.method} ({d.reason})")
            if log_dir:
                path = Path(log_dir) / "policy.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps([d.as_dict() for d in self.policy.decisions], indent=2) + "\n")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.policy is not None:
            checkpoint["resode_policy"] = self.policy.state_dict()
        if self.trained_image_size is not None:
            checkpoint["resode_trained_image_size"] = list(self.trained_image_size)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.policy is not None and "resode_policy" in checkpoint:
            self.policy.load_state_dict(checkpoint["resode_policy"])
        if "resode_trained_image_size" in checkpoint:
            self.trained_image_size = tuple(int(v) for v in checkpoint["resode_trained_image_size"])
            self._size_noted = False

    def configure_callbacks(self) -> list[pl.Callback]:
        if self.hparams.ema_decay is None or self.trainer.state.fn != "fit":
            return []
        return [ModelEma(decay=self.hparams.ema_decay)]

    def data_config(self) -> dict[str, Any]:
        """timm's data config of the network (its pretrained weights' input size, interpolation, crop, mean/std):
        what the DataModules build their transforms from (``lightning_resode.lit.data.model_data_config``)."""
        return dict(timm.data.resolve_model_data_config(self.model))

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:  # the network's weights were converted in __init__
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self._layout(images))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        check_finite_input(images, self.global_step)
        self.trained_image_size = (int(images.shape[-2]), int(images.shape[-1]))
        images = self._layout(images)  # the stage policy measures the layout training runs in
        self._calibrate_if_due(images, targets)
        try:
            if self.mixup is not None and images.shape[0] % 2 == 0:
                images, soft_targets = self.mixup(images, targets)
                loss = torch.sum(-soft_targets * F.log_softmax(self(images), dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(self(images), targets, label_smoothing=self.hparams.label_smoothing)
        except ValueError as err:
            if "Expected more than 1 value per channel" not in str(err):
                raise
            raise _batch_too_small(images, self.global_step, self.hparams.model_name, self.trainer) from None
        check_finite_loss(loss, self.global_step, self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=images.shape[0])
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def _note_another_image_size(self, images: torch.Tensor) -> None:
        """Outside fit (validate, test, predict of a checkpoint), say once that the images are not the size the
        weights were trained on: the figures then measure the network at another resolution, not the trained one."""
        if self._size_noted or self.trained_image_size is None or self._trainer is None or self.trainer.state.fn == "fit":
            return
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if size != self.trained_image_size:
            self._size_noted = True
            trained = "x".join(map(str, self.trained_image_size))
            rank_zero_warn(
                f"{self.trainer.state.fn}: the images are {size[0]}x{size[1]}, but this checkpoint was trained on "
                f"{trained} images; its accuracy at another size can be far lower (set the data's image size to "
                f"{trained} to evaluate the network as trained)"
            )

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str) -> None:
        images, targets = batch
        self._note_another_image_size(images)
        logits = self(images)
        loss = F.cross_entropy(logits, targets)
        top1, top5 = (self.val_top1, self.val_top5) if prefix == "val" else (self.test_top1, self.test_top5)
        top1(logits, targets)
        top5(logits, targets)
        kwargs = dict(on_step=False, on_epoch=True, batch_size=images.shape[0], sync_dist=True)
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val", **kwargs)
        self.log(f"{prefix}/acc", top1, prog_bar=prefix == "val", on_step=False, on_epoch=True)
        self.log(f"{prefix}/acc_top5", top5, on_step=False, on_epoch=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._note_another_image_size(images)
        return self(images).softmax(dim=-1)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = timm.optim.create_optimizer_v2(
            self.model, opt=hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay, momentum=hp.momentum
        )
        _check_optimizer_precision(optimizer, self.trainer.precision)
        if hp.scheduler == "none":
            return optimizer
        updates_per_epoch, max_epochs = self._schedule_length()
        if hp.scheduler == "plateau":
            return [optimizer], self._plateau_schedulers(optimizer, updates_per_epoch)
        if hp.cooldown_epochs >= max_epochs:
            raise ValueError(f"cooldown_epochs={hp.cooldown_epochs} leaves no schedule in a run of {max_epochs} epochs")
        cycles = sum(hp.cycle_mul**i for i in range(hp.cycle_limit))  # the cycles fill the run before the cooldown
        scheduler, _ = timm.scheduler.create_scheduler_v2(
            optimizer,
            sched=hp.scheduler,
            num_epochs=(max_epochs - hp.cooldown_epochs) / cycles,
            decay_epochs=hp.decay_epochs if hp.decay_epochs is not None else 0.3 * max_epochs,
            # timm's multistep decays one update before each milestone (its documented convention); shifted by one
            # update so the epochs from a milestone on, and only those, train at the decayed rate
            decay_milestones=[m + 1 / updates_per_epoch for m in hp.decay_milestones or [f * max_epochs for f in (0.3, 0.6, 0.9)]],
            decay_rate=hp.decay_rate,
            warmup_epochs=hp.warmup_epochs,
            warmup_lr=hp.warmup_lr,
            min_lr=hp.min_lr,
            cycle_limit=hp.cycle_limit,
            cycle_mul=hp.cycle_mul,
            cycle_decay=hp.cycle_decay,
            step_on_epochs=False,
            updates_per_epoch=updates_per_epoch,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _schedule_length(self) -> tuple[int, int]:
        """Optimizer updates per epoch and epochs in the run, from the epoch length alone (not ``max_steps``), so a
        run stopped early and resumed keeps the same schedule."""
        built_early = not train_loaders(self.trainer)
        if built_early:
            self.trainer.fit_loop.setup_data()  # what estimated_stepping_batches does: sets num_training_batches
        batches = self.trainer.num_training_batches
        if built_early:  # fit() builds it again after the restore, which applies the checkpoint's data position
            forget_train_loader(self.trainer)
        if not math.isfinite(batches):
            raise ValueError("scheduler needs a sized training DataLoader; set scheduler='none' or limit_train_batches")
        updates_per_epoch = max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            if self.trainer.max_steps < 1:
                raise ValueError(
                    f"scheduler={self.hparams.scheduler!r} needs trainer.max_epochs or max_steps, got {max_epochs}"
                )
            max_epochs = math.ceil(self.trainer.max_steps / updates_per_epoch)
        return updates_per_epoch, max_epochs

    def _plateau_schedulers(self, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> list[dict[str, Any]]:
        """torch's ``ReduceLROnPlateau`` once per epoch on the monitored metric (Lightning checkpoints its state, so a
        resumed run keeps its patience), after an optional linear warm-up stepped every update."""
        hp = self.hparams
        schedulers: list[dict[str, Any]] = []
        warmup_updates = round(hp.warmup_epochs * updates_per_epoch)
        if warmup_updates > 0:
            start = min(1.0, max(hp.warmup_lr / hp.lr, 1e-8)) if hp.lr > 0 else 1.0
            warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=start, total_iters=warmup_updates)
            schedulers.append({"scheduler": warmup, "interval": "step"})
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=hp.plateau_mode, factor=hp.decay_rate, patience=hp.patience_epochs, min_lr=hp.min_lr
        )
        schedulers.append({"scheduler": plateau, "interval": "epoch", "monitor": hp.plateau_monitor, "strict": True})
        return schedulers

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if isinstance(scheduler, timm.scheduler.scheduler.Scheduler):
            # timm schedulers take the update count instead of counting calls, so a resumed run lands on the same LR
            scheduler.step_update(num_updates=self.global_step)
        elif metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)


def _check_optimizer_precision(optimizer: torch.optim.Optimizer, precision: str) -> None:
    """float16 weights keep the optimizer state in float16 too, where an ``eps`` like AdamW's 1e-8 rounds to 0."""
    if str(precision) not in ("16-true", "16"):
        return
    smallest = torch.finfo(torch.float16).tiny
    eps = [g["eps"] for g in optimizer.param_groups if isinstance(g.get("eps"), float) and g["eps"] < smallest]
    if eps:
        raise ValueError(
            f"precision='16-true' with optimizer {type(optimizer).__name__} (eps={eps[0]:g}) diverges: its state is "
            f"float16, where eps rounds to {float(torch.tensor(eps[0], dtype=torch.float16)):g}. Use bf16-true, "
            "bf16-mixed or 16-mixed (float32 weights), or an optimizer without eps (sgd, lion)"
        )


# ---------------------------------------------------------------------- weights in and out
def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = safe_load(path)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if any(k.startswith(_MODEL_PREFIX) for k in state):
        state = {k[len(_MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(_MODEL_PREFIX)}
    return state


def _classifier_prefix(model: nn.Module) -> str | None:
    """``fc.`` / ``head.fc.``: the state_dict prefix of timm's classifier, the one part a fine-tune may reshape."""
    get = getattr(model, "get_classifier", None)
    classifier = get() if callable(get) else None
    if not isinstance(classifier, nn.Module):
        return None
    return next((f"{name}." for name, module in model.named_modules() if module is classifier and name), None)


def load_weights_file(model: nn.Module, path: str | Path, partial: bool = False) -> list[str]:
    """Initialise ``model`` from timm-keyed weights or a Lightning checkpoint; returns the keys it skipped.

    Only the classifier may differ (another number of classes): any other key of another shape, missing from the
    file or unknown to the model is an error naming them, unless ``partial=True``, which loads what matches and
    warns with the list of what it skipped.
    """
    state = _read_state_dict(Path(path))
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    mismatched = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    head = _classifier_prefix(model)
    outside_head = [k for k in unknown + mismatched + missing if head is None or not k.startswith(head)]
    if outside_head and not partial:
        parts = [f"{len(keys)} key(s) {what} (e.g. {keys[:3]})" for what, keys in (
            ("of another shape", [k for k in mismatched if k in outside_head]),
            ("missing from the file", [k for k in missing if k in outside_head]),
            ("unknown to the model", [k for k in unknown if k in outside_head]),
        ) if keys]
        raise ValueError(
            f"weights file {str(path)!r} does not fit this model beyond its classifier ({head or 'none found'}): "
            f"{'; '.join(parts)}. Check model_name/model_kwargs, or load what matches with "
            "partial=True (model.weights_partial=true)"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in mismatched}, strict=False)
    skipped = sorted(set(unknown + mismatched + missing))
    if skipped:
        warnings.warn(f"weights file {str(path)!r}: skipped {len(skipped)} key(s) that do not fit: {skipped[:20]}", stacklevel=2)
    return skipped


def export_timm_weights(checkpoint: str | Path, output: str | Path) -> Path:
    """Write a Lightning checkpoint's network as plain timm weights (``.safetensors`` or ``.pth``).

    Load them with ``timm.create_model(name, pretrained=True, num_classes=N,
    pretrained_cfg_overlay=dict(file=str(output), num_classes=N))`` (N in the overlay too, or timm
    re-initialises the classifier as a mismatched head).
    """
    output = Path(output)
    if output.exists() and output.resolve() == Path(checkpoint).resolve():
        raise ValueError(f"export_timm_weights would overwrite its input {str(checkpoint)!r}; write to another file")
    state = _read_state_dict(Path(checkpoint))
    state = {k: v.contiguous() for k, v in state.items()}
    if output.suffix == ".safetensors":
        from safetensors.torch import save_file

        output.parent.mkdir(parents=True, exist_ok=True)
        temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
        try:
            save_file(state, str(temporary))
            os.replace(temporary, output)
        finally:
            temporary.unlink(missing_ok=True)
    else:
        atomic_save(state, output)
    return output
