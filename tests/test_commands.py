"""Every command of the console script run for real on one tiny fit: predict, test, diagnose, report, help.

One real ``fit`` (a narrow resnet18, a few steps on the bundled digits) is shared by the tests of this file;
each test then runs its command on that run directory exactly as a user would.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from lightning_resode.cli import _COMMANDS, main

NARROW = "--model.model_kwargs={channels: [8, 16, 32, 64], stem_width: 8}"
QUICK = ["--config", "recipes/quickstart.yaml", "--logging.wandb=false", "--trainer.enable_progress_bar=false", NARROW]
STEPS = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
    "--memory.every_n_steps=1",
    "--fidelity.every_n_steps=1",
    "--reconstruction.every_n_steps=1",
]


def _exit(args: list[str]) -> SystemExit:
    with pytest.raises(SystemExit) as info:
        main(args)
    return info.value


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    main(["fit", *QUICK, *STEPS, f"--trainer.default_root_dir={root}"])
    assert (root / "checkpoints" / "last.ckpt").is_file()
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------- help
def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit(["--help"]).code == 0
    out = capsys.readouterr().out
    assert "{fit,validate,test,predict,diagnose,report}" in out.splitlines()[0]
    for name, text in _COMMANDS.items():
        assert re.search(rf"^\s+{name}\s", out, flags=re.M), name
        assert text.split()[0] in out
    assert _exit(["fitt"]).code == 2
    assert "unknown command 'fitt'" in capsys.readouterr().err


def test_diagnose_help_is_short_and_names_what_matters(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit(["diagnose", "--help"]).code == 0
    out = capsys.readouterr().out
    for option in ("--config", "--ckpt_path", "--model.stages", "--model.scheme", "--data", "--diagnose.batch_images"):
        assert option in out, option
    for hidden in ("--trainer.max_epochs", "--checkpoint.monitor", "--memory.every_n_steps", "--logging.wandb"):
        assert hidden not in out, hidden
    assert len(out.splitlines()) < 250  # the full fit --help is several times longer
    assert _exit(["fit", "--help"]).code == 0
    assert len(capsys.readouterr().out.splitlines()) > 3 * len(out.splitlines())


# ---------------------------------------------------------------------------------------------- commands
def test_predict_writes_topk_with_class_names(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # pretrained=true with a checkpoint: its weights, no hub needed
    main(["predict", *QUICK, f"--trainer.default_root_dir={run_dir}", "--ckpt_path=last", "--prediction.top_k=3",
          "--trainer.limit_predict_batches=2", "--model.pretrained=true"])
    rows = _rows(run_dir / "predictions.csv")
    assert len(rows) == 2 * 64  # the digits predict their validation split, 64 per batch
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    assert list(rows[0])[:3] == ["index", "target", "target_name"] and "top3_prob" in rows[0] and "top4_prob" not in rows[0]
    for row in rows:
        probs = [float(row[f"top{k}_prob"]) for k in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-5
        assert row["top1_name"] == row["top1_class"] and row["target_name"] == row["target"]  # digit names
    assert not list(run_dir.glob("predictions.rank*"))  # the per-rank part was merged and removed


def test_test_falls_back_to_the_validation_split_and_says_so(run_dir: Path) -> None:
    with pytest.warns(UserWarning, match="DigitsDataModule has no test split: `test` evaluates the validation split"):
        main(["test", *QUICK, f"--trainer.default_root_dir={run_dir}", "--ckpt_path=last", "--trainer.limit_test_batches=1"])


def test_diagnose_a_trained_checkpoint(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "diag.json"
    args = ["diagnose", *QUICK, f"--trainer.default_root_dir={run_dir}", "--diagnose.batch_images=4", f"--diagnose.output={output}"]
    main([*args, "--ckpt_path=last"])
    out = capsys.readouterr().out
    assert "diagnosing the weights of" in out and "last.ckpt" in out and "| layer4 |" in out
    trained = json.loads(output.read_text())
    main(args)  # the recipe's initial weights: zero-initialised residual branches reconstruct exactly
    initial = json.loads(output.read_text())
    assert [r["stage"] for r in trained] == ["layer1", "layer2", "layer3", "layer4"]
    assert trained != initial  # the checkpoint's weights were diagnosed, not the recipe's initial ones
    missing = _exit([*args, f"--ckpt_path={tmp_path / 'nope.ckpt'}"])
    assert "nope.ckpt" in str(missing.code) and "does not exist" in str(missing.code)


def test_report_renders_the_runs_metrics(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.warns(UserWarning, match="no test split"):  # a later `test` run logs into its own folder
        main(["test", *QUICK, f"--trainer.default_root_dir={run_dir}", "--ckpt_path=last", "--trainer.limit_test_batches=1"])
    main(["report", str(run_dir)])
    report = run_dir / "report" / "report.html"
    assert str(report) in capsys.readouterr().out
    pictures = sorted(p.name for p in report.parent.glob("*.png"))
    # the quickstart's scheme is auto: its decisions are logged and plotted
    assert pictures == ["accuracy.png", "fidelity.png", "loss.png", "memory.png", "policy.png"]
    page = report.read_text()
    assert page.count("data:image/png;base64,") == len(pictures) and "<img" in page
    for metric in ("val/acc", "train/loss", "mem/activations_backprop_mib", "adjoint/grad_cosine/layer1", "best_val_acc", "test/acc"):
        assert metric in page, metric
    elsewhere = run_dir / "elsewhere"
    main(["report", str(run_dir), "--output", str(elsewhere)])
    assert (elsewhere / "report.html").is_file()
    assert "no metrics.csv" in str(_exit(["report", str(run_dir / "checkpoints")]).code)


def test_pretrained_offline_fails_fast_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_resode.pretrained import _cached_on_disk

    if _cached_on_disk("resnet50"):
        pytest.skip("resnet50 weights are in the local cache; the offline path would load them")
    args = ["fit", *QUICK, f"--trainer.default_root_dir={tmp_path}", "--model.pretrained=true", "--model.model_name=resnet50"]
    for offline in ("HF_HUB_OFFLINE", "HF_ENDPOINT"):
        if offline == "HF_HUB_OFFLINE":
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        else:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
            monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
        message = str(_exit(args).code)
        assert "--model.weights_file=" in message and "resnet50" in message
        assert len(message.splitlines()) <= 3
    assert not (tmp_path / "checkpoints").exists()


def test_a_weights_file_replaces_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_resode.lit import ResodeClassifier

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = ResodeClassifier(model_name="resnet18", num_classes=4, stages=[], model_kwargs={"channels": [8, 16, 32, 64], "stem_width": 8})
    path = tmp_path / "weights.pth"
    torch.save(source.model.state_dict(), path)
    model = ResodeClassifier(
        model_name="resnet18", pretrained=True, weights_file=str(path), num_classes=4, stages=[],
        model_kwargs={"channels": [8, 16, 32, 64], "stem_width": 8},
    )
    assert torch.equal(model.model.conv1.weight, source.model.conv1.weight)
