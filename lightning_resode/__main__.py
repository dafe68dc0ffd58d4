"""``lightning-resode`` (the console script) and ``python -m lightning_resode``.

The top-level help and ``report`` are answered without importing torch, Lightning or W&B (they take seconds
to load); the training commands load them from ``lightning_resode.cli`` when they run.
"""

from __future__ import annotations

import sys

from ._commands import REPORT, check_command, report


def main(args: list[str] | None = None) -> None:
    """Console-script entry point: every command of ``lightning_resode._commands.COMMANDS``."""
    argv = sys.argv[1:] if args is None else list(args)
    check_command(argv)
    if argv[0] == REPORT:
        report(argv[1:])
        return
    from .cli import main as run_command

    run_command(args)


if __name__ == "__main__":
    main()
