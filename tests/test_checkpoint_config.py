"""The config is the source of truth: a checkpoint of another model is refused in one line naming both, in every
command; training options given with ``--ckpt_path`` are applied on resume and said, never silently dropped."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch

from cli_args import ALL_COMMANDS, COMMANDS, tiny_run
from lightning_resode.cli import main

TINY = tiny_run(*ALL_COMMANDS, "--model.scheduler=cosine")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet10t on digits (10 classes), one epoch of 3 steps, lr 0.003 on a cosine schedule."""
    root = tmp_path_factory.mktemp("trained")
    main(["fit", *TINY, f"--trainer.default_root_dir={root}", "--trainer.max_epochs=1"])
    return root


def _one_line_error(args: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(args)
    message = str(info.value.code)
    assert info.value.code not in (0, None) and "\n" not in message, message
    return message


@pytest.mark.parametrize("command", COMMANDS)
def test_a_checkpoint_of_another_model_is_refused_naming_both(command: str, trained: Path, tmp_path: Path) -> None:
    ckpt = trained / "checkpoints" / "last.ckpt"
    extra = ["--diagnose.batch_images=4"] if command == "diagnose" else []
    message = _one_line_error([command, *TINY, *extra, f"--trainer.default_root_dir={tmp_path}",
                               "--model.model_name=resnet14t", f"--ckpt_path={ckpt}"])
    assert "resnet10t with 10 classes" in message and "resnet14t with 10 classes" in message, message
    assert str(ckpt) in message


def test_a_checkpoint_with_another_number_of_classes_is_refused(trained: Path, tmp_path: Path) -> None:
    message = _one_line_error(["test", *TINY, f"--trainer.default_root_dir={tmp_path}", "--data=SyntheticDataModule",
                               "--data.init_args.num_classes=7", "--data.init_args.image_size=32",
                               f"--ckpt_path={trained / 'checkpoints' / 'last.ckpt'}"])
    assert "resnet10t with 10 classes" in message and "resnet10t with 7 classes" in message, message


def test_a_stage_method_the_config_cannot_use_is_refused(trained: Path, tmp_path: Path) -> None:
    """An auto policy's decision stored in the checkpoint ('euler_fast' for layer4) that the config's candidates lack."""
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["resode_policy"] = {"methods": {"layer4": "heun"}, "decisions": [], "step": 3}
    path = tmp_path / "heun.ckpt"
    torch.save(ckpt, path)
    message = _one_line_error(["validate", *TINY, f"--trainer.default_root_dir={tmp_path}", "--model.scheme=auto",
                               f"--ckpt_path={path}"])
    assert "layer4" in message and "'heun'" in message, message


def _lrs(root: Path) -> dict[int, float]:
    lrs = {}
    for metrics in sorted(root.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(metrics.open()):
            if row.get("train/lr"):
                lrs[int(row["step"])] = float(row["train/lr"])
    return lrs


def test_learning_rate_and_schedule_given_on_resume_are_applied_and_said(trained: Path, tmp_path: Path, caplog) -> None:
    import shutil

    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    with caplog.at_level(logging.INFO):
        main(["fit", *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=2", "--ckpt_path=last",
              "--model.lr=0.0005", "--model.scheduler=none"])
    lrs = _lrs(tmp_path)
    assert [lrs[s] for s in (3, 4, 5)] == [pytest.approx(0.0005)] * 3, lrs  # was: the checkpoint's cosine at 0.003
    assert "lr 0.003 -> 0.0005" in caplog.text and "scheduler 'cosine' -> 'none'" in caplog.text


def test_switching_the_optimizer_on_resume_starts_it_fresh_and_says_so(trained: Path, tmp_path: Path, caplog) -> None:
    import shutil

    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    with caplog.at_level(logging.INFO):  # was: KeyError: 'momentum' inside SGD's step
        main(["fit", *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=2", "--ckpt_path=last",
              "--model.optimizer=sgd", "--model.lr=0.01"])
    assert "model.optimizer changed from 'adamw' to 'sgd': the optimizer starts with fresh state" in caplog.text
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 6 and "momentum_buffer" in next(iter(state["optimizer_states"][0]["state"].values()))
