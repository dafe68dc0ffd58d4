"""A run's report from its CSV logs: PNG plots and one self-contained ``report.html``.

Everything a run logged is in plain files under its root (Lightning's ``CSVLogger`` writes
``csv/version_N/metrics.csv`` for each command, ``FitSummary`` writes ``summary.json`` next to fit's), so it works
offline and without a W&B account. It reads no Lightning state and imports no Lightning code.

    lightning-resode report runs/quickstart            # -> runs/quickstart/report/report.html
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunLogs", "find_run_logs", "read_metrics", "write_report"]

_REPORT_DIR = "report"
_POLICY_PREFIXES = ("policy/", "adjoint/fallback/")
_POLICY_FILE_PATTERNS = ("policy*.json", "policy*.jsonl", "*decisions*.json", "*decisions*.jsonl")

Series = dict[str, list[tuple[int, float]]]


@dataclass
class RunLogs:
    """The files one run directory holds.

    ``training``: the ``fit`` logs, oldest first (a resumed fit continues in a new ``version_N`` folder);
    ``evaluations``: logs of ``validate``/``test`` runs, whose final metrics join the table.
    """

    training: list[Path]
    evaluations: list[Path] = field(default_factory=list)
    summary: Path | None = None
    policy_files: list[Path] = field(default_factory=list)


def _header(path: Path) -> list[str]:
    with open(path, newline="") as handle:
        return next(csv.reader(handle), [])


def find_run_logs(run_dir: str | Path) -> RunLogs:
    """Every ``metrics.csv`` under ``run_dir`` (a run root or one ``csv/version_N`` folder), sorted into the
    training logs (they have ``train/`` metrics) and the evaluation logs, oldest first."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {str(root)!r} does not exist")
    found = [p for p in root.rglob("metrics.csv") if _REPORT_DIR not in p.relative_to(root).parts[:-1]]
    if not found:
        raise FileNotFoundError(
            f"no metrics.csv under {str(root)!r}: a lightning-resode run writes <root>/csv/version_N/metrics.csv "
            "(the CSV logger is always on); pass the run's trainer.default_root_dir or one of its version folders"
        )
    found.sort(key=lambda p: (p.stat().st_mtime, str(p)))
    training = [p for p in found if any(name.startswith("train/") for name in _header(p))]
    evaluations = [p for p in found if p not in training]
    if not training:  # only evaluation runs: report those
        training, evaluations = evaluations, []
    summaries = [p.parent / "summary.json" for p in training if (p.parent / "summary.json").is_file()]
    if not summaries:
        summaries = sorted(root.rglob("summary.json"), key=lambda p: p.stat().st_mtime)
    folders = {root} | {p.parent for p in training}
    policy_files = sorted({p for pattern in _POLICY_FILE_PATTERNS for folder in folders for p in folder.glob(pattern)})
    return RunLogs(training, evaluations, summaries[-1] if summaries else None, policy_files)


def _read_csv(path: Path) -> Series:
    series: Series = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                step = int(float(row.get("step") or ""))
            except ValueError:
                continue
            for name, text in row.items():
                if name in ("step", "epoch") or name is None or text in ("", None):
                    continue
                try:
                    series.setdefault(name, []).append((step, float(text)))
                except ValueError:
                    continue
    return series


def read_metrics(paths: str | Path | list[Path]) -> Series:
    """``{metric: [(step, value), …]}`` from ``CSVLogger`` files, oldest first (blank cells: not logged there).

    A later file continues the earlier ones from its first step on: a resumed fit replaces what the
    interrupted one logged after the checkpoint, and a fresh fit in the same directory (step 0) replaces all.
    """
    merged: Series = {}
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        series = _read_csv(Path(path))
        steps = [step for points in series.values() for step, _ in points]
        if not steps:
            continue
        first = min(steps)
        merged = {name: [(s, v) for s, v in points if s < first] for name, points in merged.items()}
        for name, points in series.items():
            merged.setdefault(name, []).extend(points)
    return {name: points for name, points in merged.items() if points}


def _evaluation_metrics(logs: RunLogs, root: Path) -> Series:
    """Final figures of ``validate``/``test`` runs, named after their folder when fit logged the same name."""
    series: Series = {}
    for path in logs.evaluations:
        for name, points in _read_csv(path).items():
            series[name if name.startswith("test/") else f"{name} ({_shown(path.parent, root)})"] = points
    return series


# ---------------------------------------------------------------------------------------------- plots
def _figure(panels: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure  # the object API renders with Agg and touches no global backend

    fig = Figure(figsize=(6.4 * panels, 4.0), layout="constrained")
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    return fig, axes


def _plot_lines(ax: Any, series: Series, names: list[str], transform: Any = None) -> None:
    for name in names:
        steps, values = zip(*series[name])
        if transform is not None:
            values = tuple(transform(v) for v in values)
        baseline = "backprop" in name
        aggregate = any(other.startswith(name + "/") for other in names)  # adjoint/grad_cosine over its stages
        ax.plot(
            steps,
            values,
            linestyle="--" if baseline else "-",
            marker="o" if len(steps) <= 30 else None,
            markersize=3,
            **({"color": "black", "linewidth": 2.0} if aggregate else {}),
            label=name + (" (baseline)" if baseline else " (all stages)" if aggregate else ""),
        )
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _names(series: Series, predicate: Any) -> list[str]:
    return sorted(name for name in series if predicate(name))


def _accuracy(series: Series) -> Any | None:
    names = _names(series, lambda n: n.rsplit("/", 1)[-1].startswith("acc"))
    if not names:
        return None
    fig, (ax,) = _figure()
    _plot_lines(ax, series, names, transform=lambda v: 100.0 * v)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy")
    return fig


def _loss(series: Series) -> Any | None:
    names = _names(series, lambda n: n.rsplit("/", 1)[-1] == "loss")
    if not names:
        return None
    fig, (ax,) = _figure()
    _plot_lines(ax, series, names)
    ax.set_ylabel("cross-entropy")
    ax.set_title("loss")
    return fig


def _memory(series: Series, summary: dict[str, Any]) -> Any | None:
    activations = _names(series, lambda n: n.startswith("mem/") and "activation" in n)
    other = _names(series, lambda n: n.startswith("mem/") and n not in activations)
    ours = summary.get("activations_mib_per_image")
    backprop = summary.get("backprop_activations_mib_per_image")
    bars = isinstance(ours, (int, float)) and isinstance(backprop, (int, float))
    panels = [p for p in ("bars" if bars else None, "activations" if activations else None, "other" if other else None) if p]
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, panel in zip(axes, panels):
        if panel == "bars":
            ax.bar(["lightning-resode", "backprop"], [ours, backprop], color=["tab:blue", "tab:gray"])
            for x, value in enumerate((ours, backprop)):
                ax.annotate(f"{value:.2f}", (x, value), ha="center", va="bottom")
            ax.set_ylabel("saved activations (MiB / image)")
            ax.set_title(f"activations kept for backward: {backprop / ours:.1f}× less" if ours else "activations")
        elif panel == "activations":
            _plot_lines(ax, series, activations)
            ax.set_ylim(bottom=0)
            ax.set_ylabel("MiB / image")
            ax.set_title("saved activations (dashed: plain backprop)")
        else:
            _plot_lines(ax, series, other)
            ax.set_ylim(bottom=0)
            ax.set_ylabel("MiB")
            ax.set_title("peak memory" + ("" if any("backprop" in n for n in other) else " (no backprop peak logged)"))
    return fig


def _fidelity(series: Series) -> Any | None:
    cosines = _names(series, lambda n: n.startswith("adjoint/grad_cosine"))
    errors = _names(series, lambda n: n.startswith("adjoint/recon_error"))
    panels = [names for names in (cosines, errors) if names]
    if not panels:
        return None
    fig, axes = _figure(len(panels))
    for ax, names in zip(axes, panels):
        if names is cosines:
            # cosines sit at 0.9999…: 1 - cosine on a log axis shows how far each stage is from exact
            _plot_lines(ax, series, names, transform=lambda v: max(1.0 - v, 1e-16))
            ax.set_ylabel("1 − gradient cosine vs exact backprop")
            ax.set_title("gradient fidelity per stage (lower is better)")
        else:
            _plot_lines(ax, series, names, transform=lambda v: max(v, 1e-16))
            ax.set_ylabel("relative reconstruction error")
            ax.set_title("reconstruction error per stage")
        ax.set_yscale("log")
    return fig


def _policy(series: Series) -> Any | None:
    names = _names(series, lambda n: n.startswith(_POLICY_PREFIXES))
    if not names:
        return None
    fig, (ax,) = _figure()
    for name in names:
        steps, values = zip(*series[name])
        ax.step(steps, values, where="post", marker="o", markersize=3, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("logged value")
    ax.set_title("stage policy decisions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


_PLOTS: tuple[tuple[str, str, Any], ...] = (
    ("accuracy", "Accuracy over training (validation at each epoch end).", _accuracy),
    ("loss", "Training loss per logged step and validation loss per epoch.", _loss),
    ("memory", "Activation memory per image next to what plain backprop stores, and peak memory.", _memory),
    ("fidelity", "Per-stage gradient cosine against exact backprop and reconstruction error.", _fidelity),
    ("policy", "The stage policy's decisions as logged (fallbacks to exact gradients, scheme choices).", _policy),
)


# ---------------------------------------------------------------------------------------------- html
def _load_json(path: Path) -> Any:
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    return "—" if value is None else str(value)


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _records_table(data: Any) -> str:
    """A decisions file as a table: a list of records, a dict of records, or plain key/values."""
    if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()) and data:
        data = [{"name": k, **v} for k, v in data.items()]
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        header = list(dict.fromkeys(k for r in data for k in r))
        return _table([[r.get(k) for k in header] for r in data], header)
    if isinstance(data, dict):
        return _table([[k, v] for k, v in data.items()], ["key", "value"])
    return f"<pre>{html.escape(json.dumps(data, indent=2))}</pre>"


_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}figure{margin:1em 0 2em}
figcaption{color:#555}code{background:#f5f5f5;padding:0 3px}
"""


def _shown(path: Path, root: Path) -> str:
    """A path relative to the run directory, so the page says the same wherever the run is moved."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _html(title: str, root: Path, logs: RunLogs, summary: dict[str, Any], series: Series, figures: list[tuple[str, str, Path]]) -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"]
    parts.append(f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>")
    sources = logs.training + logs.evaluations + ([logs.summary] if logs.summary else []) + logs.policy_files
    parts.append("<p>Read from " + ", ".join(f"<code>{html.escape(_shown(p, root))}</code>" for p in sources) + ".</p>")
    if summary:
        parts.append("<h2>Summary</h2>" + _table([[k, v] for k, v in summary.items()], ["figure", "value"]))
    for name, caption, path in figures:
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(
            f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{encoded}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    for path in logs.policy_files:
        try:
            parts.append(f"<h2>Policy decisions: {html.escape(path.name)}</h2>" + _records_table(_load_json(path)))
        except (OSError, ValueError) as err:
            parts.append(f"<p>could not read {html.escape(_shown(path, root))}: {html.escape(str(err))}</p>")
    rows = []
    for name in sorted(series):
        values = [v for _, v in series[name]]
        rows.append([name, len(values), values[-1], min(values), max(values), series[name][-1][0]])
    parts.append("<h2>Logged metrics</h2>" + _table(rows, ["metric", "points", "last", "min", "max", "last step"]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Render ``<name>.png`` plots and ``report.html`` (images embedded) into ``output`` (default ``run_dir/report``).

    Plots whose metrics the run did not log (no fidelity callback, no policy) are left out, not drawn empty.
    Returns the path of ``report.html``.
    """
    logs = find_run_logs(run_dir)
    series = read_metrics(logs.training)
    if not series:
        names = [str(p) for p in logs.training]
        raise ValueError(f"{names} hold no metric values yet (did the run log at least one step?)")
    summary: dict[str, Any] = {}
    if logs.summary is not None:
        try:
            summary = json.loads(logs.summary.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read the run summary {str(logs.summary)!r}: {err}") from err
    out = Path(output) if output is not None else Path(run_dir) / _REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str, Path]] = []
    for name, caption, plot in _PLOTS:
        fig = plot(series, summary) if plot is _memory else plot(series)
        if fig is None:
            continue
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        figures.append((name, caption, path))
    report = out / "report.html"
    title = f"lightning-resode run: {Path(run_dir).resolve().name}"
    table = {**series, **_evaluation_metrics(logs, Path(run_dir))}
    report.write_text(_html(title, Path(run_dir), logs, summary, table, figures))
    return report
