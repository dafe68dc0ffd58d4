"""Pretrained weights from local files (created here) and a fast, helpful failure when the hub is offline."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from lightning_resode import to_adjoint
from lightning_resode.pretrained import PretrainedWeightsUnavailable, _cached_on_disk, create_model

NARROW = dict(channels=(16, 32, 64, 128), stem_width=16)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_load_through_timm_and_convert(tmp_path, suffix: str) -> None:
    source = timm.create_model("resnet18", pretrained=False, num_classes=10, **NARROW)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    model = create_model("resnet18", checkpoint=path, num_classes=10, **NARROW)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    to_adjoint(model)
    assert set(model.state_dict()) == set(state)
    # a different head size keeps the backbone and re-initialises the classifier, as timm does for hub weights
    fresh_head = create_model("resnet18", checkpoint=path, num_classes=3, **NARROW)
    assert torch.equal(fresh_head.conv1.weight, state["conv1.weight"]) and fresh_head.fc.out_features == 3


def test_bad_checkpoint_paths_are_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        create_model("resnet18", checkpoint=tmp_path / "missing.safetensors")
    odd = tmp_path / "weights.txt"
    odd.write_text("x")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        create_model("resnet18", checkpoint=odd)


@pytest.mark.parametrize("offline_how", ["HF_HUB_OFFLINE", "unreachable endpoint"])
def test_hub_fails_fast_offline_with_instructions(monkeypatch, offline_how: str) -> None:
    name = "resnet152"
    if _cached_on_disk(name):
        pytest.skip(f"{name} weights are in the local cache; the offline path would load them")
    if offline_how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused at once
    with pytest.raises(PretrainedWeightsUnavailable, match=r"checkpoint='weights\.safetensors'"):
        create_model(name, pretrained=True, hub_timeout_s=1.0)
