"""Per-stage fidelity and memory of a converted model, on one batch, without side effects.

``diagnose(model, batch)`` answers, per converted stage: how large are its residual branches (how far from
an ODE), how well is its input reconstructed, how close is its gradient to exact backprop (the one
reference of ``lightning_resode.fidelity``), and how many bytes does it keep for backward. For a model
converted with ``scheme="auto"`` that has not calibrated yet, it calibrates first on the same batch, so
the records show the methods auto picks and why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adjoint import AdjointError, AdjointSequential, ReconstructionError
from .convert import adjoint_stages, policy_of
from .fidelity import _RUN_SEED, fidelity_and_reports, side_effect_free, split_batch
from .measure import saved_activation_bytes



@dataclass
class StageDiagnosis:
    """What one converted stage does to the gradient and to memory, on one batch."""

    stage: str
    #: how the stage computes its gradient (``lightning_resode.adjoint.methods``)
    method: str
    depth: int
    #: mean over the stage's residual blocks of ‖b(x) - x‖ / ‖x‖ (0: identity blocks; ≳0.3: far from an ODE)
    residual_ratio: float
    #: ‖x̂ - x‖ / ‖x‖ at the input of the reconstructed part (None for stored-input methods)
    reconstruction_error: float | None
    #: of this stage's parameter gradient against exact backprop (errors of the stages above included);
    #: NaN when the method failed on this batch
    grad_cosine: float
    grad_relative_error: float
    saved_bytes: int
    #: why the stage uses its method (the auto policy's reason), if a policy decided it
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _residual_ratios(model: nn.Module, stages: dict[str, AdjointSequential], images: torch.Tensor) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Per stage, mean ‖b(x) - x‖/‖x‖ over residual blocks, and each stage's input (one no-grad forward)."""
    ratios: dict[str, list[float]] = {name: [] for name in stages}
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, stage in stages.items():
        handles.append(stage.register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0].detach())))
        for n in range(stage.exact_head, len(stage)):

            def hook(_m, args, out, name=name) -> None:
                x = args[0]
                ratios[name].append(float((out - x).norm() / x.norm().clamp_min(1e-30)))

            handles.append(stage[n].register_forward_hook(hook))
    try:
        with torch.no_grad():
            torch.manual_seed(_RUN_SEED)
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sum(r) / len(r) if r else 0.0) for name, r in ratios.items()}, inputs


def diagnose(model: nn.Module, batch: Any) -> list[StageDiagnosis]:
    """One record per converted stage: residual size, reconstruction error, gradient fidelity, saved bytes.

    ``batch`` is ``images`` or ``(images, targets)``. Costs two training steps and one forward per stage
    (plus the calibration of an auto model that has not calibrated yet).
    """
    stages = adjoint_stages(model)
    if not stages:
        raise ValueError("no adjoint stages found: convert the model first with lightning_resode.to_adjoint(model)")
    images, targets = split_batch(batch)
    if not bool(torch.isfinite(images).all()):
        raise ValueError("diagnose: the images have NaN/inf values, so every figure would be NaN; give finite images")
    if targets is not None and targets.shape[:1] != images.shape[:1]:
        raise ValueError(f"diagnose: {images.shape[0]} images but targets of shape {tuple(targets.shape)}; give one target per image")
    policy = policy_of(model)
    if policy is not None and policy.mode == "auto" and policy.due():
        training = model.training
        policy.calibrate(model, (images, targets) if targets is not None else images)
        model.train(training)
    reasons = {}
    if policy is not None:
        for decision in policy.decisions:
            reasons[decision.stage] = decision.reason
    records = []
    with side_effect_free(model):
        ratios, stage_inputs = _residual_ratios(model, stages, images)
        try:
            fidelity, log = fidelity_and_reports(model, stages, images, targets, keep_input=True)
            failed = None
        except (ReconstructionError, AdjointError) as err:
            fidelity, log, failed = {}, None, err
        for name, stage in stages.items():
            cosine, rel = fidelity.get(name, (float("nan"), float("nan")) if failed else (1.0, 0.0))
            report = log.report(stage) if log is not None else None
            x_in = stage_inputs[name].requires_grad_(True)
            saved = saved_activation_bytes(stage, lambda stage=stage, x_in=x_in: stage(x_in))
            records.append(
                StageDiagnosis(
                    stage=name,
                    method=stage.method,
                    depth=len(stage),
                    residual_ratio=ratios[name],
                    reconstruction_error=(
                        report.reconstruction_error if report is not None and report.gradient == "adjoint" else None
                    ),
                    grad_cosine=cosine,
                    grad_relative_error=rel,
                    saved_bytes=saved,
                    reason=reasons.get(name) or (f"failed: {failed}" if failed else None),
                )
            )
    return records


def diagnose_table(records: Sequence[StageDiagnosis]) -> str:
    """A plain markdown table of ``diagnose`` records (what the CLI prints)."""
    header = "| stage | method | depth | residual ratio | reconstruction err | grad cosine | grad rel err | saved MiB |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for r in records:
        recon = "-" if r.reconstruction_error is None else f"{r.reconstruction_error:.2e}"
        lines.append(
            f"| {r.stage} | {r.method} | {r.depth} | {r.residual_ratio:.3f} | {recon} | "
            f"{r.grad_cosine:.5f} | {r.grad_relative_error:.2e} | {r.saved_bytes / 2**20:.2f} |"
        )
    reasons = [f"- {r.stage}: {r.reason}" for r in records if r.reason]
    if reasons:
        lines += ["", "Why each stage uses its method:", *reasons]
    return "\n".join(lines)


def write_diagnosis_json(records: Sequence[StageDiagnosis], path: str | Path) -> Path:
    """Write the records as a JSON list (non-finite numbers as null) and return the path."""

    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and not math.isfinite(value) else value

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{k: clean(v) for k, v in r.as_dict().items()} for r in records]
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path
