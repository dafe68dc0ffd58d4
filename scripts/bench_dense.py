#!/usr/bin/env python
"""Peak memory per image of dense prediction: a features_only resnet50 under a small FPN head, at high resolution.

    python scripts/bench_dense.py                             # 512² (batches 4, 8) and 1024² (batches 1, 2)
    python scripts/bench_dense.py --sizes 512 --json out.json
    python scripts/bench_dense.py --dry-run                   # a narrow resnet50 at 64²: seconds (tests)

Why: classification at 224² is where the adjoint was tuned; segmentation-style training runs the same backbone
at 512²–1024² under a decoder that works at stride 4 and a loss at full resolution. None of that decoder, nor
the backbone's stem (a features_only model runs it as timm does), is converted, so the whole step is what tells
a user what the conversion buys there.

The model: ``timm.create_model("resnet50", features_only=True, out_indices=(1, 2, 3, 4), zero_init_last=False)``
(random init, nothing downloaded; residual branches as large as in normally trained checkpoints) under an
FPN-like head: a 1×1 lateral conv on each of the four stage outputs, top-down nearest upsampling and sum, one
3×3 conv + BatchNorm + ReLU at stride 4, a 1×1 classifier to 21 classes, bilinearly upsampled to the input
size; the loss is cross-entropy against random per-pixel labels.

Variants, all from one deep copy of the same weights (backbone and head): plain backprop; timm's
``set_grad_checkpointing(True)`` on the features_only model (a ``FeatureListNet`` then checkpoints each of its
top-level modules except the first, the last and in-place ones: ``bn1``, ``maxpool``, ``layer1``–``layer3``,
each as one segment); ``to_adjoint(backbone)`` with the default (``scheme="auto"``: calibrated by one training
step at the measured size, then its decisions fixed with ``policy.external = True``, as scripts/bench_timm.py
does) and with ``scheme="block_fp16"``.

Figures (docs/design.md, "How we measure"): peak MiB per image of one whole training step (backbone, head,
loss) = max(live bytes at backward start / large, (peak(large) − peak(small)) / (large − small)), from the
profiler's allocator events, after one warm-up step; the batch sizes are printed with each row. Next to it:
what the step keeps at rest per image, the op running at the peak, the bytes the head (with the upsampling and
the loss) and the stem save for backward per image (saved-tensor hooks; the same plain modules in every
variant but timm checkpointing, which checkpoints ``bn1`` and ``maxpool``), and the whole-model gradient
cosine against backprop on the small batch.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from lightning_resode import adjoint_stages, policy_of, to_adjoint
from lightning_resode.measure import PeakPerImage, training_step_memory

_MIB = 2.0**20
VARIANTS = ("backprop", "timm checkpointing", "default (auto)", "block_fp16")
STEM = ("conv1", "bn1", "act1", "maxpool")


class FpnHead(nn.Module):
    """A small FPN decoder: per-stage 1×1 laterals, top-down nearest upsampling and sum, 3×3 conv, classifier."""

    def __init__(self, in_channels: Sequence[int], width: int = 128, num_classes: int = 21) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        top = self.laterals[-1](features[-1])
        for lateral, feature in zip(reversed(self.laterals[:-1]), reversed(features[:-1])):
            top = lateral(feature) + F.interpolate(top, size=feature.shape[-2:], mode="nearest")
        return self.classifier(self.fuse(top))


class DenseModel(nn.Module):
    """A features_only backbone and an FPN head, logits upsampled to the input's size."""

    def __init__(self, backbone: nn.Module, head: FpnHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def base_model(dry_run: bool, num_classes: int = 21) -> DenseModel:
    """resnet50 (random init, ``zero_init_last=False``) under the FPN head; narrow when ``dry_run``."""
    narrow = dict(channels=(16, 32, 64, 128), stem_width=16) if dry_run else {}
    backbone = timm.create_model(
        "resnet50", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4), zero_init_last=False, **narrow
    )
    head = FpnHead(backbone.feature_info.channels(), width=16 if dry_run else 128, num_classes=num_classes)
    return DenseModel(backbone, head)


def pixel_loss(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Per-pixel cross-entropy (labels made before the step, so they are not counted in it)."""
    assert labels is not None
    return F.cross_entropy(logits, labels)


def make_batch(batch: int, size: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=gen)
    return images, torch.randint(0, num_classes, (batch, size, size), generator=gen)


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    pixel_loss(model(images), labels).backward()
    model.zero_grad(set_to_none=True)


def build_variant(base: DenseModel, variant: str, calibration: tuple[torch.Tensor, torch.Tensor]) -> DenseModel:
    """A deep copy of ``base`` trained the ``variant``'s way (the default calibrated on ``calibration``, then fixed)."""
    model = copy.deepcopy(base)
    if variant == "timm checkpointing":
        model.backbone.set_grad_checkpointing(True)
    elif variant == "block_fp16":
        to_adjoint(model.backbone, scheme="block_fp16", check=False)
    elif variant == "default (auto)":
        to_adjoint(model.backbone)
        train_step(model, *calibration)  # the policy calibrates on this first training forward of the backbone
        policy = policy_of(model.backbone)
        assert policy is not None and policy.decisions, "the default did not calibrate on its first step"
        # later forwards would count as training steps and recheck (steps 1, 10): fix the decisions, as
        # scripts/bench_timm.py does, so a recheck's exact reference is not measured as the method's peak
        policy.external = True
    elif variant != "backprop":
        raise ValueError(f"unknown variant {variant!r}; valid: {VARIANTS}")
    return model


def dense_peak_per_image(
    model: nn.Module, make: Callable[[int], tuple[torch.Tensor, torch.Tensor]], small: int, large: int
) -> PeakPerImage:
    """``lightning_resode.peak_per_image``'s figure for a step with per-pixel labels (one warm-up step first)."""
    training_step_memory(model, *make(small), loss=pixel_loss)
    low = training_step_memory(model, *make(small), loss=pixel_loss)
    high = training_step_memory(model, *make(large), loss=pixel_loss)
    rest = high.backward_start_bytes / large / _MIB
    slope = (high.peak_bytes - low.peak_bytes) / (large - small) / _MIB
    return PeakPerImage(max(rest, slope), rest, slope, high.peak_during)


def saved_by_part(model: DenseModel, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """MiB per image that the stem and the head (with upsampling and loss) save for backward in one forward.

    Per part, the unique storages its ops hand to saved-tensor hooks, whatever else also keeps them (the
    head's laterals save the stage outputs: counted for the head, in every variant); parameters and the
    batch itself excluded. Checkpointed modules save through their own hooks and are not seen.
    """
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {images.untyped_storage().data_ptr(), labels.untyped_storage().data_ptr()}
    part = ["other"]
    seen: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[(part[0], ptr)] = t.untyped_storage().nbytes()
        return t

    def enter(name: str) -> Callable[..., None]:
        def hook(*_: object) -> None:
            part[0] = name

        return hook

    handles = [model.backbone.get_submodule(m).register_forward_pre_hook(enter("stem")) for m in STEM]
    handles += [model.backbone.get_submodule(f"layer{i}").register_forward_pre_hook(enter("stages")) for i in range(1, 5)]
    handles.append(model.head.register_forward_pre_hook(enter("head")))
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = pixel_loss(model(images), labels)  # the upsampling and the loss run after the head: still "head"
        del loss
    finally:
        for handle in handles:
            handle.remove()
    totals = {"stem": 0, "head": 0}
    for (name, _), nbytes in seen.items():
        if name in totals:
            totals[name] += nbytes
    return {name: nbytes / images.shape[0] / _MIB for name, nbytes in totals.items()}


def gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The whole model's parameter gradient on one batch, flattened (float64)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(pixel_loss(model(images), labels), params)
    return torch.cat([g.flatten().double() for g in grads])


def batches_for(size: int, dry_run: bool, override: Sequence[int] | None) -> tuple[int, int]:
    """The two batch sizes of the slope: the docs' 4 and 8 up to 512², 1 and 2 above (to fit 24 GiB)."""
    if override:
        return override[0], override[1]
    if dry_run:
        return 2, 4
    return (4, 8) if size <= 512 else (1, 2)


def run(sizes: Sequence[int], variants: Sequence[str], dry_run: bool, batches: Sequence[int] | None) -> list[dict]:
    """Measure every variant at every size; print a markdown table row as each is measured."""
    num_classes = 5 if dry_run else 21
    torch.manual_seed(0)
    base = base_model(dry_run, num_classes)
    rows: list[dict] = []
    print("| size | variant | batches | **peak MiB/img** | at rest MiB/img | slope MiB/img | peak reached in | "
          "head + loss / stem saved MiB/img | grad cosine | stages |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        small, large = batches_for(size, dry_run, batches)
        if not 0 < small < large:
            raise ValueError(f"need 0 < small < large batch sizes, got {small}, {large}")

        def make(b: int, size: int = size) -> tuple[torch.Tensor, torch.Tensor]:
            return make_batch(b, size, num_classes, seed=b)

        calibration = make_batch(max(small, 2), size, num_classes, seed=1000)  # BatchNorm: the policy needs 2 images
        probe = make(small)
        reference: torch.Tensor | None = None
        for variant in variants:
            model = build_variant(base, variant, calibration)
            peak = dense_peak_per_image(model, make, small, large)
            parts = saved_by_part(model, *probe)
            grad = gradient(model, *probe)
            if reference is None or variant == "backprop":
                reference = grad if variant == "backprop" else gradient(copy.deepcopy(base), *probe)
            cosine = float(F.cosine_similarity(grad, reference, dim=0))
            stages = ",".join(s.method for s in adjoint_stages(model.backbone).values()) or "-"
            row = dict(size=size, variant=variant, batches=[small, large], **peak.as_dict(),
                       head_saved_mib_per_image=parts["head"], stem_saved_mib_per_image=parts["stem"],
                       grad_cosine=cosine, stages=stages)
            rows.append(row)
            print(f"| {size}² | {variant} | {small}, {large} | **{peak.mib_per_image:.1f}** | {peak.rest_mib_per_image:.1f} | "
                  f"{peak.slope_mib_per_image:.1f} | {peak.peak_during} | {parts['head']:.1f} / {parts['stem']:.1f} | "
                  f"{cosine:.4f} | {stages} |", flush=True)
            del model, grad
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="input resolutions (default 512 1024)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batches", type=int, nargs=2, default=None, metavar=("SMALL", "LARGE"),
                        help="the two batch sizes at every size (default: 4 8 up to 512², 1 2 above)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows (and the setup) as JSON")
    parser.add_argument("--dry-run", action="store_true", help="a narrow resnet50 at 64², 5 classes: seconds")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([64] if args.dry_run else [512, 1024])
    rows = run(sizes, args.variants, args.dry_run, args.batches)
    if args.json:
        setup = dict(model="resnet50 features_only, out_indices (1, 2, 3, 4), zero_init_last=False, random init",
                     head="FPN: 1x1 laterals, nearest top-down sum, 3x3 conv+BN+ReLU, 1x1 classifier, bilinear upsampling",
                     dry_run=args.dry_run, torch=torch.__version__, timm=timm.__version__,
                     threads=torch.get_num_threads(), python=platform.python_version())
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(setup=setup, rows=rows), indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
