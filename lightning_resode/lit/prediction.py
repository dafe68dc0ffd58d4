"""``predict`` writes what it predicts: top-k classes with names and probabilities, one CSV row per image.

A Lightning ``BasePredictionWriter``: each rank appends its rows to its own part file as batches finish (no
predictions held in memory), and at the end rank 0 merges the parts into one ``predictions.csv`` ordered by
dataset index. Under DDP Lightning gives each rank a disjoint share of the data (no padding duplicates).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

PREDICTIONS_FILE = "predictions.csv"


def _class_names(trainer: pl.Trainer, dataset: Any, num_classes: int) -> list[str]:
    """The DataModule's ``class_names``, else the dataset's ``classes`` (torchvision), else the indices."""
    for source in (getattr(trainer, "datamodule", None), dataset, getattr(getattr(trainer, "datamodule", None), "train_set", None)):
        names = getattr(source, "class_names", None) or getattr(source, "classes", None)
        if isinstance(names, Sequence) and len(names) == num_classes:
            return [str(n) for n in names]
    return [str(i) for i in range(num_classes)]


def _path_of(dataset: Any, index: int) -> str | None:
    """The file behind a dataset index: ``samples`` of torchvision's ``ImageFolder`` and of ``ImageFiles``."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return None
    sample = samples[index]
    return str(sample[0] if isinstance(sample, (tuple, list)) else sample)


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.csv``: index, image path (when the data has files), true label (when known), top-k.

    Columns: ``index``, ``path``, ``target``, ``target_name`` (the last three only when the data has them), then
    ``top1_class``, ``top1_name``, ``top1_prob`` … ``top{k}_prob``.

    Args:
        output: the CSV file; default ``<trainer.default_root_dir>/predictions.csv`` (the run directory).
        top_k: how many classes per image (at most the number of classes).
    """

    def __init__(self, output: str | None = None, top_k: int = 5) -> None:
        super().__init__(write_interval="batch")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.output, self.top_k = output, top_k
        self._part: Path | None = None
        self._handle: Any = None
        self._writer: Any = None
        self._names: list[str] = []
        self._columns: list[str] | None = None
        self._has_path = False
        self.written: Path | None = None

    def _target(self, trainer: pl.Trainer) -> Path:
        return Path(self.output) if self.output else Path(trainer.default_root_dir) / PREDICTIONS_FILE

    def _part_path(self, trainer: pl.Trainer, rank: int) -> Path:
        target = self._target(trainer)
        return target.with_name(f"{target.stem}.rank{rank}.part{target.suffix}")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._part = self._part_path(trainer, trainer.global_rank)
        self._part.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self._part, "w", newline="")
        self._writer = csv.writer(self._handle)
        self._columns, self._names = None, []

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        probs = prediction.detach().float().cpu()
        num_classes = probs.shape[-1]
        k = min(self.top_k, num_classes)
        top_probs, top_classes = probs.topk(k, dim=-1)
        loader = trainer.predict_dataloaders
        loader = loader[dataloader_idx] if isinstance(loader, (list, tuple)) else loader
        dataset = loader.dataset
        targets = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 and torch.is_tensor(batch[1]) else None
        if batch_indices is None:  # only when the loader has no batch sampler; count in order instead
            start = batch_idx * probs.shape[0]
            batch_indices = list(range(start, start + probs.shape[0]))
        if self._columns is None:
            self._names = _class_names(trainer, dataset, num_classes)
            self._has_path = _path_of(dataset, int(batch_indices[0])) is not None
            self._columns = ["index"] + (["path"] if self._has_path else [])
            self._columns += ["target", "target_name"] if targets is not None else []
            for rank in range(1, k + 1):
                self._columns += [f"top{rank}_class", f"top{rank}_name", f"top{rank}_prob"]
            self._writer.writerow(self._columns)
        for row, index in enumerate(batch_indices):
            cells: list[Any] = [int(index)]
            if self._has_path:
                cells.append(_path_of(dataset, int(index)))
            if targets is not None:
                target = int(targets[row])
                cells += [target, self._names[target] if 0 <= target < num_classes else ""]
            for cls, prob in zip(top_classes[row].tolist(), top_probs[row].tolist()):
                cells += [cls, self._names[cls], f"{prob:.6f}"]
            self._writer.writerow(cells)

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        trainer.strategy.barrier("prediction-parts-written")
        if trainer.is_global_zero:
            self.written = self._merge(trainer)
        trainer.strategy.barrier("prediction-parts-merged")

    def _merge(self, trainer: pl.Trainer) -> Path | None:
        parts = [self._part_path(trainer, rank) for rank in range(trainer.world_size)]
        missing = [p for p in parts if not p.is_file()]
        if missing:  # ranks on other nodes without a shared filesystem keep their parts where they wrote them
            rank_zero_warn(
                f"prediction parts {[str(p) for p in missing]} are not visible from rank 0 (no shared filesystem?); "
                f"each rank's predictions stay in its own {parts[0].name.replace('rank0', 'rank<N>')}"
            )
            return None
        header: list[str] | None = None
        rows: list[list[str]] = []
        for part in parts:
            with open(part, newline="") as handle:
                reader = csv.reader(handle)
                part_header = next(reader, None)
                if part_header is None:
                    continue  # a rank that got no data
                header = header or part_header
                rows.extend(reader)
        rows.sort(key=lambda r: int(r[0]))
        target = self._target(trainer)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            if header is not None:
                writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, target)  # atomic: an older predictions.csv is replaced only by a complete one
        for part in parts:
            part.unlink()
        rank_zero_info(f"wrote {len(rows)} predictions to {target}")
        return target
