"""Per-stage fidelity and memory of a converted model, and the auto policy that picks each stage's scheme.

Everything here runs on one calibration batch, in training mode (the mode the adjoint is used in), and
leaves the model as it found it: BatchNorm running statistics, train/eval mode, ``.grad`` and the global
random state are restored, and every configuration sees the same dropout / drop-path draws.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adjoint import AdjointSequential
from .convert import adjoint_stages
from .measure import saved_activation_bytes

#: Options the auto policy tries, cheapest first (backward block forwards per block in brackets). Only
#: Euler-network options: a pretrained timm ResNet *is* an Euler network; Heun would change its function.
AUTO_CANDIDATES: tuple[dict[str, Any], ...] = (
    {"scheme": "euler_fast", "refine": 0, "anchor_every": None},  # [1]
    {"scheme": "euler", "refine": 0, "anchor_every": None},  # [2]
    {"scheme": "euler_fast", "refine": 1, "anchor_every": None},  # [2]
)
# Measured on trained timm ResNets (docs/convert.md): refinement and anchors buy little, because a
# post-activation ReLU block is not invertible where it clips; beyond two block forwards per block,
# exact checkpointing (one forward per block, one stage of activations at backward time) is the better deal.
_LOSS_SEED = 1234
_RUN_SEED = 4321


@dataclass
class StageDiagnosis:
    """What one converted stage does to the gradient and to memory, on one batch."""

    stage: str
    scheme: str
    gradient: str
    refine: int
    anchor_every: int | None
    depth: int
    #: mean over the stage's residual blocks of ‖b(x) - x‖ / ‖x‖ (0: identity blocks; ≳1: far from an ODE)
    residual_ratio: float
    #: ‖x̂ - x‖ / ‖x‖ at the input of the reconstructed part (None for exact gradients)
    reconstruction_error: float | None
    #: of this stage's parameter gradient against exact backprop (errors of the stages above included)
    grad_cosine: float
    grad_relative_error: float
    saved_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PolicyDecision:
    """The auto policy's choice for one stage and why."""

    stage: str
    option: dict[str, Any]
    grad_cosine: float
    model_grad_cosine: float
    reason: str


# ---------------------------------------------------------------------------------------------- shared helpers
def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], torch.Tensor):
        targets = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], targets
    raise TypeError(f"expected images or (images, targets) tensors, got {type(batch).__name__}")


def _loss(outputs: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy when targets are given, else a fixed random projection (a generic, non-degenerate loss)."""
    if targets is not None:
        return F.cross_entropy(outputs, targets)
    gen = torch.Generator().manual_seed(_LOSS_SEED)
    projection = torch.randn(outputs.shape, generator=gen, dtype=torch.float32).to(outputs)
    return (outputs * projection).sum() / outputs.shape[0]


def _unique_params(module: nn.Module) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in module.parameters():
        if p.requires_grad:
            seen.setdefault(id(p), p)
    return list(seen.values())


@contextlib.contextmanager
def _calibration(model: nn.Module) -> Iterator[None]:
    """Train mode for the measurement; afterwards the model is exactly as before (buffers, mode, RNG)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        model.train()
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in buffers:
                    buffer.copy_(value)
            for module, training in modes:
                module.training = training


def _gradients(model: nn.Module, images: torch.Tensor, targets: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """Parameter gradients of one training step, by parameter id (``.grad`` untouched; same random draws)."""
    params = _unique_params(model)
    torch.manual_seed(_RUN_SEED)
    loss = _loss(model(images), targets)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {id(p): (torch.zeros_like(p) if g is None else g).detach() for p, g in zip(params, grads)}


def _compare(grads: dict[int, torch.Tensor], exact: dict[int, torch.Tensor], params: Sequence[nn.Parameter]) -> tuple[float, float]:
    """Cosine similarity and relative L2 error of the concatenated gradients of ``params``."""
    if not params:
        return 1.0, 0.0
    g = torch.cat([grads[id(p)].flatten().double() for p in params])
    e = torch.cat([exact[id(p)].flatten().double() for p in params])
    cosine = float(F.cosine_similarity(g, e, dim=0)) if e.norm() > 0 and g.norm() > 0 else float(torch.equal(g, e))
    rel = float((g - e).norm() / e.norm()) if e.norm() > 0 else float(g.norm())
    return cosine, rel


def _exact_reference(model: nn.Module, stages: dict[str, AdjointSequential], images, targets) -> dict[int, torch.Tensor]:
    previous = {name: stage.gradient for name, stage in stages.items()}
    for stage in stages.values():
        stage.configure(gradient="checkpoint")
    try:
        return _gradients(model, images, targets)
    finally:
        for name, stage in stages.items():
            stage.configure(gradient=previous[name])


def _describe(option: dict[str, Any]) -> str:
    if option.get("gradient") == "checkpoint":
        return "checkpoint"
    text = option["scheme"]
    if option.get("refine"):
        text += f"+refine{option['refine']}"
    if option.get("anchor_every"):
        text += f"+anchor{option['anchor_every']}"
    return text


# ---------------------------------------------------------------------------------------------- diagnose
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

    ``batch`` is ``images`` or ``(images, targets)``. Costs two training steps and one forward per stage.
    """
    stages = adjoint_stages(model)
    if not stages:
        raise ValueError("no adjoint stages found: convert the model first with lightning_resode.to_adjoint(model)")
    images, targets = _split_batch(batch)
    records = []
    with _calibration(model):
        ratios, stage_inputs = _residual_ratios(model, stages, images)
        exact = _exact_reference(model, stages, images, targets)
        keep = {name: stage.keep_input for name, stage in stages.items()}
        for stage in stages.values():
            stage.keep_input = True
        try:
            grads = _gradients(model, images, targets)
        finally:
            for name, stage in stages.items():
                stage.keep_input = keep[name]
        for name, stage in stages.items():
            cosine, rel = _compare(grads, exact, _unique_params(stage))
            report = stage.last_backward
            x_in = stage_inputs[name].requires_grad_(True)
            saved = saved_activation_bytes(stage, lambda stage=stage, x_in=x_in: stage(x_in))
            records.append(
                StageDiagnosis(
                    stage=name,
                    scheme=stage.scheme,
                    gradient=stage.gradient,
                    refine=stage.refine,
                    anchor_every=stage.anchor_every,
                    depth=len(stage),
                    residual_ratio=ratios[name],
                    reconstruction_error=(
                        report.reconstruction_error if report is not None and stage.gradient == "adjoint" else None
                    ),
                    grad_cosine=cosine,
                    grad_relative_error=rel,
                    saved_bytes=saved,
                )
            )
    return records


def diagnose_table(records: Sequence[StageDiagnosis]) -> str:
    """A plain markdown table of ``diagnose`` records (what the CLI prints)."""
    header = "| stage | scheme | gradient | depth | residual ratio | reconstruction err | grad cosine | grad rel err | saved MiB |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for r in records:
        recon = "-" if r.reconstruction_error is None else f"{r.reconstruction_error:.2e}"
        scheme = _describe({"scheme": r.scheme, "refine": r.refine, "anchor_every": r.anchor_every})
        lines.append(
            f"| {r.stage} | {scheme} | {r.gradient} | {r.depth} | {r.residual_ratio:.3f} | {recon} | "
            f"{r.grad_cosine:.5f} | {r.grad_relative_error:.2e} | {r.saved_bytes / 2**20:.2f} |"
        )
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


# ---------------------------------------------------------------------------------------------- auto policy
def auto_policy(
    model: nn.Module,
    calibration: Any,
    *,
    min_cosine: float = 0.99,
    stages: Sequence[str] | None = None,
    candidates: Sequence[dict[str, Any]] = AUTO_CANDIDATES,
) -> list[PolicyDecision]:
    """Give each converted stage the cheapest option whose gradient cosine reaches ``min_cosine``, else checkpoint.

    Stages are decided from the output side down, each with the stages above already set, so errors that
    propagate downwards are part of what is measured. An option is accepted when both the stage's own
    parameter gradient and the whole model's gradient reach ``min_cosine`` against exact backprop. The
    choice and its reason are stored on each stage as ``stage.policy_reason``. Cost: one training step per
    option tried, plus one for the reference.
    """
    if not 0.0 < min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in (0, 1], got {min_cosine}")
    all_stages = adjoint_stages(model)
    names = list(all_stages) if stages is None else list(stages)
    unknown = [n for n in names if n not in all_stages]
    if unknown:
        raise ValueError(f"stage(s) {unknown} are not converted; converted stages: {list(all_stages)}")
    selected = {name: all_stages[name] for name in names}
    images, targets = _split_batch(calibration)
    params = _unique_params(model)
    decisions: list[PolicyDecision] = []
    with _calibration(model):
        exact = _exact_reference(model, selected, images, targets)
        for stage in selected.values():
            stage.configure(gradient="checkpoint")
        for name in reversed(names):
            stage = selected[name]
            stage_params = _unique_params(stage)
            tried: list[str] = []
            decision = None
            for option in candidates:
                try:
                    stage.configure(gradient="adjoint", **option)
                    grads = _gradients(model, images, targets)
                except (ValueError, RuntimeError) as err:  # e.g. a non-finite reconstruction
                    tried.append(f"{_describe(option)} failed ({type(err).__name__})")
                    continue
                cosine, _ = _compare(grads, exact, stage_params)
                model_cosine, _ = _compare(grads, exact, params)
                if min(cosine, model_cosine) >= min_cosine:
                    reason = (
                        f"{_describe(option)}: gradient cosine {cosine:.5f} (stage), {model_cosine:.5f} (model) "
                        f">= {min_cosine}" + (f"; cheaper options fell short: {', '.join(tried)}" if tried else "")
                    )
                    decision = PolicyDecision(name, dict(option, gradient="adjoint"), cosine, model_cosine, reason)
                    break
                tried.append(f"{_describe(option)} {min(cosine, model_cosine):.4f}")
            if decision is None:
                stage.configure(gradient="checkpoint", scheme="euler", refine=0, anchor_every=None)
                reason = f"checkpoint (exact): no adjoint option reached gradient cosine {min_cosine} ({', '.join(tried)})"
                decision = PolicyDecision(name, {"gradient": "checkpoint"}, 1.0, 1.0, reason)
            stage.policy_reason = decision.reason
            decisions.append(decision)
    return decisions[::-1]
