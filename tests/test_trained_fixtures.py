"""The trained-weight fixtures: deterministic, normally trained (large residuals where expected), cached."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_resode.testing import create_untrained, digits_split, residual_statistics, trained_resnet
from lightning_resode.testing.trained import cache_paths, train


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# make test-slow: tests/test_fixture_reproducibility.py trains the same fixture in another process (one thread,
# AVX2 kernels) and compares every bit, which this same-process retraining only repeats
@pytest.mark.slow
def test_same_seed_gives_bit_identical_weights(trained_small) -> None:
    cached = trained_small("resnet50", False)  # trained by this or another process with the same recipe
    info_a = cached.info
    second, info_b = train("resnet50", False, size="small", seed=0)
    a, b = _state(cached.model), _state(second)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"parameters differ between two trainings with the same seed: {different[:5]}"
    assert info_a["held_out_accuracy"] == info_b["held_out_accuracy"]
    # measured in float32 after training, by whatever thread count each process had: equal up to rounding
    for stage, stats in info_a["stages"].items():
        assert stats == pytest.approx(info_b["stages"][stage], rel=1e-5), stage
    # and training actually moved the weights away from the initialisation
    init = _state(create_untrained("resnet50", False, size="small", seed=0))
    assert not torch.equal(init["layer3.1.conv2.weight"], a["layer3.1.conv2.weight"])


@pytest.mark.parametrize("model_name", ["resnet50", "resnet101"])
def test_trained_residuals_are_large_without_zero_init(trained_small, model_name: str) -> None:
    fixture = trained_small(model_name, False)
    for stage, stats in fixture.info["stages"].items():
        assert stats["residual_ratio"] > 0.2, (stage, stats)
        assert stats["clip_fraction"] > 0.05, (stage, stats)  # the ReLU after the sum clips
    # the record describes the weights that were loaded
    images = digits_split((0, 1, 2, 3, 4), 32).test_images
    measured = residual_statistics(fixture.model, images)
    for stage, stats in measured.items():
        assert stats["residual_ratio"] == pytest.approx(fixture.info["stages"][stage]["residual_ratio"], rel=1e-4)


def test_trained_zero_init_has_non_zero_residuals_untrained_has_none(trained_small) -> None:
    images = digits_split((0, 1, 2, 3, 4), 32).test_images[:64]
    untrained = residual_statistics(create_untrained("resnet50", True, size="small"), images)
    for stage, stats in untrained.items():
        assert stats["residual_ratio"] == 0.0 and stats["clip_fraction"] == 0.0, (stage, stats)
    trained = trained_small("resnet50", True).info["stages"]
    for stage, stats in trained.items():
        assert stats["residual_ratio"] > 0.0 and stats["clip_fraction"] > 0.0, (stage, stats)


def test_cache_hit_loads_without_training(trained_small) -> None:
    first = trained_small("resnet50", False)
    weights, record = cache_paths("resnet50", False, size="small")
    stamps = weights.stat().st_mtime_ns, record.stat().st_mtime_ns
    again = trained_resnet("resnet50", False, size="small", train_if_missing=False)  # raises if it had to train
    assert (weights.stat().st_mtime_ns, record.stat().st_mtime_ns) == stamps
    assert again.model is not first.model
    a, b = _state(first.model), _state(again.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.info["recipe_hash"] in weights.name
    # no half-written file of this entry (other workers may be writing other entries meanwhile)
    assert not [p for p in os.listdir(weights.parent) if p.endswith(".tmp") and p.startswith((f".{weights.name}.", f".{record.name}."))]


def test_missing_cache_entry_is_reported(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="train_if_missing"):
        trained_resnet("resnet50", False, size="small", root=tmp_path, train_if_missing=False)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LIGHTNING_RESODE_CACHE", str(tmp_path))
    weights, record = cache_paths("resnet101", True, size="full", seed=3)
    assert weights.parent == tmp_path and record.parent == tmp_path
    assert "resnet101-zil-full-seed3-" in weights.name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(model_name="resnet18"), "unknown fixture model 'resnet18'"),
        (dict(model_name="resnet50", size="tiny"), "unknown fixture size 'tiny'"),
    ],
)
def test_bad_fixture_names_fail_early(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        trained_resnet(kwargs.pop("model_name"), False, train_if_missing=False, **kwargs)


def test_digits_split_is_fixed_and_relabelled() -> None:
    a, b = digits_split((5, 6, 7, 8, 9), 16), digits_split((5, 6, 7, 8, 9), 16)
    assert torch.equal(a.test_images, b.test_images) and torch.equal(a.train_labels, b.train_labels)
    assert set(a.train_labels.tolist()) == {0, 1, 2, 3, 4} and a.train_images.shape[1:] == (3, 16, 16)
    with pytest.raises(ValueError, match="distinct digits"):
        digits_split((3, 3), 16)
