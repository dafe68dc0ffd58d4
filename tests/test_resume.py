"""Resuming is exact: a run stopped by a signal or by ``max_steps`` and resumed with ``--ckpt_path last`` logs the
same per-step losses as an uninterrupted run, and ``last.ckpt`` ends up holding the newest state."""

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

# drop-path (torch RNG), mixup (NumPy RNG) and a cosine schedule: everything a resume must put back
BASE = [
    "--config", "recipes/quickstart.yaml", "--logging.wandb=false", "--trainer.enable_progress_bar=false",
    "--model.model_name=resnet10t", "--model.model_kwargs={drop_path_rate: 0.1}", "--model.mixup_alpha=0.4",
    "--data.init_args.batch_size=16", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1", "--trainer.max_epochs=2",
    "--memory.every_n_steps=3", "--fidelity.every_n_steps=3",
]


def _losses(root: Path) -> dict[int, float]:
    losses = {}
    for metrics in sorted(root.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(metrics.open()):
            if row.get("train/loss"):
                losses[int(row["step"])] = float(row["train/loss"])
    return losses


def _step(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    root = tmp_path_factory.mktemp("straight")
    main(["fit", *BASE, f"--trainer.default_root_dir={root}"])
    losses = _losses(root)
    assert sorted(losses) == list(range(8))
    return losses


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["SIGTERM", "SIGINT"]
)
def test_signal_mid_epoch_then_resume_reproduces_every_loss(signum: int, straight: dict[int, float], tmp_path: Path) -> None:
    run = ["fit", *BASE, f"--trainer.default_root_dir={tmp_path}"]
    with pytest.raises(SystemExit) as stopped:  # step 5 is the second batch of the second epoch
        main([*run, "--trainer.callbacks+=faults.SignalAtStep", "--trainer.callbacks.step=5", f"--trainer.callbacks.signum={int(signum)}"])
    assert stopped.value.code == 128 + signum
    checkpoints = tmp_path / "checkpoints"
    assert _step(checkpoints / "interrupted.ckpt") == 5
    last_before = (checkpoints / "last.ckpt").read_bytes()  # written at the end of the first epoch
    assert _step(checkpoints / "last.ckpt") == 4

    main([*run, "--ckpt_path=last"])
    assert _losses(tmp_path) == straight  # exact: the same batches, augmentation and dropout draws
    assert _step(checkpoints / "last.ckpt") == 8 and (checkpoints / "last.ckpt").read_bytes() != last_before
    assert not list(checkpoints.glob("last-v*.ckpt"))


def test_an_error_mid_batch_saves_the_state_before_that_batch_and_resume_trains_it_again(
    straight: dict[int, float], tmp_path: Path
) -> None:
    run = ["fit", *BASE, f"--trainer.default_root_dir={tmp_path}"]
    with pytest.raises(RuntimeError, match="injected failure at step 6"):
        main([*run, "--trainer.callbacks+=faults.FailAtStep", "--trainer.callbacks.step=6"])
    assert _step(tmp_path / "checkpoints" / "interrupted.ckpt") == 6
    main([*run, "--ckpt_path=last"])
    assert _losses(tmp_path) == straight


def test_a_run_stopped_by_max_steps_mid_epoch_continues_exactly(straight: dict[int, float], tmp_path: Path) -> None:
    run = ["fit", *BASE, f"--trainer.default_root_dir={tmp_path}"]
    main([*run, "--trainer.max_steps=5"])
    assert _step(tmp_path / "checkpoints" / "last.ckpt") == 5
    main([*run, "--trainer.max_steps=8", "--ckpt_path=last"])
    assert _losses(tmp_path) == straight
    assert _step(tmp_path / "checkpoints" / "last.ckpt") == 8
    assert not list((tmp_path / "checkpoints").glob("last-v*.ckpt"))


def test_sigterm_from_outside_exits_143_and_leaves_a_resumable_checkpoint(tmp_path: Path) -> None:
    args = [
        "fit", *BASE, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=400", "--memory.every_n_steps=50", "--fidelity.every_n_steps=50",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lightning_resode", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("csv/version_*/config.yaml")):  # written in setup, just before the first batch
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    time.sleep(6.0)  # a few dozen steps in, well before the 400th
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, process.stderr.read().decode()[-2000:]
    interrupted = tmp_path / "checkpoints" / "interrupted.ckpt"
    step = _step(interrupted)
    assert 0 < step < 400, "the signal must land mid-epoch"
    main([*args, "--ckpt_path=last", f"--trainer.max_steps={step + 2}"])
    assert max(_losses(tmp_path)) == step + 1
    assert _step(tmp_path / "checkpoints" / "last.ckpt") == step + 2
