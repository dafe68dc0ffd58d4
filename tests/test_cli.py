"""The console entry point: help, --print_config, early errors naming the bad value, and diagnose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_resode.cli import main

QUICK = ["--config", "recipes/quickstart.yaml", "--logging.wandb=false", "--trainer.enable_progress_bar=false"]


def _exit_code(args: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(args)
    return int(info.value.code or 0)


def test_help_and_diagnose_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["fit", "--help"]) == 0
    assert "--model.scheme" in capsys.readouterr().out
    assert _exit_code(["diagnose", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--diagnose.batch_images" in out and "--model.stages" in out


def test_print_config_shows_a_complete_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["fit", *QUICK, "--print_config"]) == 0
    out = capsys.readouterr().out
    for key in ("model_name: resnet18", "scheme: auto", "DigitsDataModule", "fidelity:", "memory:", "CSVLogger"):
        assert key in out


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("--model.no_such_option=1", "no_such_option"),
        ("--trainer.max_epochs=many", "many"),
        ("--model.scheme=rk4", "rk4"),
    ],
)
def test_bad_options_fail_at_parse_time_naming_them(override: str, named: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["fit", *QUICK, override]) != 0
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "named"),
    [("--model.model_name=resnet181", "resnet181"), ("--model.stages=[layer9]", "layer9"), ("--model.freeze=[nope]", "nope")],
)
def test_bad_names_fail_before_training(override: str, named: str, tmp_path: Path) -> None:
    # a usage error: one line naming the value (no traceback), before anything trains
    with pytest.raises(SystemExit, match=rf"^lightning-resode: error: .*{named}"):
        main(["fit", *QUICK, f"--trainer.default_root_dir={tmp_path}", override])
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("images", ["1", "0", "-5"])
def test_diagnose_on_fewer_than_two_images_is_one_line(images: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["diagnose", *QUICK, "--model.model_name=resnet10t", f"--diagnose.batch_images={images}"])
    message = str(stop.value.code)
    assert f"--diagnose.batch_images={images}" in message and "at least 2" in message and "\n" not in message


def test_diagnose_prints_a_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "diag.json"
    main(["diagnose", *QUICK, "--model.model_name=resnet10t", "--diagnose.batch_images=4", f"--diagnose.output={output}"])
    assert "| layer1 |" in capsys.readouterr().out
    rows = json.loads(output.read_text())
    assert [r["stage"] for r in rows] == ["layer1", "layer2", "layer3", "layer4"]
    assert all(0.9 < r["grad_cosine"] <= 1.0 + 1e-6 for r in rows)
