"""The LightningModule: early errors, timm keys in and out, freezing, mixup, and the tied → untied route."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch

from lightning_resode.convert import adjoint_stages
from lightning_resode.lit import ResodeClassifier, SyntheticDataModule, export_timm_weights


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"model_name": "resnet181"}, "resnet181"), ({"stages": ["layer7"]}, "layer7"), ({"freeze": ["stem9"]}, "stem9"),
     ({"scheme": "rk4"}, "rk4"), ({"label_smoothing": 1.5}, "1.5"), ({"anchor_every": 0}, "model.anchor_every"),
     ({"refine": -1}, "model.refine")],
)
def test_bad_arguments_fail_naming_the_value(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ResodeClassifier(**{"model_name": "resnet10t", **kwargs})


def _train(module: ResodeClassifier, root: Path, steps: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(
        default_root_dir=root, max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=SyntheticDataModule(num_classes=3, image_size=32, train_samples=8, batch_size=4))
    return trainer


def test_weights_export_to_plain_timm(tmp_path: Path) -> None:
    module = ResodeClassifier("resnet10t", num_classes=3, stages=["layer2", "layer3"], freeze=["conv1"])
    assert set(module.model.state_dict()) == set(timm.create_model("resnet10t", num_classes=3).state_dict())
    frozen_before = module.model.conv1[0].weight.detach().clone()
    trainer = _train(module, tmp_path)
    assert torch.equal(module.model.conv1[0].weight, frozen_before)  # frozen: untouched by training
    checkpoint = tmp_path / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    weights = export_timm_weights(checkpoint, tmp_path / "resnet10t.safetensors")
    plain = timm.create_model("resnet10t", pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(file=str(weights), num_classes=3))
    plain_state = plain.state_dict()
    for name, tensor in module.model.state_dict().items():  # frozen BatchNorm has no num_batches_tracked
        assert torch.equal(tensor, plain_state[name]), name
    module.eval()
    plain.eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(images), module(images))


def test_mixup_cutmix_and_schedule_train(tmp_path: Path) -> None:
    module = ResodeClassifier("resnet10t", num_classes=3, mixup_alpha=0.2, cutmix_alpha=1.0, warmup_epochs=1, warmup_lr=1e-5)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = _train(module, tmp_path)
    assert trainer.optimizers[0].param_groups[0]["lr"] < module.hparams.lr  # still warming up
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_ode_resnet_tied_weights_load_into_the_untied_model(tmp_path: Path) -> None:
    tied = ResodeClassifier("ode_resnet", num_classes=3, model_kwargs={"depth": 6, "width": 8, "tied": True}, scheme="heun")
    assert len({id(b) for b in tied.model.stage}) == 1
    assert adjoint_stages(tied.model)["stage"].scheme == "heun"
    _train(tied, tmp_path)
    path = tmp_path / "tied.ckpt"
    torch.save({"state_dict": tied.state_dict()}, path)
    untied = ResodeClassifier("ode_resnet", num_classes=3, model_kwargs={"depth": 6, "width": 8}, scheme="heun", weights_file=str(path))
    assert len({id(b) for b in untied.model.stage}) == 6
    tied.eval()
    untied.eval()
    images = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(untied(images), tied(images))


def test_one_stage_name_may_be_given_as_a_string_as_on_the_command_line() -> None:
    """``--model.stages=layer4`` was refused with a jsonargparse union dump; a bare name must not be read as a
    set of letters either ('layer4' in 'layer4' and 'layer' in 'layer4' are both true of a string)."""
    from lightning_resode.lit import ResodeClassifier

    module = ResodeClassifier(model_name="resnet18", pretrained=False, num_classes=3, stages="layer4")
    assert module.hparams.stages == ["layer4"]
    with pytest.raises(ValueError, match="layr4"):
        ResodeClassifier(model_name="resnet18", pretrained=False, num_classes=3, stages="layr4")


def test_validation_accuracy_is_the_share_of_images_classified_right(tmp_path: Path) -> None:
    """``val/acc`` is top-1 accuracy as timm's validate reports it: right answers over images, however the classes
    are balanced (a per-class mean would differ here, and printed 1.0000001 where every image was right)."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    module = ResodeClassifier("resnet10t", num_classes=3)
    images = torch.randn(12, 3, 32, 32)
    module.eval()
    with torch.no_grad():
        predicted = module(images).argmax(-1)
    targets = predicted.clone()
    targets[:5] = (predicted[:5] + 1) % 3  # five wrong; the classes are unbalanced
    expected = float((predicted == targets).float().mean())
    per_class = [float((predicted[targets == c] == c).float().mean()) for c in targets.unique()]
    assert abs(sum(per_class) / len(per_class) - expected) > 1e-3  # the test can tell the two apart
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(module, dataloaders=DataLoader(TensorDataset(images, targets), batch_size=4))
    assert metrics["val/acc"] == pytest.approx(expected, abs=1e-6)
    all_right = DataLoader(TensorDataset(images, predicted), batch_size=4)
    (metrics,) = trainer.validate(module, dataloaders=all_right)
    assert metrics["val/acc"] == 1.0


def test_evaluating_a_checkpoint_at_another_image_size_says_so_once(tmp_path: Path) -> None:
    """A digits model trained at 32² scored chance at 64² with nothing said: the checkpoint records the size the
    weights were trained on, and validate/test/predict at another size warn once (never during fit)."""
    import warnings

    module = ResodeClassifier("resnet10t", num_classes=3)
    trainer = _train(module, tmp_path)  # 32x32 images
    checkpoint = tmp_path / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    assert torch.load(checkpoint, weights_only=False)["resode_trained_image_size"] == [32, 32]

    def evaluate(size: int) -> list[str]:
        fresh = ResodeClassifier("resnet10t", num_classes=3)
        evaluator = pl.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False)
        data = SyntheticDataModule(num_classes=3, image_size=size, train_samples=8, val_samples=8, batch_size=4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            evaluator.validate(fresh, datamodule=data, ckpt_path=str(checkpoint))
        return [str(w.message) for w in caught if "trained on" in str(w.message)]

    assert evaluate(32) == []
    (message,) = evaluate(48)  # once, though two batches
    assert "48x48" in message and "32x32" in message
