"""scripts/bench_transfer.py: fine-tuning trained fixtures on new classes with each way of computing gradients."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("bench_transfer")


def _check_outputs(result: dict, out: Path) -> None:
    assert json.loads((out / "bench_transfer.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "bench_transfer.png").read_bytes()[:8] == PNG_MAGIC


def _check_run(bench, result: dict, steps: int, eval_every: int) -> None:
    exact = {"backprop", "checkpoint", "block"}
    for key, entry in result["runs"].items():
        methods = entry["methods"]
        assert list(methods) == bench.methods_available(), key
        assert "heun" not in methods
        starts = {run["accuracy"][0] for run in methods.values()}
        assert len(starts) == 1, f"{key}: runs must start from the same weights and head, got {starts}"
        for method, run in methods.items():
            assert run["steps"] == list(range(0, steps + 1, eval_every)), (key, method)
            assert all(0.0 <= a <= 1.0 for a in run["accuracy"])
            if method in exact:
                assert run["failed_steps"] == 0 and run["first_step_grad_cosine"] == pytest.approx(1.0, abs=1e-6), (key, method, run)


@pytest.mark.slow  # make test-slow: a benchmark script end to end (22 s)
def test_transfer_runs_every_method_from_the_same_start(trained_small, bench, tmp_path) -> None:
    trained_small("resnet50", False)  # train (or load) through the session fixture first
    result = bench.main(["--quick", "--models", "resnet50", "--inits", "nozil", "--steps", "4", "--eval-every", "2", "--out", str(tmp_path)])
    _check_outputs(result, tmp_path)
    _check_run(bench, result, steps=4, eval_every=2)
    assert result["config"]["size"] == "small"

    first = result["runs"]["resnet50 nozil"]["methods"]
    again = bench.main(["--quick", "--models", "resnet50", "--inits", "nozil", "--steps", "4", "--eval-every", "2", "--methods", "backprop", "--merge", "--out", str(tmp_path)])
    assert list(again["runs"]["resnet50 nozil"]["methods"]) == list(first)  # the other methods were kept
    assert again["runs"]["resnet50 nozil"]["methods"]["backprop"]["accuracy"] == first["backprop"]["accuracy"]  # deterministic


def test_unknown_method_is_refused(bench, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--methods", "heun", "--out", str(tmp_path)])
    assert "unknown method(s) ['heun']" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(2400)  # every method on four fixtures: ~10 minutes on 2 idle cores, more when shared
def test_quick_preset_end_to_end(bench, tmp_path) -> None:
    result = bench.main(["--quick", "--out", str(tmp_path)])
    _check_outputs(result, tmp_path)
    preset = bench.PRESETS["quick"]
    _check_run(bench, result, steps=preset["steps"], eval_every=preset["eval_every"])
    assert set(result["runs"]) == {"resnet50 zil", "resnet50 nozil", "resnet101 zil", "resnet101 nozil"}
