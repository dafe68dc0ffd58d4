"""What a CLI user sees: a fast top-level help, --print_config showing the loggers and callbacks that really run,
a quiet start, train/loss in the logs of a short run, and the W&B config stored once."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest
import yaml
from test_lit_callbacks import _key, finished_wandb_records

from lightning_resode._commands import COMMANDS
from lightning_resode.cli import _make_cli, main
from lightning_resode.lit import GradientFidelity, MemoryMonitor, ReconstructionMonitor

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--config", "recipes/quickstart.yaml", "--trainer.enable_progress_bar=false"]
HEAVY = ("torch", "lightning", "timm", "wandb", "matplotlib", "sklearn", "scipy")


def _run(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_SILENT", None)  # the user's view, W&B's own lines included
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", [["--help"], ["report", "--help"]], ids=["help", "report-help"])
def test_help_and_report_load_no_training_stack(command: list[str]) -> None:
    probe = (
        "import sys; from lightning_resode.__main__ import main\n"
        f"try:\n    main({command!r})\nexcept SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
        f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    result = _run(["-c", probe])
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout
    if command == ["--help"]:
        listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ") and line.split()}
        assert set(COMMANDS) <= listed
        from lightning.pytorch.cli import LightningCLI

        assert set(LightningCLI.subcommands()) <= set(COMMANDS)  # every subcommand the CLI runs is listed


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(import_module(module), name)


def _printed_config(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    with pytest.raises(SystemExit) as info:
        main(["fit", *args, "--print_config"])
    assert info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_shows_the_loggers_and_callbacks_that_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [*QUICK, f"--trainer.default_root_dir={tmp_path}", "--logging.wandb=true"]
    printed = _printed_config(args, capsys)
    cli = _make_cli(args, run=False)
    trainer = cli.trainer

    loggers = printed["trainer"]["logger"]
    assert [_class(spec["class_path"]) for spec in loggers] == [type(logger) for logger in trainer.loggers]
    for spec, logger in zip(loggers, trainer.loggers):
        assert Path(spec["init_args"]["save_dir"]) == Path(logger.save_dir) == tmp_path
    assert "logging" not in printed  # it built trainer.logger; shown as what it built

    listed = {_class(spec["class_path"]) for spec in printed["trainer"]["callbacks"]}
    running = {type(c) for c in trainer.callbacks}
    sections = {type(cli.config_init[key]) for key in cli.parser.callback_keys}  # memory, fidelity, checkpoint…
    assert {MemoryMonitor, GradientFidelity, ReconstructionMonitor} <= sections
    assert listed <= running and sections <= running
    lightning_own = {t for t in running if t.__module__.startswith("lightning.pytorch.callbacks.") or t.__name__ == "_SaveConfigToLoggers"}
    assert running - listed - sections <= lightning_own, running - listed - sections
    assert {t.__name__ for t in listed} >= {"FitSummary", "InterruptCheckpoint"}


def test_a_short_run_from_a_printed_config_logs_everything_once_and_quietly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "run"
    printed = _printed_config(
        [*QUICK, f"--trainer.default_root_dir={root}", "--logging.wandb=true", "--model.model_name=resnet10t"], capsys
    )
    config = tmp_path / "printed.yaml"
    config.write_text(yaml.safe_dump(printed))
    result = _run(
        ["-m", "lightning_resode", "fit", "--config", str(config), "--trainer.max_steps=5", "--trainer.limit_val_batches=1",
         "--memory.every_n_steps=100", "--fidelity.every_n_steps=100", "--reconstruction.every_n_steps=100"]
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    for noise in ("Seed set to", "litlogger", "anonymous setting", "LeafSpec"):
        assert noise not in output, noise
    assert output.count("fit summary") == 1  # FitSummary is listed in the printed config and not added again

    (metrics,) = root.glob("csv/version_*/metrics.csv")
    losses = [row["train/loss"] for row in csv.DictReader(metrics.open()) if row.get("train/loss")]
    assert len(losses) == 5  # 5 steps, 5 rows: not hidden by Lightning's default log_every_n_steps of 50

    assert len(list(root.glob("wandb/offline-run-*"))) == 1  # one W&B run: the printed logger list, once
    records = finished_wandb_records(root)
    updates = [u for r in records if r.WhichOneof("record_type") == "config" for u in r.config.update]
    keys = {_key(u) for u in updates}
    assert {"trainer", "model", "data", "fidelity"} <= keys
    assert not keys & {"model_name", "scheme", "lr", "num_classes"}, keys  # not stored flat as well
    model = json.loads(next(u.value_json for u in reversed(updates) if _key(u) == "model"))
    assert model["model_name"] == "resnet10t" and model["num_classes"] == 10  # linked from the data
