"""The light part of the command line: the command list, the top-level help and ``report``.

None of it imports torch, Lightning or W&B (seconds to load), so ``lightning-resode --help`` answers at once and
``report`` loads only what it draws with; the training commands live in ``lightning_resode.cli``.
"""

from __future__ import annotations

import argparse

PROG = "lightning-resode"
DESCRIPTION = "lightning-resode: fine-tune timm ResNets with memory-free stages (fit, validate, test, predict, diagnose, report)."
DIAGNOSE = "diagnose"
REPORT = "report"
# every command, in the order `lightning-resode --help` lists them; the first four are LightningCLI's
COMMANDS: dict[str, str] = {
    "fit": "train and validate a model from a recipe (checkpoints, CSV and W&B logs, summary.json)",
    "validate": "evaluate the validation split",
    "test": "evaluate the test split (the validation split, with a warning, when the data has none)",
    "predict": "write the top-k classes of every image to predictions.csv in the run directory",
    DIAGNOSE: "per-stage reconstruction error, gradient fidelity and saved memory on one real batch",
    REPORT: "plots and a self-contained report.html from a run's CSV logs",
}


def usage() -> argparse.ArgumentParser:
    """The top-level help: every command, including the two that are not LightningCLI subcommands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=f"Run `{PROG} COMMAND --help` for a command's options, e.g. `{PROG} fit --help`.",
    )
    commands = parser.add_subparsers(title="commands", metavar="{" + ",".join(COMMANDS) + "}")
    for name, text in COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def check_command(argv: list[str]) -> None:
    """The top-level help (exit 0; exit 2 without any argument), or an early error for an unknown command."""
    if not argv or argv[0] in ("-h", "--help"):
        usage().print_help()
        raise SystemExit(0 if argv else 2)
    if not argv[0].startswith("-") and argv[0] not in COMMANDS:
        usage().error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")


def report(args: list[str]) -> None:
    """Render a run's logged metrics as PNG plots and one self-contained report.html."""
    from .report import write_report

    parser = argparse.ArgumentParser(prog=f"{PROG} {REPORT}", description=report.__doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's trainer.default_root_dir (e.g. runs/quickstart) or one csv/version_N folder")
    parser.add_argument("--output", metavar="DIR", default=None, help="where to write the plots and report.html (default: RUN_DIR/report)")
    options = parser.parse_args(args)
    try:
        written = write_report(options.run_dir, options.output)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"{PROG} {REPORT}: error: {err}") from None
    print(f"wrote {written} (plots next to it)")
