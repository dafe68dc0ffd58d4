"""The report reads CSV logs as Lightning writes them: resumed fits, evaluation runs, absent metrics, policy files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lightning_resode.report import find_run_logs, read_metrics, write_report


def _log(folder: Path, columns: list[str], rows: list[dict[str, float]]) -> Path:
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["epoch", "step", *columns])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "metrics.csv"


def test_a_resumed_fit_continues_and_a_fresh_fit_replaces(tmp_path: Path) -> None:
    first = _log(tmp_path / "csv" / "version_0", ["train/loss"], [{"epoch": 0, "step": s, "train/loss": 10 - s} for s in range(6)])
    resumed = _log(tmp_path / "csv" / "version_1", ["train/loss"], [{"epoch": 0, "step": s, "train/loss": 20 + s} for s in (4, 5, 6)])
    assert read_metrics([first, resumed])["train/loss"] == [(0, 10), (1, 9), (2, 8), (3, 7), (4, 24), (5, 25), (6, 26)]
    fresh = _log(tmp_path / "csv" / "version_2", ["train/loss"], [{"epoch": 0, "step": 0, "train/loss": 1.0}])
    assert read_metrics([first, resumed, fresh])["train/loss"] == [(0, 1.0)]


def test_only_what_was_logged_is_plotted_and_policy_decisions_are_shown(tmp_path: Path) -> None:
    rows = [{"epoch": 0, "step": s, "train/loss": 1.0 / (s + 1), "policy/tier/layer3": float(s > 2)} for s in range(5)]
    _log(tmp_path / "csv" / "version_0", ["train/loss", "policy/tier/layer3"], rows)
    decisions = [{"step": 0, "stage": "layer3", "tier": "adjoint", "cosine": 0.999}, {"step": 3, "stage": "layer3", "tier": "checkpoint"}]
    (tmp_path / "csv" / "version_0" / "policy.json").write_text(json.dumps(decisions))
    report = write_report(tmp_path, tmp_path / "out")
    assert sorted(p.name for p in report.parent.glob("*.png")) == ["loss.png", "policy.png"]
    page = report.read_text()
    assert "Policy decisions: policy.json" in page and "checkpoint" in page and "policy/tier/layer3" in page
    assert page.count("data:image/png;base64,") == 2


def test_missing_or_empty_logs_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_run_logs(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no metrics.csv"):
        find_run_logs(tmp_path)
    _log(tmp_path / "csv" / "version_0", ["train/loss"], [])
    with pytest.raises(ValueError, match="no metric values"):
        write_report(tmp_path)
