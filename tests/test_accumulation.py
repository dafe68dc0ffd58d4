"""With gradient accumulation the sampling callbacks measure once per optimizer step, not once per micro-batch."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning_resode.cli import main


def test_callbacks_measure_once_per_optimizer_step_when_accumulating(tmp_path: Path) -> None:
    main([
        "fit", "--config", "recipes/quickstart.yaml", "--logging.wandb=false", "--trainer.enable_progress_bar=false",
        "--model.model_name=resnet10t", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=6", "--trainer.accumulate_grad_batches=3", "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0", "--data.init_args.batch_size=8", "--trainer.log_every_n_steps=1",
        "--memory.every_n_steps=1", "--fidelity.every_n_steps=1", "--reconstruction.every_n_steps=1",
    ])
    (metrics,) = tmp_path.glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    for column in ("mem/activations_mib", "adjoint/grad_cosine", "adjoint/recon_error"):
        steps = [int(r["step"]) for r in rows if r.get(column)]
        assert steps == [0, 1], f"{column} measured at steps {steps}; two optimizer steps were taken"
