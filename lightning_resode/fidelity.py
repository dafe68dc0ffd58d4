"""Gradient fidelity: a stage's gradient against exact backprop, on one batch, with no side effects.

One module serves ``diagnose``, the auto policy and the Lightning fidelity callback, so all three compare
against the same exact reference in the same way. The reference is each stage's exact ``block`` method
(every block input stored as is: plain autograd's gradient up to float rounding, which the engine's tests
check) rather than plain autograd itself, because a calibration or fidelity step is a training step too and
its peak must not exceed the training's: backprop keeps every activation (about 3x the peak per image of
``block`` on a resnet50). Comparisons use
cosine similarity and relative L2 error of the concatenated parameter gradients, measured in training
mode, with every BatchNorm buffer, the train/eval flags, ``.grad`` and the global random state left as
they were, and the same dropout / drop-path draws for the method under test and the reference.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adjoint import AdjointSequential, PlanLog, planned

_LOSS_SEED = 1234
_RUN_SEED = 4321


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``images`` or ``(images, targets, …)`` → (images, targets or None)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], torch.Tensor):
        targets = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], targets
    raise TypeError(f"expected images or (images, targets) tensors, got {type(batch).__name__}")


def calibration_loss(outputs: Any, targets: torch.Tensor | None) -> torch.Tensor:
    """The loss a measurement back-propagates: cross-entropy for logits, a fixed random projection for features.

    Logits: cross-entropy with the targets, or without them with fixed pseudo-labels, which give the cotangent a
    training loss has (softmax minus a one-hot) rather than an arbitrary direction. Features (a features_only
    model's list, tuple or dict of maps): the sum over maps of <map, a fixed random direction> / sqrt(size), the
    cotangent a head the measurement does not know would send, on average. A tensor that is not (batch, classes)
    (a backbone's feature map) is a feature too.
    """
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, torch.Tensor) and outputs.dim() != 2:
        outputs = [outputs]  # a backbone's feature map (num_classes=0, global_pool=""), not logits
    if isinstance(outputs, (list, tuple)):
        gen = torch.Generator().manual_seed(_LOSS_SEED)
        total = torch.zeros((), device=outputs[0].device)
        for feature in outputs:
            direction = torch.randn(feature.shape, generator=gen).to(feature.device)
            total = total + (feature.float() * direction).sum() / feature.numel() ** 0.5
        return total
    outputs = outputs.float()
    if targets is None or targets.dtype.is_floating_point and targets.dim() != 1:
        gen = torch.Generator().manual_seed(_LOSS_SEED)
        targets = torch.randint(0, outputs.shape[-1], (outputs.shape[0],), generator=gen).to(outputs.device)
    return F.cross_entropy(outputs, targets)


def unique_params(module: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters, each once (tied weights appear once)."""
    seen: dict[int, nn.Parameter] = {}
    for p in module.parameters():
        if p.requires_grad:
            seen.setdefault(id(p), p)
    return list(seen.values())


@contextlib.contextmanager
def side_effect_free(model: nn.Module, *, train: bool = True) -> Iterator[None]:
    """Measure in training mode; afterwards buffers, train/eval flags and the global RNG are as before."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        if train:
            model.train()
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in buffers:
                    buffer.copy_(value)
            for module, training in modes:
                module.training = training


def gradients(model: nn.Module, images: torch.Tensor, targets: torch.Tensor | None, params: Sequence[nn.Parameter] | None = None) -> dict[int, torch.Tensor]:
    """Parameter gradients of one training step, by parameter id (``.grad`` untouched; same random draws)."""
    params = unique_params(model) if params is None else list(params)
    torch.manual_seed(_RUN_SEED)
    loss = calibration_loss(model(images), targets)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {id(p): (torch.zeros_like(p) if g is None else g).detach() for p, g in zip(params, grads)}


def compare(grads: dict[int, torch.Tensor], exact: dict[int, torch.Tensor], params: Sequence[nn.Parameter]) -> tuple[float, float]:
    """Cosine similarity and relative L2 error of the concatenated gradients of ``params``.

    Accumulated tensor by tensor in float64 (no concatenated copy: that would be several times the model's
    size, during a calibration step). With no parameters (a frozen stage) there is nothing to compare:
    (1.0, 0.0), never NaN.
    """
    params = [p for p in params if id(p) in exact]
    if not params:
        return 1.0, 0.0
    dot = g_sq = e_sq = d_sq = 0.0
    for p in params:
        g = grads[id(p)].flatten().double()
        e = exact[id(p)].flatten().double()
        dot += float(torch.dot(g, e))
        g_sq += float(torch.dot(g, g))
        e_sq += float(torch.dot(e, e))
        d_sq += float(torch.dist(g, e)) ** 2
        del g, e
    e_norm, g_norm = math.sqrt(e_sq), math.sqrt(g_sq)
    if e_norm == 0 or g_norm == 0:
        same = all(torch.equal(grads[id(p)], exact[id(p)]) for p in params)
        return float(same), g_norm if e_norm == 0 else 1.0
    if not (math.isfinite(dot) and math.isfinite(g_norm) and math.isfinite(e_norm)):
        return float("nan"), float("nan")
    return max(-1.0, min(1.0, dot / (g_norm * e_norm))), math.sqrt(d_sq) / e_norm


def exact_stages(stages: dict[str, AdjointSequential]) -> contextlib.AbstractContextManager[PlanLog]:
    """Within this context every stage runs plain autograd (the backprop memory baseline); stages unchanged."""
    return planned(stages, method="backprop", fallback=False)


def exact_reference(stages: dict[str, AdjointSequential]) -> contextlib.AbstractContextManager[PlanLog]:
    """Within this context every stage runs the exact per-block method (the fidelity reference, see module doc)."""
    return planned(stages, method="block", fallback=False)


def exact_gradients(model: nn.Module, stages: dict[str, AdjointSequential], images: torch.Tensor, targets: torch.Tensor | None, params: Sequence[nn.Parameter] | None = None) -> dict[int, torch.Tensor]:
    """The reference gradient of one training step (exact, at the peak memory of the ``block`` method)."""
    with exact_reference(stages):
        return gradients(model, images, targets, params)


def no_fallback(stages: dict[str, AdjointSequential]) -> contextlib.AbstractContextManager[PlanLog]:
    """Measure a method as it is: an exact fallback would hide exactly what is being measured."""
    return planned(stages, fallback=False)


def stage_fidelity(model: nn.Module, stages: dict[str, AdjointSequential], images: torch.Tensor, targets: torch.Tensor | None) -> dict[str, tuple[float, float]]:
    """``{"": whole model, stage name: that stage's parameters}`` → (cosine, relative error) vs exact backprop.

    Runs in training mode without side effects; stages without trainable parameters (frozen) are left out.
    """
    return fidelity_and_reports(model, stages, images, targets)[0]


def fidelity_and_reports(
    model: nn.Module, stages: dict[str, AdjointSequential], images: torch.Tensor, targets: torch.Tensor | None, *, keep_input: bool | None = None
) -> tuple[dict[str, tuple[float, float]], PlanLog]:
    """``stage_fidelity``, and what the measured backward reported per stage (its plan, reconstruction error);
    ``keep_input=True`` makes every measured stage keep its input, so each reports its reconstruction error."""
    params = unique_params(model)
    with side_effect_free(model):
        with planned(stages, fallback=False, keep_input=keep_input) as log:
            approx = gradients(model, images, targets, params)
        exact = exact_gradients(model, stages, images, targets, params)
    result = {"": compare(approx, exact, params)}
    for name, stage in stages.items():
        stage_params = unique_params(stage)
        if stage_params:
            result[name] = compare(approx, exact, stage_params)
    return result, log
