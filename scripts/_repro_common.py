"""Plumbing shared by the paper reproductions (scripts/repro_*.py): presets, output files, slope fits.

Every reproduction has three sizes: ``smoke`` (seconds; what tests/test_repro.py runs), ``quick`` (at most
two minutes on a 2-core CPU) and ``full`` (the default; what produced the figures in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in tests

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PRESETS: tuple[str, ...] = ("smoke", "quick", "full")
DEFAULT_OUT = Path("docs/figures")


def parse_cli(argv: Sequence[str] | None, description: str) -> tuple[str, Path]:
    """``--quick`` / ``--smoke`` (default: full) and ``--out`` folder; returns (preset, out)."""
    parser = argparse.ArgumentParser(description=description)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="at most ~2 minutes on a 2-core CPU")
    size.add_argument("--smoke", action="store_true", help="seconds; the setting the tests run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder for JSON + PNG (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    return preset, args.out


def fitted_slope(depths: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) against log(depth): -1 means the value shrinks like 1/N."""
    if len(depths) != len(values) or len(depths) < 2:
        raise ValueError(f"need at least two (depth, value) pairs of equal length, got {len(depths)} and {len(values)}")
    if not all(v > 0 and math.isfinite(v) for v in values):
        raise ValueError(f"slopes need positive finite values, got {list(values)}")
    return float(np.polyfit(np.log(depths), np.log(values), 1)[0])


def write_outputs(result: dict[str, Any], figure: plt.Figure, out: Path, name: str) -> dict[str, Path]:
    """Write ``<out>/<name>.json`` and ``<out>/<name>.png``; the figure is closed afterwards."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    json_path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)
    plt.close(figure)
    return {"json": json_path, "png": png_path}


def log_log_axes(ax: plt.Axes, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)


def run_reproduction(
    argv: Sequence[str] | None,
    doc: str,
    configs: Mapping[str, Any],
    run: Callable[[Any], dict[str, Any]],
    plot: Callable[[dict[str, Any]], plt.Figure],
    name: str,
    headline: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """What every reproduction's ``main`` does: parse the preset, run it, write JSON + PNG, print the headline."""
    preset, out = parse_cli(argv, doc.splitlines()[0])
    result = run(configs[preset])
    paths = write_outputs(result, plot(result), out, name)
    print(headline(result), "->", paths["png"])
    return result


def slopes_headline(result: dict[str, Any], key: str = "slope", label: str = "fitted slopes:") -> str:
    return f"{label} {({k: round(v, 2) for k, v in result[key].items()})}"
