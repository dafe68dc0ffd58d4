"""timm surgery: swap the residual stages of a timm ResNet for adjoint stages, and back, keeping state_dict keys.

What is converted, per family (``_FAMILIES``, a registry rather than an if-chain):

- every residual stage becomes an :class:`AdjointSequential` at the same attribute, so its children stay
  ``"0"``, ``"1"``, … and ``state_dict`` keys do not change. Leading blocks that change the shape (the
  downsampling first block of a stage) form the stage's exact head: recomputed from the stored stage input.
- the stem (conv / norm / act / pool, which changes the shape) is recomputed from the image in backward,
  with the engine's BatchNorm-updated-once and RNG-replay guarantees. Its modules stay where timm put them
  (same keys); the model's class is swapped for a thin subclass whose ``forward_features`` runs the stem
  through that exact checkpoint. ``from_adjoint`` swaps it back.
- timm's ``features_only=True`` models are converted too: a ``FeatureListNet`` (its stages; its stem runs as
  timm runs it, since the stem's activation is one of the features) and a ``FeatureGetterNet`` (the model it
  wraps, whose ``forward_intermediates`` runs the converted stages).

So a converted network saves O(number of stages) activations instead of O(depth). Tracing sees the plain
network: FX (``torch.fx``, torchvision's feature extraction) records the stem and the stages' blocks under timm's
own module names, and ``torch.jit.script`` compiles a view of the model with plain ``nn.Sequential`` stages.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from timm.models.resnet import Bottleneck
from torch import nn

from .adjoint import AdjointSequential
from .adjoint.lean import register_private_conv_outputs, register_residual_entry
from .adjoint.methods import METHODS, SCHEME_CHOICES, get_method
from .policy import StagePolicy, check_policy_options

__all__ = ["SCHEME_CHOICES", "adjoint_stages", "from_adjoint", "policy_of", "supported_stage_names", "to_adjoint"]


def _bottleneck_private_pairs(block: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """timm's ``Bottleneck.forward`` reads ``conv3``'s output only as ``bn3``'s input, and its downsampling
    shortcut ``Sequential(conv, bn)`` reads the convolution's output only as the BatchNorm's input."""
    pairs = [(block.conv3, block.bn3)]
    shortcut = block.downsample
    if type(shortcut) is nn.Sequential and len(shortcut) == 2:
        pairs.append((shortcut[0], shortcut[1]))
    return pairs


register_private_conv_outputs(Bottleneck, _bottleneck_private_pairs)
# timm's ``Bottleneck`` without a downsampling shortcut: ``act3(bn3(…conv1(x)…) + x)``, x read by conv1 and the sum
register_residual_entry(Bottleneck, lambda block: block.conv1 if block.downsample is None else None)

_STEM_KEY = "_resode_stem"
_POLICY_KEY = "_resode_policy"


# ---------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class _Family:
    """How to find the residual stages (and the stem) of one kind of timm model."""

    name: str
    members: str
    matches: Callable[[nn.Module], bool]
    #: public stage name -> dotted path of the attribute holding the stage's blocks (an nn.Sequential)
    stage_paths: Callable[[nn.Module], dict[str, str]]
    #: dotted path of the module every forward runs first on the image (where the stage policy calibrates)
    first_module: Callable[[nn.Module], str]
    #: the stem modules, and forward_features with the stem replaced by ``stem`` (a callable); None where the
    #: model's own forward runs its stem (features_only wrappers)
    stem_modules: Callable[[nn.Module], list[nn.Module]] | None = None
    features: Callable[[nn.Module, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor] | None = None


def _is_instance(module_path: str, class_name: str) -> Callable[[nn.Module], bool]:
    def check(model: nn.Module) -> bool:
        import importlib

        cls = getattr(importlib.import_module(module_path), class_name, None)
        return cls is not None and isinstance(model, cls)

    return check


def _feature_list_with(child: str) -> Callable[[nn.Module], bool]:
    """A timm ``FeatureListNet`` / ``FeatureDictNet`` (features_only) holding the given top-level child."""
    is_feature_net = _is_instance("timm.models._features", "FeatureDictNet")
    return lambda model: is_feature_net(model) and child in model._modules


def _resnet_paths(model: nn.Module) -> dict[str, str]:
    return {f"layer{i}": f"layer{i}" for i in range(1, 5) if isinstance(model._modules.get(f"layer{i}"), nn.Module)}


def _resnet_features(model: nn.Module, x: torch.Tensor, stem: Callable) -> torch.Tensor:
    x = stem(x)
    for path in _resnet_paths(model).values():
        x = getattr(model, path)(x)
    return x


def _resnetv2_features(model: nn.Module, x: torch.Tensor, stem: Callable) -> torch.Tensor:
    return model.norm(model.stages(stem(x)))


def _first_child(prefix: str) -> Callable[[nn.Module], str]:
    def path(model: nn.Module) -> str:
        parent = model.get_submodule(prefix) if prefix else model
        name = next(iter(parent._modules))
        return f"{prefix}.{name}" if prefix else name

    return path


_FAMILIES: tuple[_Family, ...] = (
    _Family(
        name="timm ResNet v1",
        members="resnet18/26/34/50/101/152/200 and their -d/-t variants, resnext, seresnet/seresnext, "
        "ecaresnet, wide_resnet, resnetrs, …",
        matches=_is_instance("timm.models.resnet", "ResNet"),
        stage_paths=_resnet_paths,
        first_module=lambda m: "conv1",
        stem_modules=lambda m: [m.conv1, m.bn1, m.act1, m.maxpool],
        features=_resnet_features,
    ),
    _Family(
        name="timm ResNetV2 (pre-activation)",
        members="resnetv2_18/34/50/101/152 and -d variants, BiT (resnetv2_*_bit)",
        matches=_is_instance("timm.models.resnetv2", "ResNetV2"),
        stage_paths=lambda m: {f"stages.{i}": f"stages.{i}.blocks" for i in range(len(m.stages))},
        first_module=_first_child("stem"),
        stem_modules=lambda m: list(m.stem.children()),
        features=_resnetv2_features,
    ),
    _Family(
        name="features_only ResNet v1",
        members="timm.create_model(<a ResNet v1>, features_only=True)",
        matches=_feature_list_with("layer1"),
        stage_paths=_resnet_paths,
        first_module=_first_child(""),
    ),
    _Family(
        name="features_only ResNetV2",
        members="timm.create_model(<a ResNetV2>, features_only=True)",
        matches=_feature_list_with("stages_0"),
        stage_paths=lambda m: {f"stages.{i}": f"stages_{i}.blocks" for i in range(4) if f"stages_{i}" in m._modules},
        first_module=_first_child(""),
    ),
)


def _supported_summary() -> str:
    return "; ".join(f"{f.name} ({f.members})" for f in _FAMILIES)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module holding the stages: a features_only ``FeatureGetterNet``'s model, else the model itself."""
    is_getter = _is_instance("timm.models._features", "FeatureGetterNet")
    while is_getter(model):
        model = model.model
    return model


def _family_of(model: nn.Module) -> _Family:
    for family in _FAMILIES:
        if family.matches(model):
            return family
    compiled = getattr(model, "_orig_mod", None)
    if isinstance(compiled, nn.Module):  # torch.compile's wrapper: it compiled the unconverted stages
        raise TypeError(
            f"cannot convert a torch.compile'd model (of a {type(compiled).__name__}): convert first, then compile: "
            "model = torch.compile(to_adjoint(model))"
        )
    raise TypeError(
        f"cannot convert a {type(model).__module__}.{type(model).__name__}: its residual stages are unknown. "
        f"Supported families: {_supported_summary()}"
    )


def _slots(model: nn.Module, family: _Family) -> dict[str, tuple[nn.Module, str]]:
    """Public stage name -> (parent module, attribute holding the blocks)."""
    slots = {}
    for name, path in family.stage_paths(model).items():
        parent, _, attr = path.rpartition(".")
        slots[name] = (model.get_submodule(parent) if parent else model, attr)
    return slots


def supported_stage_names(model: nn.Module) -> list[str]:
    """Names ``to_adjoint(stages=...)`` accepts for this model, input side first (e.g. ``layer1``…``layer4``)."""
    target = _unwrapped(model)
    return list(_family_of(target).stage_paths(target))


def adjoint_stages(model: nn.Module) -> dict[str, AdjointSequential]:
    """Converted stages by public name (``"layer3"``, ``"stages.2"``…); empty for an unconverted model."""
    target = _unwrapped(model)
    try:
        slots = _slots(target, _family_of(target))
    except TypeError:
        return {name: m for name, m in model.named_modules() if isinstance(m, AdjointSequential)}
    stages = {name: getattr(parent, attr) for name, (parent, attr) in slots.items()}
    return {name: stage for name, stage in stages.items() if isinstance(stage, AdjointSequential)}


# ---------------------------------------------------------------------------------------------- the class swap
class _AdjointFeatures:
    """Mixed in front of the timm class: the stem runs as an exact checkpoint; timm's checkpointing is refused.

    (The auto policy calibrates from a forward pre-hook it registers on the model, not from here.)"""

    def __reduce_ex__(self, protocol: int):  # noqa: ANN204
        # The subclass is made at conversion time; another process (ddp_spawn, torch.load) has not made it yet,
        # so pickle a recipe that rebuilds it from the timm class instead of a reference to it.
        constructor, args, *rest = super().__reduce_ex__(protocol)
        base = next(c for c in type(self).__mro__[1:] if not issubclass(c, _AdjointFeatures))
        return (_new_converted, (base, *args[1:]), *rest)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        family = _family_of(self)
        if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing():
            # tracing records the plain network under timm's module names (the stem runner is not a submodule)
            return family.features(self, x, lambda h: functools.reduce(lambda a, m: m(a), family.stem_modules(self), h))
        return family.features(self, x, _stem_runner(self))

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` compiles timm's own code: a view of this model with plain ``nn.Sequential`` stages
        (the same blocks and weights), the timm class and none of the policy's Python hooks. Scripted, it is the
        plain network (for inference; trained scripted, it keeps every activation)."""
        return _plain_view(self)

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
    if stem.gradient != gradient:
        stem.configure(gradient=gradient)
    if stem.training != model.training:
        stem.training = model.training  # not a child, so train() / eval() do not reach it
    return stem


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object of the same class sharing everything but its own table of children."""
    copy = object.__new__(type(module))
    copy.__dict__.update(module.__dict__)
    copy._modules = dict(module._modules)
    return copy


def _plain_view(model: nn.Module) -> nn.Module:
    """The converted model as plain timm (for TorchScript): new containers along the paths to the stages and to
    the module the policy hooks, nn.Sequential stages of the same blocks, the timm class; the model is untouched."""
    family = _family_of(model)
    view = _shallow_copy(model)
    view.__class__ = next(c for c in type(model).__mro__[1:] if not issubclass(c, _AdjointFeatures))
    for key in (_STEM_KEY, _STEM_KEY + "_gradient", _POLICY_KEY):
        view.__dict__.pop(key, None)

    def replace(path: str, make: Callable[[nn.Module], nn.Module]) -> None:
        parent = view
        *names, last = path.split(".")
        for name in names:
            child = _shallow_copy(parent._modules[name])
            parent._modules[name] = child
            parent = child
        parent._modules[last] = make(parent._modules[last])

    for path in family.stage_paths(model).values():
        replace(path, lambda stage: nn.Sequential(*stage) if isinstance(stage, AdjointSequential) else stage)

    def without_policy_hooks(module: nn.Module) -> nn.Module:
        """The module with its own hook tables, minus the stage policy's (Python, which TorchScript cannot compile)."""
        module = _shallow_copy(module) if module is not view else module
        for table in ("_forward_pre_hooks", "_forward_hooks"):
            hooks = getattr(module, table)
            kept = type(hooks)((key, hook) for key, hook in hooks.items() if not isinstance(getattr(hook, "__self__", None), StagePolicy))
            setattr(module, table, kept)
        module._forward_hooks_always_called = type(module._forward_hooks_always_called)(
            (key, value) for key, value in module._forward_hooks_always_called.items() if key in module._forward_hooks
        )
        return module

    without_policy_hooks(view)
    replace(family.first_module(model), without_policy_hooks)
    return view


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
    store_every: int | Literal["auto"] | None = "auto",
    min_cosine: float = 0.99,
    recheck_every: int = 500,
    calibration: torch.Tensor | tuple | None = None,
    check: bool = True,
    backprop_where_free: bool = False,
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
        store_every: per-block methods (``block*``) in deep stages keep only the first block input of each run
            of blocks (exactly) and re-run the rest in backward, so memory stays flat in depth for one extra
            block forward per re-run block; the gradient is the one storing every input gives. An int K: runs of
            K blocks. ``"auto"`` (default): in stages of 9 or more residual blocks, runs that shorten towards the
            stage's top, split to hold the fewest states while the backward re-runs one; ``None`` keeps every
            input.
        min_cosine: the gradient fidelity ``"auto"`` requires, and below which an explicit approximate
            method is reported unsafe (a warning on its first training step).
        recheck_every: ``"auto"`` recalibrates every this many training steps (0: only at the first step
            and after a stage had to fall back to an exact gradient).
        calibration: ``images`` or ``(images, targets)`` to calibrate on now instead of on the first
            training step.
        check: for an explicit approximate method, measure it once on the first training step and warn
            when it is unsafe for a stage.
        backprop_where_free: with ``"auto"``, also give plain backprop (no recomputation: faster) to the stages,
            from the output side down, whose autograd graph does not raise the step's peak memory per image,
            measured at calibration (on resnet50 at 224²: layer4, at the same peak).
    """
    root, model = model, _unwrapped(model)  # a features_only FeatureGetterNet: convert the model it wraps
    family = _family_of(model)
    check_policy_options(scheme, min_cosine, recheck_every)
    if scheme == "heun":
        warnings.warn(
            "scheme='heun' changes the network's function (Heun steps pair consecutive blocks): weights trained "
            "as a timm ResNet (an Euler network) give other outputs. Use it to train from scratch; to fine-tune, "
            "use an Euler scheme or a stored-input one",
            stacklevel=2,
        )
    slots = _slots(model, family)
    # a features_only model pruned by out_indices keeps its later stages as empty Sequentials: nothing to convert
    empty = [name for name, (parent, attr) in slots.items() if len(getattr(parent, attr)) == 0]
    names = [n for n in slots if n not in empty] if stages is None else [stages] if isinstance(stages, str) else list(stages)
    unknown = [name for name in names if name not in slots]
    if not names:
        raise ValueError(f"stages=[] converts nothing; pass None for every stage, or some of {list(slots)}")
    if unknown:
        raise ValueError(f"unknown stage name(s) {unknown}; valid stage names: {list(slots)}")
    named_empty = [name for name in names if name in empty]
    if named_empty:
        raise ValueError(
            f"stage(s) {named_empty} have no blocks (a features_only model's out_indices pruned them); "
            f"stages with blocks: {[n for n in slots if n not in empty]}"
        )
    if any(getattr(m, "grad_checkpointing", False) is True for m in root.modules()):
        warnings.warn("timm's grad checkpointing is superseded by the adjoint stages; turning it off", stacklevel=2)
        for m in {id(m): m for m in (root, model)}.values():
            if hasattr(m, "set_grad_checkpointing"):
                m.set_grad_checkpointing(False)

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
                refine=refine, anchor_every=anchor_every, top_step_dtype=top_step_dtype, store_every=store_every,
            )
        except ValueError as err:
            raise ValueError(f"stage {name!r} ({len(stage)} blocks, {stage.exact_head} shape-changing): {err}") from err
        stage.fallback = False
    if family.features is not None:  # the stem as an exact checkpoint (a feature wrapper runs its own stem)
        model.__class__ = _converted_class(type(model))
        model.__dict__[_STEM_KEY + "_gradient"] = "backprop" if scheme == "backprop" else "checkpoint"
    _drop_policy(root)
    if scheme == "auto":
        policy = StagePolicy(converted, mode="auto", min_cosine=min_cosine, recheck_every=recheck_every, backprop_where_free=backprop_where_free)
    elif check and not METHODS[scheme].exact:
        policy = StagePolicy(converted, mode="check", min_cosine=min_cosine, recheck_every=0)
    else:
        policy = None
    if policy is not None:
        root.__dict__[_POLICY_KEY] = policy
        # calibrates on the first training forward of any path (forward, forward_features, forward_intermediates,
        # a features_only wrapper): they all start with this module, on the images (pseudo-labels: no targets)
        policy.attach(root, model.get_submodule(family.first_module(model)))
        if calibration is not None:
            policy.calibrate(root, calibration)
    elif calibration is not None:
        raise ValueError(f"calibration= is used by scheme='auto' or an approximate scheme with check=True, not by {scheme!r}")
    return root


def _drop_policy(model: nn.Module) -> None:
    policy = model.__dict__.pop(_POLICY_KEY, None)
    if policy is not None:
        policy.detach()


def policy_of(model: nn.Module) -> StagePolicy | None:
    """The stage policy ``to_adjoint`` attached (``scheme='auto'``, or the check of an explicit method)."""
    return model.__dict__.get(_POLICY_KEY)


def from_adjoint(model: nn.Module) -> nn.Module:
    """Undo ``to_adjoint`` in place: plain ``nn.Sequential`` stages and the original timm class; returns ``model``."""
    root, model = model, _unwrapped(model)
    for parent, attr in _slots(model, _family_of(model)).values():
        stage = getattr(parent, attr)
        if isinstance(stage, AdjointSequential):
            setattr(parent, attr, nn.Sequential(*stage))
    if isinstance(model, _AdjointFeatures):
        model.__class__ = next(c for c in type(model).__mro__[1:] if not issubclass(c, _AdjointFeatures))
    model.__dict__.pop(_STEM_KEY, None)
    model.__dict__.pop(_STEM_KEY + "_gradient", None)
    _drop_policy(root)
    return root
