"""Resuming: ``--ckpt_path last`` continues exactly; SIGTERM / SIGINT mid-epoch leaves a checkpoint that resumes."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_resode.cli import main

BASE = [
    "--config", "recipes/quickstart.yaml", "--logging.wandb=false", "--trainer.enable_progress_bar=false",
    "--model.model_name=resnet10t", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1", "--memory.every_n_steps=2", "--fidelity.every_n_steps=2",
]


def _losses(root: Path) -> dict[int, float]:
    losses = {}
    for metrics in sorted(root.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(metrics.open()):
            if row.get("train/loss"):
                losses[int(row["step"])] = float(row["train/loss"])
    return losses


@pytest.mark.slow  # three CLI runs (~70 s on the shared 2-core CPU)
def test_ckpt_path_last_continues_exactly(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(["fit", *BASE, f"--trainer.default_root_dir={straight}", "--trainer.max_epochs=2"])
    main(["fit", *BASE, f"--trainer.default_root_dir={resumed}", "--trainer.max_epochs=2", "--trainer.max_steps=3"])
    main(["fit", *BASE, f"--trainer.default_root_dir={resumed}", "--trainer.max_epochs=2", "--ckpt_path=last"])
    expected, got = _losses(straight), _losses(resumed)
    assert len(expected) == 6
    assert got == expected


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["SIGTERM", "SIGINT"]
)
def test_signal_mid_epoch_leaves_a_resumable_checkpoint(signum: int, tmp_path: Path) -> None:
    args = [
        "fit", *BASE, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=400", "--trainer.num_sanity_val_steps=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lightning_resode", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("csv/version_*/config.yaml")):  # written in setup, just before the first batch
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    time.sleep(6.0)  # a few dozen steps in, well before the 400th
    process.send_signal(signum)
    process.wait(timeout=120)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file(), process.stderr.read().decode()[-2000:]
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < step < 400, "the signal must land mid-epoch"
    main([*args, "--ckpt_path=last", f"--trainer.max_steps={step + 2}"])
    assert max(_losses(tmp_path)) == step + 1
