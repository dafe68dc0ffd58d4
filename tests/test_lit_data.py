"""DataModules on real (tiny) data: digits offline, image folders with a corrupt file, CIFAR offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_resode.lit import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule, ImageReadError, SyntheticDataModule


def test_digits_are_offline_rgb_and_split_deterministically() -> None:
    data = DigitsDataModule(image_size=16, batch_size=32)
    data.setup("fit")
    assert len(data.train_set) + len(data.val_set) == 1797
    images, targets = next(iter(data.val_dataloader()))
    assert images.shape == (32, 3, 16, 16) and torch.equal(images[:, 0], images[:, 2])
    again = DigitsDataModule(image_size=16, batch_size=32)
    again.setup("fit")
    assert torch.equal(next(iter(again.val_dataloader()))[1], targets)
    assert set(data.train_set.tensors[1].tolist()) == set(range(10))


def test_training_order_depends_on_the_epoch_only() -> None:
    data = SyntheticDataModule(num_classes=3, image_size=4, train_samples=12, batch_size=4)
    data.setup("fit")
    first, second = data.train_dataloader(), data.train_dataloader()
    first.sampler.set_epoch(1)
    second.sampler.set_epoch(1)
    assert list(first.sampler) == list(second.sampler)
    second.sampler.set_epoch(2)
    assert list(first.sampler) != list(second.sampler)


def _folder(root: Path) -> Path:
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (12, 12), color=(40 * i, 80, 120)).save(root / split / label / f"{i}.png")
    return root


def test_image_folder_reads_with_timm_transforms(tmp_path: Path) -> None:
    data = ImageFolderDataModule(str(_folder(tmp_path)), image_size=16, batch_size=2, num_workers=0)
    data.setup("fit")
    assert data.num_classes == 2
    images, targets = next(iter(data.train_dataloader()))
    assert images.shape == (2, 3, 16, 16) and targets.dtype == torch.long


def test_corrupt_and_missing_images_are_named(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    corrupt = root / "val" / "cat" / "0.png"
    corrupt.write_bytes(b"not a png")
    data = ImageFolderDataModule(str(root), image_size=16, batch_size=2, num_workers=0)
    data.setup("fit")
    with pytest.raises(ImageReadError, match=str(corrupt)):
        data.val_set[0]
    missing = root / "val" / "dog" / "1.png"
    missing.unlink()
    with pytest.raises(ImageReadError, match=str(missing)):
        data.val_set[3]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataModule(str(tmp_path / "nowhere"))


def test_cifar_offline_errors_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="CIFAR10 is not under root"):
        CIFAR10DataModule(root=str(tmp_path), download=False).prepare_data()
    # no network: every HTTP(S) connection goes to a closed local port, as on an offline machine
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(ConnectionError, match="offline"):
        CIFAR10DataModule(root=str(tmp_path), download=True).prepare_data()


def test_bad_data_options_are_named() -> None:
    with pytest.raises(ValueError, match="-3"):
        DigitsDataModule(batch_size=-3)
    with pytest.raises(ValueError, match="1.5"):
        DigitsDataModule(val_fraction=1.5)
