"""What timm users do with a model, done on converted models of every family we support, against plain timm.

Forward, backward (train mode, weights with large residual branches), forward_features, forward_intermediates
(eval and training), features_only models, FX feature extraction, TorchScript, reset_classifier and state_dict
round trips. Models are made narrow (timm's own ``channels=`` / ``stem_chs=``) so every family stays quick.
"""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from lightning_resode import adjoint_stages, from_adjoint, policy_of, to_adjoint

V1 = dict(channels=(16, 32, 64, 128), stem_width=16)
FAMILIES = {
    "resnet18": V1,  # basic blocks
    "resnet50": V1,  # bottlenecks
    "resnet26d": V1,  # deep stem, average-pool shortcut
    "seresnet18": V1,  # squeeze-excitation
    "ecaresnet26t": V1,  # ECA attention, tiered stem
    "resnext50_32x4d": V1,  # grouped convolutions
    "wide_resnet50_2": V1,
    "resnetv2_50": dict(channels=(64, 64, 128, 128), stem_chs=16),  # pre-activation
    "resnetv2_50x1_bit": dict(channels=(128, 128, 128, 128), stem_chs=32),  # BiT: GroupNorm, weight standardisation
}
NAMES = list(FAMILIES)
#: the checks that train or script run on these in ``make test``, on every family in ``make test-slow``
QUICK = ("resnet18", "resnet50", "resnetv2_50")
SWEEP = [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow) for n in NAMES]


@functools.cache
def _plain_weights(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, zero_init_last=False, **FAMILIES[name])
    return {k: v.clone() for k, v in model.state_dict().items()}


def _plain(name: str, dtype: torch.dtype = torch.float32, **kwargs) -> nn.Module:
    model = timm.create_model(name, num_classes=5, zero_init_last=False, **FAMILIES[name], **kwargs)
    if "features_only" not in kwargs:
        model.load_state_dict(_plain_weights(name))
    return model.to(dtype)


def _images(n: int = 4, size: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _grads(model: nn.Module, x: torch.Tensor, output=lambda m, x: m(x)) -> list[torch.Tensor]:  # noqa: ANN001
    out = output(model, x)
    outs = out if isinstance(out, (list, tuple)) else [out]
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)).sum() for o in outs)
    return list(torch.autograd.grad(loss, [x, *model.parameters()], allow_unused=True))


def _assert_same(got: list[torch.Tensor | None], want: list[torch.Tensor | None]) -> None:
    assert len(got) == len(want) and [g is None for g in got] == [w is None for w in want]
    for g, w in zip(got, want):
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_forward_in_eval_is_plain_timms(name: str) -> None:
    plain = _plain(name).eval()
    converted = to_adjoint(copy.deepcopy(plain)).eval()
    x = _images()
    torch.testing.assert_close(converted(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(converted.forward_features(x), plain.forward_features(x), rtol=0, atol=0)
    final, intermediates = converted.forward_intermediates(x)
    final_plain, intermediates_plain = plain.forward_intermediates(x)
    torch.testing.assert_close(final, final_plain, rtol=0, atol=0)
    for got, want in zip(intermediates, intermediates_plain, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", SWEEP)
def test_training_gradients_are_plain_timms(name: str) -> None:
    """The exact method to float64 round-off through forward and forward_intermediates; the default within its
    promise (whole-model cosine >= 0.99 on the batch it calibrated on)."""
    plain = _plain(name, torch.float64).train()
    exact = to_adjoint(copy.deepcopy(plain), scheme="block").train()
    x = _images(dtype=torch.float64).requires_grad_()
    _assert_same(_grads(exact, x), _grads(copy.deepcopy(plain), x))
    intermediates = lambda m, x: m.forward_intermediates(x, intermediates_only=True)  # noqa: E731
    _assert_same(_grads(exact, x, intermediates), _grads(copy.deepcopy(plain), x, intermediates))
    default = to_adjoint(copy.deepcopy(plain).float()).train()
    images = _images(8).requires_grad_()
    got, want = _grads(default, images), _grads(copy.deepcopy(plain).float(), images)
    cosine = F.cosine_similarity(torch.cat([g.flatten() for g in got[1:]]), torch.cat([w.flatten() for w in want[1:]]), dim=0)
    assert policy_of(default).decisions and float(cosine) >= 0.99, (float(cosine), policy_of(default).methods())


@pytest.mark.parametrize("name", NAMES)
def test_features_only_models_convert_and_match(name: str) -> None:
    plain = _plain(name, torch.float64, features_only=True)
    plain.load_state_dict({k: v.double() for k, v in _plain(name).state_dict().items() if k in plain.state_dict()}, strict=False)
    converted = to_adjoint(copy.deepcopy(plain), scheme="block")
    assert list(adjoint_stages(converted)) and list(converted.state_dict()) == list(plain.state_dict())
    x = _images(dtype=torch.float64)
    for got, want in zip(converted.eval()(x), plain.eval()(x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    x.requires_grad_()
    _assert_same(_grads(converted.train(), x), _grads(plain.train(), x))


def test_stages_pruned_by_out_indices_are_not_converted() -> None:
    """timm's getter wrapper keeps the stages after the last out_index as empty Sequentials; converting them would
    give the policy a stage with no blocks to decide for."""
    plain = _plain("resnet18", features_only=True, feature_cls="getter", out_indices=(1, 3))
    converted = to_adjoint(copy.deepcopy(plain))
    assert list(adjoint_stages(converted)) == ["layer1", "layer2", "layer3"]
    assert set(policy_of(converted).stages) == {"layer1", "layer2", "layer3"}
    with pytest.raises(ValueError, match=r"\['layer4'\] have no blocks.*stages with blocks: \['layer1', 'layer2', 'layer3'\]"):
        to_adjoint(copy.deepcopy(plain), stages=["layer3", "layer4"])


@pytest.mark.parametrize("name", NAMES)
def test_fx_feature_extraction_sees_the_plain_network(name: str) -> None:
    plain = _plain(name).eval()
    converted = to_adjoint(copy.deepcopy(plain)).eval()
    assert get_graph_node_names(converted) == get_graph_node_names(plain)
    stage = list(adjoint_stages(converted))[1]
    x = _images()
    got = create_feature_extractor(converted, {stage: "f"})(x)["f"]
    torch.testing.assert_close(got, create_feature_extractor(plain, {stage: "f"})(x)["f"], rtol=0, atol=0)
    assert policy_of(converted).step == 0  # tracing never calibrates


@pytest.mark.parametrize("name", SWEEP)
def test_torchscript_compiles_the_plain_network_and_leaves_the_model_converted(name: str) -> None:
    plain = _plain(name).eval()
    converted = to_adjoint(copy.deepcopy(plain)).eval()
    scripted = torch.jit.script(converted)
    x = _images()
    torch.testing.assert_close(scripted(x), plain(x), rtol=1e-6, atol=1e-6)
    assert len(adjoint_stages(converted)) == len(adjoint_stages(to_adjoint(copy.deepcopy(plain))))
    converted.train()(x).sum().backward()  # still the converted model, trainable


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_and_reset_classifier(name: str) -> None:
    plain = _plain(name).eval()
    converted = to_adjoint(_plain(name)).eval()
    assert list(converted.state_dict()) == list(plain.state_dict())
    converted.load_state_dict(plain.state_dict())
    back = from_adjoint(copy.deepcopy(converted))
    back.load_state_dict(converted.state_dict())
    x = _images()
    torch.testing.assert_close(back(x), plain(x), rtol=0, atol=0)
    converted.reset_classifier(7)
    assert converted(x).shape == (4, 7)


def test_torchscript_of_a_lone_stage_says_what_to_do() -> None:
    model = to_adjoint(timm.create_model("resnet18", features_only=True, **V1))
    with pytest.raises(TypeError, match=r"stage layer1: TorchScript cannot compile .*from_adjoint\(model\)"):
        torch.jit.script(model)
