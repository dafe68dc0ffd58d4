"""scripts/bench_dense.py: its dry run measures every variant, and the adjoint's peak is below backprop's."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return importlib.import_module("bench_dense")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One thread: on a shared 2-core machine two threads wait on each other at every op (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_dry_run_table_and_json_have_every_variant(bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None) -> None:
    out = tmp_path / "dense.json"
    rows = bench.main(["--dry-run", "--json", str(out)])
    table = capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["rows"] == json.loads(json.dumps(rows)) and written["setup"]["dry_run"] is True
    assert [r["variant"] for r in rows] == list(bench.VARIANTS) and {r["size"] for r in rows} == {64}
    for row in rows:
        assert f"| 64² | {row['variant']} | 2, 4 | **{row['peak_mib_per_image']:.1f}** |" in table
        for key in ("peak_mib_per_image", "rest_mib_per_image", "slope_mib_per_image", "head_saved_mib_per_image", "stem_saved_mib_per_image"):
            assert row[key] > 0, (row["variant"], key)
        assert row["grad_cosine"] > 0.99, row
    by = {r["variant"]: r for r in rows}
    backprop = by["backprop"]["peak_mib_per_image"]
    for ours in ("default (auto)", "block_fp16"):
        assert by[ours]["peak_mib_per_image"] < backprop, by[ours]
        assert len(by[ours]["stages"].split(",")) == 4  # the four stages of the features_only backbone converted
    assert by["block_fp16"]["stages"] == ",".join(["block_fp16"] * 4)
    # timm's checkpointing of the FeatureListNet does checkpoint: less is kept at rest than by backprop
    assert by["timm checkpointing"]["rest_mib_per_image"] < backprop
