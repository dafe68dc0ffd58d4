"""scripts/memory_breakdown.py: what is kept at rest adds up per stage, and re-runs keep less than every input."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))


@pytest.fixture(scope="module")
def breakdown():
    return importlib.import_module("memory_breakdown")


def test_a_deep_stage_keeps_less_with_reruns_and_the_rows_add_up(breakdown, tmp_path: Path) -> None:
    # resnet101's layer3 has 22 residual steps: re-run in four runs by default
    common = ["--model", "resnet101", "--size", "64", "--batch", "2"]
    every = breakdown.main([*common, "--store-every", "none", "--json", str(tmp_path / "every.json")])
    reruns = breakdown.main(common)
    for report in (every, reruns):
        rows = report["at_rest_mib_per_image"]
        assert report["at_rest_total_mib_per_image"] == pytest.approx(sum(rows.values()))
        assert set(report["backward_working_set_mib_per_image"]) == {"stem", "layer1", "layer2", "layer3", "layer4"}
    layer3 = "layer3 / StageStep"
    # 22 float16 inputs against the kept inputs of steps 7, 14, 21 (float32) and no others
    assert reruns["at_rest_mib_per_image"][layer3] < 0.5 * every["at_rest_mib_per_image"][layer3]
    assert reruns["at_rest_total_mib_per_image"] < every["at_rest_total_mib_per_image"]
    assert (tmp_path / "every.json").exists()
