"""predict on real files: a folder without labels, top-k with class names, bad files named, DDP ranks merged."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
from PIL import Image

from lightning_resode.lit import ImageFolderDataModule, ImageReadError, ResodeClassifier
from lightning_resode.lit.prediction import PredictionWriter

NARROW = {"channels": [8, 16, 32, 64], "stem_width": 8}


def _image(path: Path, shade: int, size: tuple[int, int] = (12, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color=(shade, 80, 120)).save(path)


def _folders(root: Path) -> Path:
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            for i in range(2):
                _image(root / split / label / f"{i}.png", 40 * i)
    return root


def _unlabelled(folder: Path, count: int) -> list[str]:
    paths = [folder / ("nested/deeper" if i % 3 == 0 else "") / f"img{i}.{'jpg' if i % 2 else 'png'}" for i in range(count)]
    for i, path in enumerate(paths):
        _image(path, 20 * i, size=(10 + i, 14))
    (folder / "notes.txt").write_text("not an image")
    return sorted(str(p) for p in paths)


def _predict(data: ImageFolderDataModule, tmp_path: Path, **trainer_kwargs) -> pl.Trainer:
    model = ResodeClassifier(model_name="resnet18", num_classes=data.num_classes, model_kwargs=NARROW)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), callbacks=[PredictionWriter(top_k=5)], **trainer_kwargs,
    )
    trainer.predict(model, datamodule=data, return_predictions=False)
    return trainer


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_a_folder_without_labels(tmp_path: Path) -> None:
    expected = _unlabelled(tmp_path / "incoming", 5)
    data = ImageFolderDataModule(str(_folders(tmp_path / "data")), image_size=32, batch_size=2, num_workers=0,
                                 predict_root=str(tmp_path / "incoming"))
    _predict(data, tmp_path / "run")
    rows = _rows(tmp_path / "run" / "predictions.csv")
    assert [r["path"] for r in rows] == expected  # recursive, images only, in index order
    assert list(rows[0]) == ["index", "path", "top1_class", "top1_name", "top1_prob", "top2_class", "top2_name", "top2_prob"]
    assert all({r["top1_name"], r["top2_name"]} == {"cat", "dog"} for r in rows)  # top-5 capped at the 2 classes
    assert all(abs(float(r["top1_prob"]) + float(r["top2_prob"]) - 1.0) < 1e-4 for r in rows)


def test_bad_predict_files_and_folders_are_named(tmp_path: Path) -> None:
    _unlabelled(tmp_path / "incoming", 3)
    corrupt = tmp_path / "incoming" / "broken.jpg"
    corrupt.write_bytes(b"not a jpeg")
    data = ImageFolderDataModule(str(_folders(tmp_path / "data")), image_size=32, batch_size=2, num_workers=0,
                                 predict_root=str(tmp_path / "incoming"))
    with pytest.raises(ImageReadError, match=str(corrupt)):
        _predict(data, tmp_path / "run")
    (tmp_path / "empty").mkdir()
    data = ImageFolderDataModule(str(tmp_path / "data"), predict_root=str(tmp_path / "empty"), num_workers=0)
    with pytest.raises(ValueError, match=r"no image files.*\.jpg"):
        data.setup("predict")
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataModule(str(tmp_path / "data"), predict_root=str(tmp_path / "missing"))


def test_test_uses_the_test_split_when_there_is_one(tmp_path: Path) -> None:
    root = _folders(tmp_path / "data")
    data = ImageFolderDataModule(str(root), image_size=16, batch_size=2, num_workers=0)
    data.setup("test")
    with pytest.warns(UserWarning, match="no test split.*--data.test_root"):
        assert data.test_dataloader().dataset.root == str(root / "val")
    for label in ("cat", "dog"):
        _image(root / "test" / label / "0.png", 0)
    data = ImageFolderDataModule(str(root), image_size=16, batch_size=2, num_workers=0)  # root/test found
    data.setup("test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.test_dataloader().dataset.root == str(root / "test")
    for label in ("cat", "fox"):  # two classes, but not the training ones
        _image(tmp_path / "elsewhere" / label / "0.png", 0)
    with pytest.raises(ValueError, match=r"has class\(es\) \['fox'\] .* lacks training class\(es\) \['dog'\]"):
        ImageFolderDataModule(str(root), test_root=str(tmp_path / "elsewhere"), num_workers=0)  # before anything trains


@pytest.mark.slow  # two spawned processes: ~35 s on the shared 2-core CPU
def test_ddp_ranks_write_parts_that_rank_zero_merges(tmp_path: Path) -> None:
    expected = _unlabelled(tmp_path / "incoming", 7)  # odd: the ranks get 4 and 3 images, none twice
    data = ImageFolderDataModule(str(_folders(tmp_path / "data")), image_size=32, batch_size=2, num_workers=0,
                                 predict_root=str(tmp_path / "incoming"))
    _predict(data, tmp_path / "run", strategy="ddp_spawn", devices=2)
    rows = _rows(tmp_path / "run" / "predictions.csv")
    assert [int(r["index"]) for r in rows] == list(range(7)) and [r["path"] for r in rows] == expected
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["predictions.csv"]
