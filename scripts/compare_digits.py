"""Evidence: the quickstart recipe trained with adjoint stages vs plain backprop, same seed, same data.

    .venv/bin/python scripts/compare_digits.py [--epochs 4] [--out runs/compare_digits]

Prints both runs' best validation accuracy, the gap in points, and saved activation MiB/image.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning_resode.cli import main as cli_main


def _run(scheme: str, root: Path, epochs: int) -> dict:
    cli_main(
        [
            "fit", "--config", "recipes/quickstart.yaml", f"--model.scheme={scheme}", f"--trainer.max_epochs={epochs}",
            f"--trainer.default_root_dir={root / scheme}", "--logging.wandb=false", "--trainer.enable_progress_bar=false",
        ]
    )
    (summary,) = (root / scheme).glob("csv/version_*/summary.json")
    return json.loads(summary.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/compare_digits"))
    args = parser.parse_args()
    results = {scheme: _run(scheme, args.out, args.epochs) for scheme in ("euler_fast", "backprop")}
    print("\n| gradient | best val acc | activations MiB/img (measured) |\n|---|---|---|")
    for scheme, summary in results.items():
        print(f"| {scheme} | {100 * summary['best_val_acc']:.2f} % | {summary['activations_mib_per_image']:.3f} |")
    gap = 100 * (results["euler_fast"]["best_val_acc"] - results["backprop"]["best_val_acc"])
    print(f"\nadjoint - backprop: {gap:+.2f} points ({'within' if abs(gap) <= 0.5 else 'OUTSIDE'} 0.5)")


if __name__ == "__main__":
    main()
