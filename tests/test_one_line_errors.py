"""Errors outside config parsing are one line naming the cause, the path and what to do, in every command: a full
disk, a truncated or foreign file, a checkpoint carrying code, a batch BatchNorm cannot train on, class folders
that differ between splits, and ``model.num_classes``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from cli_args import ALL_COMMANDS, COMMANDS, tiny_run
from lightning_resode.cli import main
from lightning_resode.lit.checkpointing import CheckpointWriteError, atomic_save

TINY = tiny_run(*ALL_COMMANDS)


def _one_line_error(args: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(args)
    message = str(info.value.code)
    assert info.value.code not in (0, None) and "\n" not in message and "Traceback" not in message, message
    return message


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    main(["fit", *TINY, f"--trainer.default_root_dir={root}", "--trainer.max_epochs=1"])
    return root


# ---------------------------------------------------------------------- a full disk
@pytest.fixture()
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs: room for the logs, not for a checkpoint (needs root and a kernel that allows the mount)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_the_old_checkpoint(small_disk: Path) -> None:
    target = small_disk / "last.ckpt"
    atomic_save({"w": torch.zeros(1000)}, target)
    old = target.read_bytes()
    with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint .*last\.ckpt.*no space left on device \(\d+ MiB free"):
        atomic_save({"w": torch.zeros(2_000_000)}, target)  # 8 MB into what is left of 4 MiB
    assert target.read_bytes() == old and sorted(p.name for p in small_disk.iterdir()) == ["last.ckpt"]

    root = small_disk / "run"
    message = _one_line_error(["fit", *TINY, f"--trainer.default_root_dir={root}", "--trainer.max_epochs=1"])
    assert message.startswith("lightning-resode: error: cannot write checkpoint") and "no space left on device" in message
    assert str(root / "checkpoints") in message and "default_root_dir" in message
    assert not [p.name for p in (root / "checkpoints").iterdir()], "no interrupted.ckpt, no temporary file left"


# ---------------------------------------------------------------------- checkpoints that cannot be read
def _args(command: str, root: Path, checkpoint: Path) -> list[str]:
    extra = ["--diagnose.batch_images=4"] if command == "diagnose" else []
    return [command, *TINY, *extra, f"--trainer.default_root_dir={root}", f"--ckpt_path={checkpoint}"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_truncated_checkpoint_is_one_line_in_every_command(command: str, trained: Path, tmp_path: Path) -> None:
    whole = (trained / "checkpoints" / "last.ckpt").read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole[: len(whole) // 2])  # a copy interrupted half-way
    message = _one_line_error(_args(command, tmp_path, truncated))
    assert f"'{truncated}' is not a checkpoint" in message and "truncated" in message, message
    assert "weights_only" not in message and "PytorchStreamReader" not in message


class _Pickled:
    def __reduce__(self):  # noqa: ANN204  (what a malicious checkpoint does: call a function when loaded)
        return (os.getcwd, ())


@pytest.mark.parametrize("command", COMMANDS)
def test_a_checkpoint_carrying_code_is_refused_in_every_command(command: str, trained: Path, tmp_path: Path) -> None:
    state = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state["payload"] = _Pickled()
    evil = tmp_path / "evil.ckpt"
    torch.save(state, evil)
    message = _one_line_error(_args(command, tmp_path, evil))
    assert f"refusing to load '{evil}': it holds a pickled Python object (posix.getcwd)" in message, message
    assert "weights_only" not in message


# ---------------------------------------------------------------------- data
def test_batch_size_1_with_batchnorm_is_one_line_and_saves_nothing(tmp_path: Path) -> None:
    message = _one_line_error(["fit", *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
                               "--data.init_args.batch_size=1"])
    assert "a training batch of 1 image(s) of 32x32 pixels at step 0" in message and "batch_size >= 2" in message, message
    assert not list(tmp_path.glob("checkpoints/*.ckpt"))  # no pointless step-0 interrupted.ckpt


def _image_folder(root: Path, splits: dict[str, tuple[str, ...]]) -> Path:
    for split, classes in splits.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), color=(40 * i, len(name) * 40, 0)).save(root / split / name / f"{i}.png")
    return root


def test_class_folders_that_differ_between_splits_are_named(tmp_path: Path) -> None:
    images = _image_folder(tmp_path / "images", {"train": ("a", "b"), "val": ("a", "c")})
    message = _one_line_error(["fit", *TINY, f"--trainer.default_root_dir={tmp_path / 'run'}", "--data=ImageFolderDataModule",
                               f"--data.init_args.root={images}", "--data.init_args.image_size=32",
                               "--data.init_args.num_workers=0"])
    assert f"image folder '{images / 'val'}' has class(es) ['c'] that" in message, message
    assert "lacks training class(es) ['b']" in message


def test_num_classes_on_the_model_says_what_to_set_instead(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", *TINY, f"--trainer.default_root_dir={tmp_path}", "--model.num_classes=7"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "model.num_classes is not an option" in err and "--data.init_args.num_classes=N" in err, err
    assert "must be given via" not in err  # the advice that led to a second rejection
