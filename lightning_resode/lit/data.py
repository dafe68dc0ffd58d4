"""DataModules: digits (offline default), image folders, CIFAR-10/100 and synthetic throughput data.

Each exposes ``num_classes`` (the CLI links it to the model) and yields ``(images, targets)`` batches of
RGB images, so any recipe can swap its data without touching the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .sampling import resumable_loader

Triple = tuple[float, float, float]


class ImageReadError(RuntimeError):
    """An image file is missing or cannot be decoded; the message names the file."""


class ClassMismatchError(ValueError):
    """A split's class folders differ from the training split's: the same label would mean another class."""


def model_data_config(datamodule: pl.LightningDataModule, **overrides: Any) -> dict[str, Any]:
    """timm's data config (``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``) for
    the model this DataModule feeds, with the user's explicit settings (``overrides`` not ``None``) on top.

    The model's own config comes from the module of the Trainer the DataModule is attached to, when that module
    has a ``data_config()`` method (``ResodeClassifier`` returns timm's ``resolve_model_data_config`` of its
    network, i.e. the pretrained weights' interpolation, crop and mean/std); timm's defaults otherwise.
    """
    from timm.data import resolve_data_config

    config = dict(resolve_data_config(pretrained_cfg={"input_size": (3, 224, 224)}))  # timm's defaults
    trainer = datamodule.trainer
    module = trainer.lightning_module if trainer is not None else None
    if module is not None and callable(getattr(module, "data_config", None)):
        config.update(module.data_config())
    config.update({key: value for key, value in overrides.items() if value is not None})
    return config


class _LoaderMixin:
    """Shared batch/worker settings and the four loaders.

    ``test`` uses ``test_set`` when the data has a test split and otherwise the validation split, with a warning;
    ``predict`` uses ``predict_set`` when one is given and otherwise the validation split.
    """

    batch_size: int
    num_workers: int
    train_set: Dataset
    val_set: Dataset
    test_set: Dataset | None = None
    predict_set: Dataset | None = None
    _test_hint = ""

    def _check_loader_args(self, batch_size: int, num_workers: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")

    def _loader(self, dataset: Dataset) -> DataLoader:
        """Evaluation order: sequential (under DDP Lightning splits it across ranks)."""
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(0),  # worker seeds never draw from the global stream
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (seed, epoch), each sample augmented under its own seed, resumable mid-epoch (see ``sampling``)."""
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        seed = torch.initial_seed() % 2**31
        return resumable_loader(self.train_set, self.batch_size, self.num_workers, seed, num_replicas=world, rank=rank)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            rank_zero_warn(
                f"{type(self).__name__} has no test split: `test` evaluates the validation split "
                f"({len(self.val_set)} images, also used to pick checkpoints){self._test_hint}"  # type: ignore[arg-type]
            )
            return self._loader(self.val_set)
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set if self.predict_set is None else self.predict_set)


class DigitsDataModule(_LoaderMixin, pl.LightningDataModule):
    """scikit-learn's bundled 8×8 digits (1797 images, shipped with the package: fully offline), upscaled to RGB.

    There is no test split: ``test`` evaluates, and ``predict`` predicts, the validation split.

    Args:
        image_size: side of the upscaled square image.
        val_fraction: held-out share, split with ``split_seed`` (the same split for every run).
        batch_size, num_workers: DataLoader settings.
    """

    num_classes = 10
    class_names = tuple(str(digit) for digit in range(10))

    def __init__(
        self,
        image_size: int = 32,
        val_fraction: float = 0.2,
        batch_size: int = 64,
        num_workers: int = 0,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        self._check_loader_args(batch_size, num_workers)
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.image_size, self.val_fraction, self.split_seed = image_size, val_fraction, split_seed
        self.batch_size, self.num_workers = batch_size, num_workers

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
        targets = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = int(round(len(targets) * self.val_fraction))
        val_idx, train_idx = order[:n_val], order[n_val:]
        self.train_set = TensorDataset(images[train_idx], targets[train_idx])
        self.val_set = TensorDataset(images[val_idx], targets[val_idx])


class SyntheticDataModule(_LoaderMixin, pl.LightningDataModule):
    """Random images and labels from a fixed seed: throughput and memory runs without any data on disk."""

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 224,
        train_samples: int = 256,
        val_samples: int = 64,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._check_loader_args(batch_size, num_workers)
        if num_classes < 1 or image_size < 1 or train_samples < 1 or val_samples < 1:
            raise ValueError(
                "num_classes, image_size, train_samples and val_samples must be >= 1, got "
                f"{num_classes}, {image_size}, {train_samples}, {val_samples}"
            )
        self.num_classes, self.image_size = num_classes, image_size
        self.train_samples, self.val_samples, self.seed = train_samples, val_samples, seed
        self.batch_size, self.num_workers = batch_size, num_workers

    def _random_set(self, count: int, seed: int) -> TensorDataset:
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(count, 3, self.image_size, self.image_size, generator=generator)
        targets = torch.randint(0, self.num_classes, (count,), generator=generator)
        return TensorDataset(images, targets)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._random_set(self.train_samples, self.seed)
        self.val_set = self._random_set(self.val_samples, self.seed + 1)


def _read_rgb(path: str) -> Image.Image:
    """PIL loader whose errors name the file (torchvision's name only the decoder's complaint)."""
    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise ImageReadError(f"image file {path!r} is missing (was it deleted after the folder was scanned?)") from err
    except OSError as err:  # PIL.UnidentifiedImageError and truncated files are OSErrors
        raise ImageReadError(f"cannot read image file {path!r}: {err}") from err


IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFiles(Dataset):
    """Every image under ``root`` (recursively, by extension), without labels: what ``predict`` runs on.

    Items are image tensors; ``samples`` holds the file paths in dataset-index order (sorted), which the
    prediction writer puts next to each prediction. A file that cannot be decoded raises ``ImageReadError``
    naming it.
    """

    def __init__(self, root: str | Path, transform: Any = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"predict folder {str(self.root)!r} does not exist")
        self.samples = sorted(
            str(p) for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not self.samples:
            raise ValueError(f"predict folder {str(self.root)!r} holds no image files (looked for {IMAGE_EXTENSIONS})")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        image = _read_rgb(self.samples[index])
        return self.transform(image) if self.transform is not None else image


class ImageFolderDataModule(_LoaderMixin, pl.LightningDataModule):
    """``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` with timm's ``create_transform`` pipelines.

    The transforms follow the model's own data config (``model_data_config``: a pretrained model's
    interpolation, crop and mean/std); each option below left at ``None`` keeps the model's value.

    Args:
        root: folder holding ``train_dir`` and ``val_dir``.
        image_size: training crop / eval resize target; ``None``: the model's input size.
        test_root: a labelled ``<class>/*`` folder for ``test``; default ``root/test`` when it exists, otherwise
            ``test`` evaluates the validation split (with a warning).
        predict_root: a folder of images without labels (searched recursively) for ``predict``; default: the
            validation split.
        auto_augment: timm auto-augment policy (``rand-m9-mstd0.5``…) or ``None``.
        re_prob: random erasing probability.
        crop_pct, interpolation, mean, std: override the model's eval crop fraction, resize interpolation
            (``bilinear``, ``bicubic``…) and normalisation.
    """

    def __init__(
        self,
        root: str,
        image_size: int | None = None,
        train_dir: str = "train",
        val_dir: str = "val",
        batch_size: int = 64,
        num_workers: int = 4,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
        crop_pct: float | None = None,
        test_root: str | None = None,
        predict_root: str | None = None,
        interpolation: str | None = None,
        mean: Triple | None = None,
        std: Triple | None = None,
    ) -> None:
        super().__init__()
        self._check_loader_args(batch_size, num_workers)
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be >= 1 or None (the model's input size), got {image_size}")
        self.root = Path(root)
        self.image_size, self.train_dir, self.val_dir = image_size, train_dir, val_dir
        self.auto_augment, self.re_prob, self.crop_pct = auto_augment, re_prob, crop_pct
        self.interpolation, self.mean, self.std = interpolation, mean, std
        self.batch_size, self.num_workers = batch_size, num_workers
        self.class_names = self._classes(self.root / train_dir)
        self.num_classes = len(self.class_names)
        if test_root is not None and not Path(test_root).is_dir():
            raise FileNotFoundError(f"test_root {test_root!r} does not exist (expected <test_root>/<class>/*)")
        if predict_root is not None and not Path(predict_root).is_dir():
            raise FileNotFoundError(f"predict_root {predict_root!r} does not exist (a folder of images)")
        default_test = self.root / "test"
        self.test_root = Path(test_root) if test_root is not None else default_test if default_test.is_dir() else None
        self.predict_root = None if predict_root is None else Path(predict_root)
        self._test_hint = f"; pass --data.test_root DIR or create {str(default_test)!r} to test on held-out images"
        self.data_config: dict[str, Any] = {}
        for folder in (self.root / val_dir, self.test_root):  # before anything trains, when they are there
            if folder is not None and folder.is_dir():
                self._check_classes(folder)

    @staticmethod
    def _classes(folder: Path) -> list[str]:
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {str(folder)!r} does not exist (expected <root>/<split>/<class>/*)")
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not classes:
            raise ValueError(f"image folder {str(folder)!r} has no class sub-folders")
        if len(classes) == 1:
            raise ValueError(
                f"image folder {str(folder)!r} has one class sub-folder ({classes[0]!r}); a classifier needs at least "
                "two, one folder per class (<root>/<split>/<class>/*)"
            )
        return classes

    def _transform(self, training: bool) -> Any:
        from timm.data import create_transform

        config = self.data_config
        return create_transform(
            config["input_size"],
            is_training=training,
            auto_augment=self.auto_augment if training else None,
            re_prob=self.re_prob if training else 0.0,
            interpolation=config["interpolation"],
            mean=config["mean"],
            std=config["std"],
            crop_pct=config["crop_pct"],
            crop_mode=config.get("crop_mode"),
        )

    def _check_classes(self, folder: Path) -> None:
        """Labels are numbered by sorted class name, so every split must hold exactly the training classes."""
        train_folder = self.root / self.train_dir
        train, other = self._classes(train_folder), self._classes(folder)
        if other == train:
            return
        extra, missing = sorted(set(other) - set(train)), sorted(set(train) - set(other))
        parts = ([f"has class(es) {extra} that {str(train_folder)!r} lacks"] if extra else []) + (
            [f"lacks training class(es) {missing}"] if missing else []
        )
        raise ClassMismatchError(
            f"image folder {str(folder)!r} {' and '.join(parts)}; every split needs the same class sub-folders "
            "(labels are numbered by sorted class name)"
        )

    def _dataset(self, folder: Path, training: bool) -> Dataset:
        from torchvision.datasets import ImageFolder

        self._check_classes(folder)
        return ImageFolder(str(folder), transform=self._transform(training), loader=_read_rgb)

    def setup(self, stage: str | None = None) -> None:
        size = (3, self.image_size, self.image_size) if self.image_size is not None else None
        self.data_config = model_data_config(
            self, input_size=size, interpolation=self.interpolation, crop_pct=self.crop_pct, mean=self.mean, std=self.std
        )
        self.train_set = self._dataset(self.root / self.train_dir, training=True)
        self.val_set = self._dataset(self.root / self.val_dir, training=False)
        if stage in (None, "test") and self.test_root is not None:
            self.test_set = self._dataset(self.test_root, training=False)
            rank_zero_info(f"test split: {len(self.test_set)} images from {str(self.test_root)!r}")
        if stage in (None, "predict") and self.predict_root is not None:
            self.predict_set = ImageFiles(self.predict_root, transform=self._transform(training=False))
            rank_zero_info(f"predicting {len(self.predict_set)} images under {str(self.predict_root)!r}")


class _CifarDataModule(_LoaderMixin, pl.LightningDataModule):
    """torchvision CIFAR, downloaded into ``root`` when online; offline without the files is a clear error.

    Validation and ``test`` both use the official test split (CIFAR has no separate validation split). Images are
    normalised with the model's mean/std and resized (``image_size`` other than 32) with its interpolation
    (``model_data_config``); ``mean``/``std`` override them.
    """

    _dataset_name = ""
    num_classes = 0

    def __init__(
        self,
        root: str = "data",
        image_size: int = 32,
        batch_size: int = 128,
        num_workers: int = 4,
        download: bool = True,
        augment: bool = True,
        mean: Triple | None = None,
        std: Triple | None = None,
    ) -> None:
        super().__init__()
        self._check_loader_args(batch_size, num_workers)
        self.root, self.image_size, self.download, self.augment = root, image_size, download, augment
        self.mean, self.std = mean, std
        self.batch_size, self.num_workers = batch_size, num_workers
        self.data_config: dict[str, Any] = {}

    def _cls(self) -> Any:
        import torchvision.datasets

        return getattr(torchvision.datasets, self._dataset_name)

    def _open(self, train: bool, transform: Any = None) -> Dataset:
        cls = self._cls()
        try:
            return cls(self.root, train=train, transform=transform, download=False)
        except RuntimeError as err:
            raise FileNotFoundError(
                f"{self._dataset_name} is not under root={self.root!r} ({err}). Run once with network access and "
                "download=true, or copy the extracted dataset there"
            ) from err

    def prepare_data(self) -> None:
        cls = self._cls()
        if self.download:
            try:
                cls(self.root, train=True, download=True)
                cls(self.root, train=False, download=True)
            except OSError as err:  # URLError, connection refused, DNS failures
                raise ConnectionError(
                    f"could not download {self._dataset_name} into {self.root!r} (offline? {err}). Copy the extracted "
                    "dataset there, or run once with network access"
                ) from err
        else:
            self._open(train=True)

    def _transform(self, training: bool) -> Any:
        from timm.data.transforms import str_to_interp_mode
        from torchvision import transforms as T

        config = self.data_config
        steps: list[Any] = []
        if self.image_size != 32:
            steps.append(T.Resize(self.image_size, interpolation=str_to_interp_mode(config["interpolation"])))
        if training and self.augment:
            steps += [T.RandomCrop(self.image_size, padding=self.image_size // 8), T.RandomHorizontalFlip()]
        steps += [T.ToTensor(), T.Normalize(config["mean"], config["std"])]
        return T.Compose(steps)

    def setup(self, stage: str | None = None) -> None:
        self.data_config = model_data_config(self, mean=self.mean, std=self.std)
        self.train_set = self._open(train=True, transform=self._transform(training=True))
        self.val_set = self._open(train=False, transform=self._transform(training=False))
        self.test_set = self.val_set  # the official test split, which validation also reports on


class CIFAR10DataModule(_CifarDataModule):
    """CIFAR-10 (10 classes, 32×32; ``image_size`` resizes for ImageNet-pretrained backbones)."""

    _dataset_name = "CIFAR10"
    num_classes = 10


class CIFAR100DataModule(_CifarDataModule):
    """CIFAR-100 (100 classes, 32×32)."""

    _dataset_name = "CIFAR100"
    num_classes = 100
