"""timm surgery: swap the residual stages of a timm ResNet for adjoint stages, and back, keeping state_dict keys.

What is converted, per family (``_FAMILIES``, a registry rather than an if-chain):

- every residual stage becomes an :class:`AdjointSequential` at the same attribute, so its children stay
  ``"0"``, ``"1"``, … and ``state_dict`` keys do not change. Leading blocks that change the shape (the
  downsampling first block of a stage) form the stage's exact head: recomputed from the stored stage input.
- the stem (conv / norm / act / pool, which changes the shape) is recomputed from the image in backward,
  with the engine's BatchNorm-updated-once and RNG-replay guarantees. Its modules stay where timm put them
  (same keys); the model's class is swapped for a thin subclass whose ``forward_features`` runs the stem
  through that exact checkpoint. ``from_adjoint`` swaps it back.

So a converted network saves O(number of stages) activations instead of O(depth).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .adjoint import AdjointSequential
from .adjoint.methods import METHODS, SCHEME_CHOICES, get_method
from .policy import StagePolicy, check_policy_options

__all__ = ["SCHEME_CHOICES", "adjoint_stages", "from_adjoint", "policy_of", "supported_stage_names", "to_adjoint"]

_STEM_KEY = "_resode_stem"
_POLICY_KEY = "_resode_policy"


# ---------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class _Family:
    """How to find the residual stages and the stem of one timm model class."""

    name: str
    members: str
    model_type: Callable[[], type]
    #: public stage name -> (parent module, attribute holding the nn.Sequential of blocks)
    stage_slots: Callable[[nn.Module], dict[str, tuple[nn.Module, str]]]
    stem_modules: Callable[[nn.Module], list[nn.Module]]
    #: forward_features with the stem replaced by ``stem`` (a callable)
    features: Callable[[nn.Module, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


def _resnet_type() -> type:
    from timm.models.resnet import ResNet

    return ResNet


def _resnetv2_type() -> type:
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2


def _resnet_slots(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    return {f"layer{i}": (model, f"layer{i}") for i in range(1, 5) if isinstance(getattr(model, f"layer{i}", None), nn.Module)}


def _resnet_features(model: nn.Module, x: torch.Tensor, stem: Callable) -> torch.Tensor:
    x = stem(x)
    for name in _resnet_slots(model):
        x = getattr(model, name)(x)
    return x


def _resnetv2_slots(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    return {f"stages.{i}": (stage, "blocks") for i, stage in enumerate(model.stages)}


def _resnetv2_features(model: nn.Module, x: torch.Tensor, stem: Callable) -> torch.Tensor:
    return model.norm(model.stages(stem(x)))


_FAMILIES: tuple[_Family, ...] = (
    _Family(
        name="timm ResNet v1",
        members="resnet18/26/34/50/101/152/200 and their -d/-t variants, resnext, seresnet/seresnext, "
        "ecaresnet, wide_resnet, resnetrs, …",
        model_type=_resnet_type,
        stage_slots=_resnet_slots,
        stem_modules=lambda m: [m.conv1, m.bn1, m.act1, m.maxpool],
        features=_resnet_features,
    ),
    _Family(
        name="timm ResNetV2 (pre-activation)",
        members="resnetv2_18/34/50/101/152 and -d variants, BiT (resnetv2_*_bit)",
        model_type=_resnetv2_type,
        stage_slots=_resnetv2_slots,
        stem_modules=lambda m: list(m.stem.children()),
        features=_resnetv2_features,
    ),
)


def _supported_summary() -> str:
    return "; ".join(f"{f.name} ({f.members})" for f in _FAMILIES)


def _family_of(model: nn.Module) -> _Family:
    for family in _FAMILIES:
        if isinstance(model, family.model_type()):
            return family
    raise TypeError(
        f"cannot convert a {type(model).__module__}.{type(model).__name__}: its residual stages are unknown. "
        f"Supported families: {_supported_summary()}"
    )


def supported_stage_names(model: nn.Module) -> list[str]:
    """Names ``to_adjoint(stages=...)`` accepts for this model, input side first (e.g. ``layer1``…``layer4``)."""
    return list(_family_of(model).stage_slots(model))


def adjoint_stages(model: nn.Module) -> dict[str, AdjointSequential]:
    """Converted stages by public name (``"layer3"``, ``"stages.2"``…); empty for an unconverted model."""
    try:
        slots = _family_of(model).stage_slots(model)
    except TypeError:
        return {name: m for name, m in model.named_modules() if isinstance(m, AdjointSequential)}
    stages = {name: getattr(parent, attr) for name, (parent, attr) in slots.items()}
    return {name: stage for name, stage in stages.items() if isinstance(stage, AdjointSequential)}


# ---------------------------------------------------------------------------------------------- the class swap
class _AdjointFeatures:
    """Mixed in front of the timm class: the stem runs as an exact checkpoint; timm's checkpointing is refused."""

    def __reduce_ex__(self, protocol: int):  # noqa: ANN204
        # The subclass is made at conversion time; another process (ddp_spawn, torch.load) has not made it yet,
        # so pickle a recipe that rebuilds it from the timm class instead of a reference to it.
        constructor, args, *rest = super().__reduce_ex__(protocol)
        base = next(c for c in type(self).__mro__[1:] if not issubclass(c, _AdjointFeatures))
        return (_new_converted, (base, *args[1:]), *rest)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        policy = self.__dict__.get(_POLICY_KEY)
        if policy is not None and not policy.external and self.training and torch.is_grad_enabled():
            policy.before_step(self, x)  # calibrates on the first training step (pseudo-labels: no targets here)
        return _family_of(self).features(self, x, _stem_runner(self))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise RuntimeError(
                "this model was converted by lightning_resode.to_adjoint: its stages already keep only their "
                "boundaries, and timm's set_grad_checkpointing() would recompute them again (updating BatchNorm "
                "running statistics twice). For exact checkpointing use to_adjoint(model, scheme='checkpoint'); "
                "for timm's own, call from_adjoint(model) first"
            )
        super().set_grad_checkpointing(False)  # type: ignore[misc]


_CONVERTED_CLASSES: dict[type, type] = {}


def _converted_class(cls: type) -> type:
    """One cached subclass per timm class, published in this module so pickling a converted model works."""
    if issubclass(cls, _AdjointFeatures):
        return cls
    if cls not in _CONVERTED_CLASSES:
        name = f"_Adjoint_{cls.__module__.replace('.', '_')}_{cls.__name__}"
        converted = type(name, (_AdjointFeatures, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = converted
        _CONVERTED_CLASSES[cls] = converted
    return _CONVERTED_CLASSES[cls]


def _new_converted(base: type, *args: object) -> nn.Module:
    cls = _converted_class(base)
    return cls.__new__(cls, *args)


def _stem_runner(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The stem as an exact checkpoint (rebuilt if the stem modules were replaced, e.g. by SyncBatchNorm)."""
    modules = _family_of(model).stem_modules(model)
    gradient = model.__dict__.get(_STEM_KEY + "_gradient", "checkpoint")
    stem = model.__dict__.get(_STEM_KEY)
    if stem is None or len(stem) != len(modules) or any(a is not b for a, b in zip(stem, modules)):
        stem = AdjointSequential(modules, exact_head=len(modules), gradient="checkpoint", name="stem")
        model.__dict__[_STEM_KEY] = stem  # not a registered child: state_dict keys stay timm's
    stem.configure(gradient=gradient)
    stem.training = model.training
    return stem


# ---------------------------------------------------------------------------------------------- conversion
def _leading_shape_changers(blocks: Sequence[nn.Module]) -> int:
    """Blocks at the start of a stage that carry a downsample/projection shortcut (they change the shape)."""
    count = 0
    for block in blocks:
        if getattr(block, "downsample", None) is None:
            break
        count += 1
    return count


def to_adjoint(
    model: nn.Module,
    stages: Sequence[str] | None = None,
    scheme: str = "auto",
    *,
    refine: int = 0,
    anchor_every: int | None = None,
    top_step_dtype: torch.dtype | None = torch.bfloat16,
    min_cosine: float = 0.99,
    recheck_every: int = 500,
    calibration: torch.Tensor | tuple | None = None,
    check: bool = True,
) -> nn.Module:
    """Make the residual stages of a timm ResNet memory-free, in place; returns ``model``.

    Args:
        model: a timm ResNet v1 or ResNetV2 (see ``supported_stage_names``). Already converted models are
            reconfigured.
        stages: public stage names to convert (``["layer3"]``); ``None`` converts every stage.
        scheme: how each stage computes its gradient (``lightning_resode.adjoint.methods``):
            ``"auto"`` (default: per stage, the method with the least peak memory whose gradient cosine
            against exact backprop reaches ``min_cosine``, measured on the first training step and every
            ``recheck_every`` steps; see ``lightning_resode.policy``), a reconstruction (``"euler_fast"``,
            ``"euler"``; ``"heun"`` is a *different network*, only for models trained as Heun), a per-block
            checkpoint (``"block_fp16"``, ``"block_bf16"``, exact ``"block"``), a whole-stage
            ``"checkpoint"`` or ``"backprop"``.
        refine, anchor_every: reconstruction options for every converted stage (see ``AdjointSequential``).
        top_step_dtype: reconstruction stages keep their top step's increment in this dtype (default
            bfloat16: half a stage-output of memory per stage), so the top block costs no extra forward in
            backward and is recovered almost exactly; ``None`` reconstructs it like the other blocks.
        min_cosine: the gradient fidelity ``"auto"`` requires, and below which an explicit approximate
            method is reported unsafe (a warning on its first training step).
        recheck_every: ``"auto"`` recalibrates every this many training steps (0: only at the first step
            and after a stage had to fall back to an exact gradient).
        calibration: ``images`` or ``(images, targets)`` to calibrate on now instead of on the first
            training step.
        check: for an explicit approximate method, measure it once on the first training step and warn
            when it is unsafe for a stage.
    """
    family = _family_of(model)
    check_policy_options(scheme, min_cosine, recheck_every)
    if scheme == "heun":
        warnings.warn(
            "scheme='heun' changes the network's function (Heun steps pair consecutive blocks); a pretrained "
            "timm ResNet is an Euler network, so its outputs change. Use an Euler scheme to fine-tune it",
            stacklevel=2,
        )
    slots = family.stage_slots(model)
    names = list(slots) if stages is None else [stages] if isinstance(stages, str) else list(stages)
    unknown = [name for name in names if name not in slots]
    if not names:
        raise ValueError(f"stages=[] converts nothing; pass None for every stage, or some of {list(slots)}")
    if unknown:
        raise ValueError(f"unknown stage name(s) {unknown}; valid stage names: {list(slots)}")
    if any(getattr(m, "grad_checkpointing", False) is True for m in model.modules()):
        warnings.warn("timm's grad checkpointing is superseded by the adjoint stages; turning it off", stacklevel=2)
        model.set_grad_checkpointing(False)

    converted: dict[str, AdjointSequential] = {}
    for name in names:
        parent, attr = slots[name]
        blocks = getattr(parent, attr)
        if isinstance(blocks, AdjointSequential):
            stage = blocks
        else:
            stage = AdjointSequential(list(blocks), name=name, exact_head=_leading_shape_changers(list(blocks)))
            setattr(parent, attr, stage)
        converted[name] = stage
        # auto starts exact; its first training step measures and picks
        method = "block" if scheme == "auto" else scheme
        if method == "heun" and len(stage) - stage.exact_head < 2:
            warnings.warn(
                f"stage {name!r} has {len(stage) - stage.exact_head} residual block(s); a Heun step needs two, so "
                "it stays an Euler stage with exact per-block gradients (scheme 'block')",
                stacklevel=2,
            )
            method = "block"
        try:
            stage.configure(
                method=method,
                scheme=get_method(method).scheme or "euler",  # a timm ResNet is an Euler network
                refine=refine, anchor_every=anchor_every, top_step_dtype=top_step_dtype,
            )
        except ValueError as err:
            raise ValueError(f"stage {name!r} ({len(stage)} blocks, {stage.exact_head} shape-changing): {err}") from err
        stage.fallback = False
    model.__class__ = _converted_class(type(model))
    model.__dict__[_STEM_KEY + "_gradient"] = "backprop" if scheme == "backprop" else "checkpoint"
    model.__dict__.pop(_POLICY_KEY, None)
    if scheme == "auto":
        policy = StagePolicy(converted, mode="auto", min_cosine=min_cosine, recheck_every=recheck_every)
    elif check and not METHODS[scheme].exact:
        policy = StagePolicy(converted, mode="check", min_cosine=min_cosine, recheck_every=0)
    else:
        policy = None
    if policy is not None:
        model.__dict__[_POLICY_KEY] = policy
        if calibration is not None:
            policy.calibrate(model, calibration)
    elif calibration is not None:
        raise ValueError(f"calibration= is used by scheme='auto' or an approximate scheme with check=True, not by {scheme!r}")
    return model


def policy_of(model: nn.Module) -> StagePolicy | None:
    """The stage policy ``to_adjoint`` attached (``scheme='auto'``, or the check of an explicit method)."""
    return model.__dict__.get(_POLICY_KEY)


def from_adjoint(model: nn.Module) -> nn.Module:
    """Undo ``to_adjoint`` in place: plain ``nn.Sequential`` stages and the original timm class; returns ``model``."""
    family = _family_of(model)
    for parent, attr in family.stage_slots(model).values():
        stage = getattr(parent, attr)
        if isinstance(stage, AdjointSequential):
            setattr(parent, attr, nn.Sequential(*stage))
    if isinstance(model, _AdjointFeatures):
        model.__class__ = next(c for c in type(model).__mro__[1:] if not issubclass(c, _AdjointFeatures))
    model.__dict__.pop(_STEM_KEY, None)
    model.__dict__.pop(_STEM_KEY + "_gradient", None)
    model.__dict__.pop(_POLICY_KEY, None)
    return model
