"""The training loader resumes mid-epoch exactly: same batches, same augmentation, whatever the workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_resode.cli import main
from lightning_resode.lit import ImageFolderDataModule

from test_resume import _losses


def _folder(root: Path, per_class: int = 12) -> Path:
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (20, 20, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def _epoch(data: ImageFolderDataModule, epoch: int, state: dict | None = None) -> list[torch.Tensor]:
    loader = data.train_dataloader()
    if state is not None:
        loader.load_state_dict(state)
    loader.sampler.set_epoch(epoch)
    return [images for images, _ in loader]


def test_augmented_batches_do_not_depend_on_workers_or_where_the_epoch_resumed(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    options = dict(image_size=16, batch_size=4, auto_augment="rand-m9-mstd0.5", re_prob=0.5)
    torch.manual_seed(0)
    single = ImageFolderDataModule(str(root), num_workers=0, **options)
    single.setup("fit")
    reference = _epoch(single, epoch=1)
    assert len(reference) == 6
    assert not torch.equal(reference[0], _epoch(single, epoch=2)[0])  # the augmentation does change per epoch

    workers = ImageFolderDataModule(str(root), num_workers=2, **options)
    workers.setup("fit")
    seed = single.train_dataloader().state_dict()["seed"]
    for got, expected in zip(_epoch(workers, epoch=1), reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    resumed = _epoch(workers, epoch=1, state={"epoch": 1, "batches": 4, "seed": seed})
    assert len(resumed) == 2
    for got, expected in zip(resumed, reference[4:], strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.slow  # three CLI runs with worker processes (~15 s on 2 idle cores)
def test_sigterm_resume_with_augmenting_workers_reproduces_every_loss(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images")
    base = [
        "fit", "--config", "recipes/quickstart.yaml", "--logging.wandb=false", "--trainer.enable_progress_bar=false",
        "--model.model_name=resnet10t", "--data=ImageFolderDataModule", f"--data.init_args.root={root}",
        "--data.init_args.image_size=16", "--data.init_args.batch_size=4", "--data.init_args.num_workers=2",
        "--data.init_args.auto_augment=rand-m9-mstd0.5", "--data.init_args.re_prob=0.5",
        "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1",
        "--trainer.max_epochs=2", "--memory.every_n_steps=50", "--fidelity.every_n_steps=50",
    ]
    main([*base, f"--trainer.default_root_dir={tmp_path / 'straight'}"])
    with pytest.raises(SystemExit):
        main([*base, f"--trainer.default_root_dir={tmp_path / 'resumed'}", "--trainer.callbacks+=faults.SignalAtStep",
              "--trainer.callbacks.step=8"])
    main([*base, f"--trainer.default_root_dir={tmp_path / 'resumed'}", "--ckpt_path=last"])
    expected = _losses(tmp_path / "straight")
    assert len(expected) == 12 and _losses(tmp_path / "resumed") == expected
