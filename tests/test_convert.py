"""to_adjoint / from_adjoint on real timm models: same keys, same function, same BatchNorm, O(#stages) memory."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from torch import nn

from lightning_resode import AdjointSequential, adjoint_stages, from_adjoint, saved_activation_bytes, to_adjoint
from lightning_resode.convert import supported_stage_names

# Narrow models keep the suite fast; the structure (stem, stages, downsampling heads) is timm's own.
NARROW = dict(channels=(16, 32, 64, 128), stem_width=16)


def _model(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=5, **kwargs)


def _perturb_residuals(model: nn.Module, last_bn_scale: float = 0.25) -> None:
    """Random-init timm ResNets zero each block's last BN (identity blocks): give the branches a real size."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                zero_init = bool((m.weight == 0).all())
                scale = last_bn_scale if zero_init else 1.0
                m.weight.copy_(scale * (0.8 + 0.4 * torch.rand(m.weight.shape, generator=gen)))
                m.bias.copy_(0.05 * scale * torch.randn(m.bias.shape, generator=gen))


def _flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize(
    ("name", "kwargs", "stage_names"),
    [
        ("resnet18", NARROW, ["layer1", "layer2", "layer3", "layer4"]),
        ("resnet26d", {}, ["layer1", "layer2", "layer3", "layer4"]),
        ("seresnext26d_32x4d", {}, ["layer1", "layer2", "layer3", "layer4"]),
        ("resnetv2_18", {}, ["stages.0", "stages.1", "stages.2", "stages.3"]),
    ],
)
def test_keys_roundtrip_and_plain_checkpoints(name: str, kwargs: dict, stage_names: list[str]) -> None:
    model = _model(name, **kwargs)
    plain_state = copy.deepcopy(model.state_dict())
    assert supported_stage_names(model) == stage_names
    to_adjoint(model)
    assert list(model.state_dict()) == list(plain_state)
    assert set(adjoint_stages(model)) == set(stage_names)
    other = _model(name, **kwargs)
    model.load_state_dict(other.state_dict())  # a plain timm checkpoint loads into the converted model
    back = _model(name, **kwargs)
    back.load_state_dict(model.state_dict())  # and back
    for key, value in back.state_dict().items():
        assert torch.equal(value, other.state_dict()[key]), key
    from_adjoint(model)
    assert type(model) is type(back)
    assert not any(isinstance(m, AdjointSequential) for m in model.modules())
    assert list(model.state_dict()) == list(plain_state)


@pytest.mark.parametrize("name", ["resnet18", "resnetv2_18"])
def test_same_function_same_batchnorm_exact_gradient(name: str) -> None:
    kwargs = NARROW if name == "resnet18" else {}
    # float64: recomputation may use other (equally accurate) kernels than the forward, so float32
    # gradients agree only to float32 rounding; in float64 "exact" can be checked tightly
    plain = _model(name, **kwargs).double()
    _perturb_residuals(plain)
    converted = to_adjoint(copy.deepcopy(plain), scheme="checkpoint")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    plain.eval(), converted.eval()
    torch.testing.assert_close(converted(x), plain(x), rtol=0, atol=0)
    plain.train(), converted.train()
    out_plain, out_conv = plain(x), converted(x)
    torch.testing.assert_close(out_conv, out_plain, rtol=0, atol=0)
    out_plain.square().sum().backward()
    out_conv.square().sum().backward()
    for (key, a), b in zip(plain.state_dict().items(), converted.state_dict().values()):
        assert torch.equal(a, b), f"buffer/param {key} differs after one training step"  # BN updated once
    torch.testing.assert_close(_flat_grads(converted), _flat_grads(plain), rtol=1e-9, atol=1e-12)


def test_default_scheme_is_memory_free_and_close_for_small_residuals() -> None:
    plain = _model("resnet18", **NARROW)
    _perturb_residuals(plain, last_bn_scale=0.02)
    converted = to_adjoint(copy.deepcopy(plain))  # scheme="auto": exact until its first training step measures
    assert {s.method for s in adjoint_stages(converted).values()} == {"block"}
    # 128x128: layer4 is 4x4, so with 4 images its BatchNorms see 64 values per channel, enough to measure an
    # approximation (below that every stage is exact: too few values, see MIN_VALUES_PER_CHANNEL)
    x = torch.randn(4, 3, 128, 128)
    plain(x).square().sum().backward()
    converted(x).square().sum().backward()
    # small residuals: the cheapest method (reconstruction, one block forward per block) is exact enough
    assert {s.method for s in adjoint_stages(converted).values()} == {"euler_fast"}
    g, e = _flat_grads(converted), _flat_grads(plain)
    assert float(torch.nn.functional.cosine_similarity(g, e, dim=0)) > 0.99
    for stage in adjoint_stages(converted).values():
        assert stage.last_backward is not None and stage.last_backward.gradient == "adjoint"


def test_saved_activations_grow_with_stages_not_depth() -> None:
    def mib_per_image(name: str, size: int, batch: int = 1, **options) -> float:
        model = _model(name)
        x = torch.randn(batch, 3, size, size)
        # approximations are measured (and used) only where BatchNorm sees >= 64 values per channel: 16
        # calibration images at 64x64 (layer4 is 2x2), 4 at 224x224 (7x7; fewer keeps the test quick)
        calibration = torch.randn(16 if size < 128 else 4, 3, size, size)
        to_adjoint(model, **options, **({} if options else {"calibration": calibration}))
        return saved_activation_bytes(model, lambda: model(x)) / batch / 2**20

    # 16 -> 33 blocks, same stage boundaries; only the per-channel BatchNorm statistics grow with depth (16
    # images at 64x64: layer4 is 2x2, and approximations run only where BatchNorm sees >= 64 values). The
    # method the default picks on these zero-init weights is given explicitly here (the calibration is the slow
    # part of this test; the 224x224 case below runs the default itself)
    shallow = mib_per_image("resnet50", 64, batch=16, scheme="euler_fast", check=False)
    deep = mib_per_image("resnet101", 64, batch=16, scheme="euler_fast", check=False)
    assert deep == pytest.approx(shallow, rel=0.10)
    backprop = mib_per_image("resnet50", 64, scheme="backprop")
    assert backprop > 6 * shallow


@pytest.mark.slow  # the default's calibration at 224² on the CPU (make test-slow)
def test_the_default_keeps_little_at_rest_at_224() -> None:
    # the default at 224x224 picks by measured peak: 16-bit block inputs (14.4 MiB/img at rest) over euler_fast
    # (10.0 at rest, a higher peak) on these weights (docs/BENCHMARKS.md); either way far below backprop's 82
    model = _model("resnet50")
    to_adjoint(model, calibration=torch.randn(4, 3, 224, 224))
    assert saved_activation_bytes(model, lambda: model(torch.randn(1, 3, 224, 224))) / 2**20 <= 16.0


def test_forward_features_head_and_reset_classifier() -> None:
    plain = _model("resnet18", **NARROW).eval()
    converted = to_adjoint(copy.deepcopy(plain)).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(converted.forward_features(x), plain.forward_features(x), rtol=0, atol=0)
    features = converted.forward_features(x)
    torch.testing.assert_close(converted.forward_head(features, pre_logits=True), plain.forward_head(features, pre_logits=True))
    converted.reset_classifier(7)
    assert converted(x).shape == (2, 7)
    converted.set_grad_checkpointing(False)
    with pytest.raises(RuntimeError, match="scheme='checkpoint'"):
        converted.set_grad_checkpointing(True)


def test_timm_checkpointing_is_switched_off_on_conversion() -> None:
    model = _model("resnet18", **NARROW)
    model.set_grad_checkpointing(True)
    with pytest.warns(UserWarning, match="grad checkpointing"):
        to_adjoint(model)
    assert model.grad_checkpointing is False


def test_selected_stages_and_reconfiguration() -> None:
    model = to_adjoint(_model("resnet18", **NARROW), stages=["layer3"], scheme="euler")
    assert list(adjoint_stages(model)) == ["layer3"]
    assert isinstance(model.layer2, nn.Sequential) and not isinstance(model.layer2, AdjointSequential)
    to_adjoint(model, stages=["layer3", "layer4"], scheme="checkpoint")  # already converted: reconfigured
    assert model.layer3.gradient == "checkpoint" and model.layer4.gradient == "checkpoint"
    assert model.layer3.exact_head == 1  # the downsampling first block is recomputed exactly


def test_pickle_and_deepcopy_keep_conversion() -> None:
    model = to_adjoint(_model("resnet18", **NARROW)).eval()
    x = torch.randn(1, 3, 32, 32)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(clone) is type(model)
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
        assert set(adjoint_stages(clone)) == set(adjoint_stages(model))


def test_bad_input_errors_name_what_is_valid() -> None:
    with pytest.raises(TypeError, match="Supported families: timm ResNet v1"):
        to_adjoint(nn.Sequential(nn.Linear(2, 2)))
    model = _model("resnet18", **NARROW)
    with pytest.raises(ValueError, match=r"valid stage names: \['layer1', 'layer2', 'layer3', 'layer4'\]"):
        to_adjoint(model, stages=["layer5"])
    with pytest.raises(ValueError, match=r"stages=\[\] converts nothing.*\['layer1', 'layer2', 'layer3', 'layer4'\]"):
        to_adjoint(model, stages=[])
    with pytest.raises(ValueError, match="valid:.*'euler_fast'"):
        to_adjoint(model, scheme="rk4")
    with pytest.raises(ValueError, match="calibration= is used by scheme='auto'"):
        to_adjoint(model, scheme="block", calibration=torch.randn(2, 3, 32, 32))
    with pytest.warns(UserWarning, match="stage 'layer2' has 1 residual block"):
        to_adjoint(model, stages=["layer2"], scheme="heun")  # one residual block after the downsampling head
    assert model.layer2.method == "block" and model.layer2.scheme == "euler"
    to_adjoint(model, stages="layer3", scheme="checkpoint")  # a bare name is one stage, not its letters
    assert model.layer3.gradient == "checkpoint"


def test_a_converted_model_unpickles_in_a_fresh_process(tmp_path) -> None:
    """ddp_spawn and torch.load in another process rebuild the converted class from the timm one."""
    import subprocess
    import sys

    model = to_adjoint(_model("resnet18", **NARROW))
    torch.save(model, tmp_path / "model.pt")
    code = (
        "import torch; from lightning_resode import adjoint_stages;"
        f"m = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False);"
        "print(type(m).__name__, sorted(adjoint_stages(m)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "ResNet" in out and "['layer1', 'layer2', 'layer3', 'layer4']" in out
