"""Errors say what is wrong, naming the value: one-class data, non-finite input or loss, weights that do not fit,
TensorBoard missing."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from lightning_resode.cli import main
from lightning_resode.lit import ResodeClassifier, build_loggers, load_weights_file
from lightning_resode.lit.guards import NonFiniteInputError, TrainingDivergedError

QUICK = [
    "--config", "recipes/quickstart.yaml", "--logging.wandb=false", "--trainer.enable_progress_bar=false",
    "--model.model_name=resnet10t", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
    "--trainer.max_epochs=1", "--trainer.num_sanity_val_steps=0", "--data.init_args.batch_size=8",
]


def test_a_one_class_image_folder_is_named_with_the_reason(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "only").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "only" / "0.png")
    # a usage error: one line, the reason first (not jsonargparse's list of union subtypes)
    with pytest.raises(SystemExit, match=r"^lightning-resode: error: image folder .* has one class sub-folder \('only'\)") as info:
        main(["fit", *QUICK, f"--trainer.default_root_dir={tmp_path / 'run'}", "--data=ImageFolderDataModule",
              f"--data.init_args.root={tmp_path}"])
    assert str(tmp_path / "train") in str(info.value) and "Subtypes" not in str(info.value)


def _fit_on(images: torch.Tensor, tmp_path: Path, **options) -> None:
    targets = torch.arange(len(images)) % 2
    data = pl.LightningDataModule.from_datasets(train_dataset=TensorDataset(images, targets), batch_size=4)
    model = ResodeClassifier("resnet10t", num_classes=2, scheduler="none", **options)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, data)


def test_non_finite_input_is_reported_as_such_naming_the_step(tmp_path: Path) -> None:
    images = torch.randn(8, 3, 16, 16)
    images[5, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"step \d holds 1 NaN"):
        _fit_on(images, tmp_path)


def test_a_diverged_loss_is_reported_as_divergence_not_as_a_scheme_problem(tmp_path: Path) -> None:
    with pytest.raises(TrainingDivergedError, match=r"diverged: loss is (nan|inf) at step \d"):
        _fit_on(torch.randn(12, 3, 16, 16) * 1e3, tmp_path, optimizer="sgd", lr=1e12)


def _weights(tmp_path: Path, name: str, **kwargs) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(name, **kwargs).state_dict().items()}, str(path))
    return path


def test_weights_file_may_differ_in_the_classifier_only(tmp_path: Path) -> None:
    model = timm.create_model("resnet10t", num_classes=3)
    with pytest.warns(UserWarning, match="skipped 2 key"):
        skipped = load_weights_file(model, _weights(tmp_path, "resnet10t", num_classes=7))
    assert skipped == ["fc.bias", "fc.weight"]

    deeper = _weights(tmp_path, "resnet14t", num_classes=3)
    with pytest.raises(ValueError, match="unknown to the model") as info:
        load_weights_file(model, deeper)
    assert "layer1.0.conv1.weight" in str(info.value)
    assert "partial=True" in str(info.value)
    narrower = _weights(tmp_path, "resnet18", num_classes=3)
    with pytest.raises(ValueError, match="of another shape"):
        load_weights_file(timm.create_model("resnet18", num_classes=3, channels=(8, 16, 32, 64)), narrower)
    with pytest.warns(UserWarning, match="skipped"):
        skipped = load_weights_file(model, deeper, partial=True)
    assert "layer1.0.conv1.weight" in skipped and "layer1.0.bn3.bias" in skipped


def test_tensorboard_logs_or_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    main(["fit", *QUICK, f"--trainer.default_root_dir={tmp_path}", "--logging.tensorboard=true"])
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    for name in ("tensorboard", "tensorboardX"):  # as on a machine without them
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'lightning-resode\[tensorboard\]'"):
        build_loggers(tmp_path, wandb=False, tensorboard=True)


@pytest.mark.parametrize("where", ["command line", "recipe"])
def test_a_misspelled_recipe_key_is_one_short_error_with_a_suggestion(tmp_path: Path, capsys, where: str) -> None:
    if where == "recipe":
        bad = tmp_path / "bad.yaml"
        bad.write_text("model:\n  schme: auto\n")
        extra = ["--config", str(bad)]
    else:
        extra = ["--model.schme=auto"]
    with pytest.raises(SystemExit) as info:
        main(["fit", *QUICK, f"--trainer.default_root_dir={tmp_path}", *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "model.schme" in err and "did you mean --model.scheme?" in err, err
    assert len(err.strip().splitlines()) <= 4, err  # usage, tip, error: not every option of every section


def test_converting_a_compiled_model_says_to_convert_first() -> None:
    import timm
    import torch

    from lightning_resode import to_adjoint

    with pytest.raises(TypeError, match=r"convert first, then compile: model = torch.compile\(to_adjoint\(model\)\)"):
        to_adjoint(torch.compile(timm.create_model("resnet18", pretrained=False)))


def test_an_empty_batch_trains_as_in_timm() -> None:
    import warnings

    import timm
    import torch

    from lightning_resode import to_adjoint

    model = to_adjoint(timm.create_model("resnet18", pretrained=False), scheme="block_fp16").train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 'could not be checked' for a batch of nothing
        out = model(torch.randn(0, 3, 64, 64))
    out.sum().backward()
    assert out.shape == (0, 1000)


def test_a_mistyped_model_name_is_answered_with_names_that_convert() -> None:
    """A new user's 'tresnt_m' was answered with tresnet_m / tresnet_l, which to_adjoint then refused."""
    from lightning_resode.lit.module import _check_model_name

    from lightning_resode import to_adjoint

    for typo in ("tresnt_m", "seresnxt26"):
        with pytest.raises(ValueError, match=f"unknown timm model name '{typo}'") as raised:
            _check_model_name(typo)
        suggested = re.findall(r"'([a-z0-9_]+)'", str(raised.value).split("did you mean", 1)[-1])
        assert suggested, str(raised.value)
        for name in suggested:  # each one converts
            to_adjoint(timm.create_model(name, pretrained=False, num_classes=2), scheme="block")


@pytest.mark.parametrize("dtype", [torch.float64, torch.uint8])
def test_an_input_of_another_dtype_than_the_weights_is_named_before_the_engine_runs(dtype) -> None:
    from lightning_resode import to_adjoint

    model = to_adjoint(timm.create_model("resnet18", pretrained=False), scheme="block").train()
    images = (torch.rand(2, 3, 64, 64) * 255).to(dtype)
    with pytest.raises(TypeError, match=rf"stage stem: the input is {dtype} but the weights are torch.float32; convert the images \(x.to\(torch.float32\)\)"):
        model(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for itself: no error
        model(torch.rand(2, 3, 64, 64)).float().sum().backward()


@pytest.mark.parametrize("option", ["--data.batch_sise=3", "--data.init_args.batch_sise=3"])
def test_a_misspelled_data_option_is_one_short_error_with_a_suggestion(tmp_path: Path, capsys, option: str) -> None:
    """A new user got jsonargparse's union dump (subtypes, a NestedArg) for one misspelled data option."""
    with pytest.raises(SystemExit) as info:
        main(["fit", *QUICK, f"--trainer.default_root_dir={tmp_path}", option])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "'batch_sise' is not an option of lightning_resode.lit.DigitsDataModule" in err, err
    assert "did you mean --data.init_args.batch_size?" in err and "NestedArg" not in err, err
    assert len(err.strip().splitlines()) <= 4, err
