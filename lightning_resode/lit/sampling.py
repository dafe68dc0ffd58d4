"""A training order that a checkpoint resumes mid-epoch, and augmentation that does not depend on who loads a sample.

- ``ResumableSampler``: the order of an epoch is a function of (seed, epoch) only; each rank takes its slice
  (it is a ``DistributedSampler``, so Lightning does not replace it under DDP), and a resumed epoch skips the
  samples its batches already trained on.
- ``SeededSamples``: every sample is loaded under its own seed, derived from (seed, epoch, index), for the
  torch, NumPy and Python generators transforms draw from. Random crops, flips or RandAugment of a sample are
  then the same whatever the worker, the number of workers, or where in the epoch a run resumed.
- ``ResumableDataLoader``: counts the batches it handed to the training loop and exposes that position
  through ``state_dict`` / ``load_state_dict``, which Lightning stores in every checkpoint and restores
  before the first batch. It builds its iterator at the first batch, after Lightning set the epoch.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset, get_worker_info

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed for one sample of one epoch (a fixed integer hash, the same in every process)."""
    return (seed * _MIX[0] + (epoch + 1) * _MIX[1] + (index + 1) * _MIX[2]) % 2**63


def _reseed(seed: int) -> None:
    torch.default_generator.manual_seed(seed)  # CPU only: CUDA streams (dropout) stay untouched
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the CPU torch, NumPy and Python generators for one sample.

    In the training process (``num_workers=0``) their previous states are put back afterwards, since dropout
    and mixup draw from them; a worker process has nothing else to preserve (and saves ~0.1 ms per sample).
    """
    if get_worker_info() is not None:
        _reseed(seed)
        yield
        return
    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    _reseed(seed)
    try:
        yield
    finally:
        torch.default_generator.set_state(cpu)
        random.setstate(python)
        np.random.set_state(numpy)


class SeededSamples(Dataset):
    """Wraps a dataset; an ``(index, seed)`` key loads ``dataset[index]`` under that seed, a plain index as is.

    Tensors already in memory (``TensorDataset``: digits, synthetic data) draw nothing and skip the seeding.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.seeded = not isinstance(dataset, TensorDataset)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        if not self.seeded:
            return self.dataset[index]
        with _seeded(seed):
            return self.dataset[index]


class ResumableSampler(DistributedSampler):
    """Shuffled (or sequential) order from (seed, epoch); this rank's slice; resumable mid-epoch.

    Yields ``(index, sample_seed)`` keys for ``SeededSamples``. Like ``DistributedSampler``, each rank gets
    ``ceil(size / num_replicas)`` samples (the order is padded by repeating its start).
    """

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.size = size
        self.skip = 0  # samples of this rank's slice of ``self.epoch`` already trained on

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0
        super().set_epoch(epoch)

    def resume(self, epoch: int, skip: int) -> None:
        """Continue ``epoch`` after its first ``skip`` samples (of this rank)."""
        self.epoch, self.skip = epoch, skip

    def order(self) -> list[int]:
        """This rank's indices for the current epoch, before skipping."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        padding = self.total_size - len(order)
        if padding > 0:
            order += (order * math.ceil(padding / max(1, len(order))))[:padding]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        for index in self.order()[self.skip :]:
            yield index, sample_seed(self.seed, epoch, index)


class _CountingIterator:
    """Builds the loader's iterator at the first ``next`` (after ``set_epoch``) and counts what it hands out."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self.inner: Iterator[Any] | None = None

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        loader = self.loader
        if self.inner is None:
            sampler = loader.sampler
            loader._epoch = sampler.epoch  # type: ignore[attr-defined]
            loader._start = sampler.skip // loader.batch_size  # type: ignore[attr-defined,operator]
            loader._delivered = 0
            self.inner = DataLoader.__iter__(loader)
        batch = next(self.inner)
        loader._delivered += 1
        return batch


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a ``ResumableSampler`` whose position Lightning checkpoints and restores."""

    _epoch: int | None = None
    _start = 0
    _delivered = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return _CountingIterator(self)

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        assert isinstance(sampler, ResumableSampler)
        if self._epoch is None:  # not iterated in this process yet
            return {"epoch": sampler.epoch, "batches": sampler.skip // self.batch_size, "seed": sampler.seed}  # type: ignore[operator]
        return {"epoch": self._epoch, "batches": self._start + self._delivered, "seed": sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        assert isinstance(sampler, ResumableSampler)
        sampler.seed = int(state["seed"])
        sampler.resume(int(state["epoch"]), int(state["batches"]) * self.batch_size)  # type: ignore[operator]
        self._epoch = None

    def rewind(self, batches: int) -> None:
        """Forget the last ``batches`` handed out (fetched, not trained): a resume loads them again."""
        self._delivered = max(0, self._delivered - batches)


def resumable_loader(
    dataset: Dataset, batch_size: int, num_workers: int, seed: int, num_replicas: int = 1, rank: int = 0
) -> ResumableDataLoader:
    """The training loader every DataModule of this package uses."""
    sampler = ResumableSampler(len(dataset), seed=seed, num_replicas=num_replicas, rank=rank)  # type: ignore[arg-type]
    return ResumableDataLoader(
        SeededSamples(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        drop_last=sampler.num_samples > batch_size,
        generator=torch.Generator().manual_seed(seed),  # worker base seeds: not drawn from the global stream
    )
