"""A normal run says what matters once: no profiler lines, no ``ERROR:`` text, each warning once, Ctrl-C named as
such, the progress bar closed before the summary table, and no version number that means nothing; stale temporary
checkpoint files from a killed write are removed when the next fit starts."""

from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_args import tiny_run
from lightning_resode import AdjointSequential
from lightning_resode.cli import each_warning_once, main
from lightning_resode.measure import step_memory
from lightning_resode.policy import StagePolicy
from stacks import conv_blocks

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_run("--model.stages=[]")


def _quickstart(root: Path, *extra: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lightning_resode", "fit", "--config", "recipes/quickstart.yaml",
         f"--trainer.default_root_dir={root}", "--logging.wandb=false", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def _check_quiet(output: str) -> None:
    for noise in ("USDT", "profiler_start", "ERROR", "gpuGetDeviceCount", "v_num", "SIGTERMException"):
        assert noise not in output, f"{noise!r} in the output:\n{output[-3000:]}"
    warnings = [line for line in output.splitlines() if "recalibrating" in line or "Warning" in line]
    assert len(warnings) == len(set(warnings)), warnings
    assert output.count("fit summary") == 1
    last_bar = max(i for i, line in enumerate(output.splitlines()) if line.startswith("Epoch "))
    summary = next(i for i, line in enumerate(output.splitlines()) if "fit summary" in line)
    assert last_bar < summary, "the progress bar's last frame came after the summary table"


def test_the_quickstart_prints_no_profiler_noise_and_ends_with_its_summary(tmp_path: Path) -> None:
    """`make run`'s recipe, shortened: the memory monitor (the CPU profiler) runs every other step."""
    output = _quickstart(tmp_path, "--trainer.max_epochs=2", "--trainer.limit_train_batches=3",
                         "--trainer.limit_val_batches=2", "--memory.every_n_steps=2", "--fidelity.every_n_steps=4")
    _check_quiet(output)
    assert "stage policy, step 0: layer1 ->" in output  # what a user should see is still there


@pytest.mark.slow
def test_make_run_prints_no_noise(tmp_path: Path) -> None:
    """The whole quickstart, as `make run` runs it (about 45 s to 4 min on 2 cores)."""
    _check_quiet(_quickstart(tmp_path))


def test_the_cpu_memory_measure_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    layer = torch.nn.Linear(8, 8)
    images = torch.randn(4, 8)
    for _ in range(2):
        assert step_memory(lambda: layer(images).square().sum()).peak_bytes > 0
    err = capfd.readouterr().err
    assert "USDT" not in err and "profiler_st" not in err and "ERROR" not in err, err


def test_ctrl_c_is_named_sigint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as stopped:
        main(["fit", *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
              "--trainer.callbacks+=faults.SignalAtStep", "--trainer.callbacks.step=1",
              f"--trainer.callbacks.signum={int(signal.SIGINT)}"])
    assert stopped.value.code == 130
    assert "stopped by SIGINT (Ctrl-C) at step 1" in caplog.text and "SIGTERMException" not in caplog.text


def test_stale_temporary_checkpoints_are_removed_when_a_fit_starts(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = checkpoints / f".last.ckpt.tmp-{int(dead.stdout)}"  # a write killed mid-way: its process is gone
    stale.write_bytes(b"\0" * 4096)
    alive = checkpoints / f".last.ckpt.tmp-{os.getppid()}"  # a live process's write is left alone
    alive.write_bytes(b"\0" * 16)
    main(["fit", *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1"])
    assert not stale.exists() and alive.exists()
    assert (checkpoints / "last.ckpt").is_file()


def test_a_repeated_measurement_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    """The memory monitor runs its warm-up and first step on the same images: a reconstruction that falls back
    there warned twice, word for word (seen in `make run`)."""
    blocks = [b.double() for b in conv_blocks(10, channels=4, scale=1.0)]  # large residuals: euler is far off
    stage = AdjointSequential(copy.deepcopy(blocks), "euler_fast", name="layer3")
    policy = StagePolicy({"layer3": stage}, mode="auto")
    policy._apply("layer3", "euler_fast")  # as if a calibration had chosen it, with a tight bound
    stage.max_reconstruction_error = 1e-3
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="lightning_resode.policy"), each_warning_once():  # as main() runs
        for _ in range(2):
            stage(x.clone().requires_grad_()).square().sum().backward()
            assert stage.last_backward.fell_back
    warned = [r.getMessage() for r in caplog.records if "reconstruction error" in r.getMessage()]
    assert len(warned) == 1, warned
