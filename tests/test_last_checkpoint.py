"""``last.ckpt`` is the newest state of the run, whatever the monitored metric did, and ``--ckpt_path last`` resumes
the file with the most progress of this run: never the step-0 file of a fresh run that failed in the same folder."""

from __future__ import annotations

import csv
import hashlib
import shutil
import signal
from pathlib import Path

import pytest
import torch

from cli_args import tiny_run
from lightning_resode.cli import main
from lightning_resode.lit.checkpointing import resolve_last

TINY = tiny_run("--model.stages=[]")  # no calibration: faster
# nothing can change val/acc: no trainable weight moves (lr 0) and every BatchNorm is frozen, so epoch 2 never
# improves on epoch 1 and Lightning saves no monitored checkpoint after the first epoch
FLAT = ["--model.lr=0", "--model.weight_decay=0", "--model.freeze=[conv1,bn1,layer1,layer2,layer3,layer4]"]


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def _logged_steps(root: Path, version: int) -> list[int]:
    rows = csv.DictReader((root / "csv" / f"version_{version}" / "metrics.csv").open())
    return sorted(int(row["step"]) for row in rows if row.get("train/loss"))


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.ckpt"))}


def test_last_ckpt_holds_the_final_epoch_although_val_acc_did_not_improve(tmp_path: Path) -> None:
    run = ["fit", *TINY, *FLAT, f"--trainer.default_root_dir={tmp_path}"]
    main([*run, "--trainer.max_epochs=2"])
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["best-epoch00-step3.ckpt", "last.ckpt"]
    assert _step(checkpoints / "last.ckpt") == 6  # Lightning 2.6 left it at 3, the step of the best file

    main([*run, "--trainer.max_epochs=3", "--ckpt_path=last"])
    assert _logged_steps(tmp_path, 1) == [6, 7, 8]  # the third epoch only: no step trained twice
    assert _step(checkpoints / "last.ckpt") == 9
    assert not list(checkpoints.glob("last-v*.ckpt"))


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of 3 steps: ``last.ckpt`` at step 3."""
    root = tmp_path_factory.mktemp("good")
    main(["fit", *TINY, f"--trainer.default_root_dir={root}", "--trainer.max_epochs=1"])
    return root


def test_a_fresh_run_failing_at_step_0_leaves_no_resume_point(good_run: Path, tmp_path: Path) -> None:
    root = tmp_path / "run"
    shutil.copytree(good_run, root)
    before = _digests(root / "checkpoints")
    with pytest.raises(RuntimeError, match="injected failure at step 0"):  # a fresh run: no --ckpt_path
        main(["fit", *TINY, f"--trainer.default_root_dir={root}", "--trainer.max_epochs=1",
              "--trainer.callbacks+=faults.FailAtStep", "--trainer.callbacks.step=0"])
    assert _digests(root / "checkpoints") == before  # no step-0 interrupted.ckpt to win over last.ckpt
    assert resolve_last(root / "checkpoints") == root / "checkpoints" / "last.ckpt"


def test_ckpt_path_last_resumes_the_most_progress_not_the_newest_file(good_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"  # a run stopped by SIGTERM after one step: a genuine, newer, less advanced file
    with pytest.raises(SystemExit):
        main(["fit", *TINY, f"--trainer.default_root_dir={other}", "--trainer.max_epochs=1",
              "--trainer.callbacks+=faults.SignalAtStep", "--trainer.callbacks.step=1",
              f"--trainer.callbacks.signum={int(signal.SIGTERM)}"])
    root = tmp_path / "run"
    shutil.copytree(good_run, root)
    shutil.copy(other / "checkpoints" / "interrupted.ckpt", root / "checkpoints" / "interrupted.ckpt")
    assert _step(root / "checkpoints" / "interrupted.ckpt") == 1 < _step(root / "checkpoints" / "last.ckpt") == 3

    main(["fit", *TINY, f"--trainer.default_root_dir={root}", "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert _logged_steps(root, 1) == [3, 4, 5]  # continued from last.ckpt's step 3, not from step 1
    assert _step(root / "checkpoints" / "last.ckpt") == 6
    assert not (root / "checkpoints" / "interrupted.ckpt").exists()  # obsolete once last.ckpt is newer
