"""Nothing a user had is lost: a failing run leaves every checkpoint byte-identical, the emergency checkpoint
goes to its own file, and exports never overwrite their input."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from cli_args import tiny_run
from lightning_resode.cli import main
from lightning_resode.lit import export_timm_weights
from lightning_resode.lit.checkpointing import AtomicCheckpointIO

TINY = tiny_run()


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.ckpt"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of 3 steps: ``last.ckpt`` and a best checkpoint, both at step 3."""
    root = tmp_path_factory.mktemp("trained")
    main(["fit", *TINY, f"--trainer.default_root_dir={root}", "--trainer.max_epochs=1"])
    return root


@pytest.fixture()
def run(trained: Path, tmp_path: Path) -> Path:
    root = tmp_path / "run"
    shutil.copytree(trained, root)
    return root


def _mismatched_image_folder(root: Path) -> Path:
    for split, classes in (("train", ("a", "b")), ("val", ("a", "c"))):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), color=(len(name) * 40, 0, 0)).save(root / split / name / "0.png")
    return root


@pytest.mark.parametrize(
    "case", ["missing ckpt_path", "checkpoint of another model", "data error while resuming", "diverged"]
)
def test_a_failing_run_leaves_every_checkpoint_byte_identical(case: str, run: Path, tmp_path: Path) -> None:
    checkpoints = run / "checkpoints"
    before = _digests(checkpoints)
    assert set(before) == {"last.ckpt", "best-epoch00-step3.ckpt"}
    extra, error = {
        "missing ckpt_path": ([f"--ckpt_path={checkpoints / 'no_such.ckpt'}"], "no_such.ckpt"),
        "checkpoint of another model": (["--model.model_name=resnet14t", "--ckpt_path=last"], "holds a resnet10t .* resnet14t"),
        "data error while resuming": (
            ["--data=ImageFolderDataModule", f"--data.init_args.root={_mismatched_image_folder(tmp_path / 'images')}",
             "--data.init_args.image_size=32", "--data.init_args.num_workers=0", "--ckpt_path=last"],
            "class",
        ),
        "diverged": (
            ["--ckpt_path=last", "--trainer.callbacks+=faults.ExplodeLearningRate", "--trainer.callbacks.step=3"],
            "diverged",
        ),
    }[case]
    with pytest.raises((Exception, SystemExit), match=error):  # each fails its own way; what matters is what it leaves
        main(["fit", *TINY, f"--trainer.default_root_dir={run}", "--trainer.max_epochs=3", *extra])
    after = _digests(checkpoints)
    for name, digest in before.items():
        assert after.get(name) == digest, f"{name} was changed by a failing run ({case})"
    for name in set(after) - set(before):  # an emergency checkpoint may only hold the restored, finite state
        state = torch.load(checkpoints / name, map_location="cpu", weights_only=False)
        assert name == "interrupted.ckpt" and state["global_step"] >= 3, name
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_export_refuses_to_overwrite_its_input(trained: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "last.ckpt"
    shutil.copy(trained / "checkpoints" / "last.ckpt", checkpoint)
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="overwrite"):
        export_timm_weights(checkpoint, checkpoint)
    with pytest.raises(ValueError, match="overwrite"):
        export_timm_weights(checkpoint, tmp_path / "." / "last.ckpt")
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == digest
    assert export_timm_weights(checkpoint, tmp_path / "w.safetensors").is_file()


def _other_device_folder(near: Path) -> Path | None:
    for candidate in (Path("/dev/shm"), Path(tempfile.gettempdir())):
        if candidate.is_dir() and os.access(candidate, os.W_OK) and candidate.stat().st_dev != near.stat().st_dev:
            return candidate
    return None


def test_checkpoint_writes_are_atomic_even_when_the_temp_folder_is_another_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader of the old file keeps reading the old bytes, whole; a failed write leaves the old file as it was.

    Lightning's own writer stages in the system temp folder and moves the file, which rewrites the target in
    place when that folder is on another filesystem (the usual case on clusters): this test fails for it.
    """
    other = _other_device_folder(tmp_path)
    if other is None:
        pytest.skip("no writable folder on another filesystem to stage temporary files in")
    monkeypatch.setattr(tempfile, "tempdir", str(other))
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.zeros(1000)}, target)
    old = target.read_bytes()
    with target.open("rb") as reader:
        io.save_checkpoint({"w": torch.ones(1000)}, target)
        assert reader.read() == old  # the old file was replaced, not rewritten under the reader
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(1000))
    new = target.read_bytes()
    with pytest.raises(Exception):  # noqa: B017  (pickling a lambda fails part-way through the write)
        io.save_checkpoint({"w": torch.zeros(1000), "bad": lambda: None}, target)
    assert target.read_bytes() == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left behind


@pytest.mark.parametrize("content", [b"", b"hello", bytes(range(256)) * 40])
def test_a_file_that_is_not_a_checkpoint_is_named_as_such(content: bytes, run: Path) -> None:
    bogus = run / "bogus.ckpt"
    bogus.write_bytes(content)
    with pytest.raises(SystemExit, match="not a checkpoint") as info:  # one line, no traceback
        main(["fit", *TINY, f"--trainer.default_root_dir={run}", "--trainer.max_epochs=2", f"--ckpt_path={bogus}"])
    assert "weights_only" not in str(info.value)
    with pytest.raises(ValueError, match="not a checkpoint") as info:
        export_timm_weights(bogus, run / "w.safetensors")
    assert "weights_only" not in str(info.value)


class _Pickled:
    def __reduce__(self):  # noqa: ANN204  (what a malicious checkpoint does: call a function when loaded)
        return (os.getcwd, ())


def test_a_checkpoint_holding_pickled_code_is_refused_without_advising_an_unsafe_load(run: Path) -> None:
    evil = run / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Pickled()}, evil)
    with pytest.raises(SystemExit, match=r"refusing to load .*pickled Python object \(posix.getcwd\)") as info:
        main(["fit", *TINY, f"--trainer.default_root_dir={run}", f"--ckpt_path={evil}"])
    assert "weights_only" not in str(info.value)
