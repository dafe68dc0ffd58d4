"""Training options a timm user expects, each checked on a real Trainer fit: every learning-rate schedule moves
the learning rate, EMA weights are what validation sees and checkpoints keep, channels_last reaches the network,
and the data pipeline takes the model's own data config."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image
from test_lit_callbacks import finished_wandb_records
from timm.data import IMAGENET_DEFAULT_MEAN

from lightning_resode.lit import GradientFidelity, ImageFolderDataModule, MemoryMonitor, ResodeClassifier, SyntheticDataModule
from lightning_resode.lit.ema import ModelEma

LR = 0.1


class _FlatMetric(pl.Callback):
    """Logs a validation metric that never improves, so a plateau schedule must decay on it."""

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("val/flat", 1.0)


def _learning_rates(root: Path, epochs: int = 3, callbacks: list[pl.Callback] | None = None, **options: Any) -> list[float]:
    """The learning rate of every optimizer update of a short fit (2 updates per epoch), as LearningRateMonitor logs it."""
    pl.seed_everything(0)
    model = ResodeClassifier("resnet10t", num_classes=3, stages=[], optimizer="sgd", lr=LR, **options)
    trainer = pl.Trainer(
        default_root_dir=root, max_epochs=epochs, logger=CSVLogger(root, name="csv"), log_every_n_steps=1,
        callbacks=[LearningRateMonitor(logging_interval="step"), *(callbacks or [])], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
    )
    trainer.fit(model, datamodule=SyntheticDataModule(num_classes=3, image_size=16, train_samples=8, val_samples=4, batch_size=4))
    (metrics,) = root.glob("csv/version_*/metrics.csv")
    return [float(row["lr-SGD/pg1"]) for row in csv.DictReader(metrics.open()) if row.get("lr-SGD/pg1")]


@pytest.mark.parametrize("scheduler", ["cosine", "poly", "tanh"])
def test_annealing_schedules_decay_over_a_short_run(scheduler: str, tmp_path: Path) -> None:
    lrs = _learning_rates(tmp_path, scheduler=scheduler)
    assert len(lrs) == 6 and lrs[0] == pytest.approx(LR)
    assert all(b < a for a, b in zip(lrs, lrs[1:]))


def test_step_decays_every_decay_epochs(tmp_path: Path) -> None:
    assert _learning_rates(tmp_path / "a", scheduler="step", decay_epochs=1) == pytest.approx(
        [LR, LR, LR / 10, LR / 10, LR / 100, LR / 100]
    )
    default = _learning_rates(tmp_path / "b", scheduler="step")  # default: every 30 % of the run, not every 90 epochs
    assert default[-1] < default[0]


def test_multistep_decays_at_its_milestones(tmp_path: Path) -> None:
    lrs = _learning_rates(tmp_path / "a", scheduler="multistep", decay_milestones=[1, 2], decay_rate=0.5)
    assert lrs == pytest.approx([LR, LR, LR / 2, LR / 2, LR / 4, LR / 4])
    default = _learning_rates(tmp_path / "b", scheduler="multistep")
    assert default[-1] < default[0]


def test_plateau_warms_up_then_decays_once_per_epoch_on_its_monitored_metric(tmp_path: Path) -> None:
    lrs = _learning_rates(
        tmp_path, scheduler="plateau", plateau_monitor="val/flat", patience_epochs=0, warmup_epochs=1, warmup_lr=0.01,
        callbacks=[_FlatMetric()],
    )
    # epoch 0 warms up from 0.01; epoch 1 trains at lr; the flat metric did not improve after epoch 1: lr / 10
    assert lrs[0] == pytest.approx(0.01) and lrs[0] < lrs[1] < LR
    assert lrs[2:] == pytest.approx([LR, LR, LR / 10, LR / 10])


def test_no_schedule_keeps_the_learning_rate(tmp_path: Path) -> None:
    assert _learning_rates(tmp_path, epochs=2, scheduler="none") == pytest.approx([LR] * 4)


@pytest.mark.parametrize(
    ("options", "named"),
    [({"scheduler": "linear"}, "linear"), ({"decay_epochs": -1.0}, "-1.0"), ({"decay_milestones": [0, 3]}, "0, 3"),
     ({"scheduler": "plateau", "decay_rate": 2.0}, "2.0"), ({"ema_decay": 1.5}, "1.5")],
)
def test_bad_training_options_fail_naming_the_value(options: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ResodeClassifier("resnet10t", **options)


class _Seen(pl.Callback):
    """What the module's weights were after the last training step and during validation."""

    def __init__(self) -> None:
        self.live: dict[str, torch.Tensor] = {}
        self.validated: dict[str, torch.Tensor] = {}

    @staticmethod
    def _weights(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in pl_module.model.named_parameters()}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.live = self._weights(pl_module)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validated = self._weights(pl_module)


def _fit(root: Path, callbacks: list[pl.Callback], **options: Any) -> tuple[pl.Trainer, ResodeClassifier]:
    pl.seed_everything(0)
    model = ResodeClassifier("resnet10t", num_classes=3, optimizer="sgd", lr=0.1, scheduler="none", **options)
    trainer = pl.Trainer(
        default_root_dir=root, max_epochs=1, logger=False, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
    )
    trainer.fit(model, datamodule=SyntheticDataModule(num_classes=3, image_size=16, train_samples=12, val_samples=4, batch_size=4))
    return trainer, model


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_weights_are_validated_and_checkpointed(tmp_path: Path) -> None:
    seen = _Seen()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer, model = _fit(tmp_path, [seen, checkpoint], ema_decay=0.5, freeze=["conv1"], stages=["layer2", "layer3"])
    assert [type(c) for c in trainer.callbacks if isinstance(c, ModelEma)] == [ModelEma]
    assert seen.live and seen.validated and not _equal(seen.live, seen.validated)  # validation saw the average
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)  # our own checkpoint

    def network(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k[len("model.") :]: v for k, v in state.items() if k[len("model.") :] in seen.live}

    assert _equal(network(saved["state_dict"]), seen.validated)  # the average, what export_timm_weights writes
    assert _equal(network(saved["current_model_state"]), seen.live)  # the live weights, for resuming
    assert _equal(_Seen._weights(model), seen.validated)  # fit ends holding the average


def test_channels_last_reaches_the_network(tmp_path: Path) -> None:
    formats: dict[str, list[bool]] = {"input": [], "layer2": []}

    class _Formats(pl.Callback):
        def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            network = pl_module.model
            assert network.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
            for name, module in (("input", network), ("layer2", network.layer2)):
                module.register_forward_pre_hook(
                    lambda _, args, name=name: formats[name].append(args[0].is_contiguous(memory_format=torch.channels_last))
                )

    _, model = _fit(tmp_path, [_Formats()], channels_last=True, stages=["layer2"])
    assert len(formats["input"]) >= 4 and all(formats["input"])  # 3 training steps, 1 validation batch (and checks)
    assert len(formats["layer2"]) >= 4 and all(formats["layer2"])  # the adjoint stage runs on channels_last activations
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _image_folder(root: Path) -> Path:
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (20, 20), color=(60 * i, 80, 120)).save(root / split / label / f"{i}.png")
    return root


def _normalize(transform: Any) -> Any:
    return next(t for t in transform.transforms if type(t).__name__ == "Normalize")


def test_image_folder_takes_the_model_data_config_unless_overridden(tmp_path: Path) -> None:
    overlay = {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "interpolation": "bilinear", "crop_pct": 0.5}
    model = ResodeClassifier("resnet10t", num_classes=2, stages=[], model_kwargs={"pretrained_cfg_overlay": overlay})
    data = ImageFolderDataModule(str(_image_folder(tmp_path / "images")), image_size=16, batch_size=2, num_workers=0)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)
    for dataset in (data.train_set, data.val_set):
        normalize = _normalize(dataset.transform)
        assert normalize.mean.tolist() == pytest.approx(overlay["mean"]) and normalize.std.tolist() == pytest.approx(overlay["std"])
    resize = data.val_set.transform.transforms[0]  # eval: resize to 16 / crop_pct = 32, then centre-crop 16
    assert resize.size == 32 and resize.interpolation.value == "bilinear"
    assert data.val_set[0][0].shape == (3, 16, 16)

    # an explicit setting wins over the model's; without a model, timm's defaults
    explicit = ImageFolderDataModule(str(tmp_path / "images"), image_size=16, mean=(0.5, 0.5, 0.5), num_workers=0)
    explicit.trainer = trainer
    explicit.setup("fit")
    normalize = _normalize(explicit.val_set.transform)
    assert normalize.mean.tolist() == pytest.approx([0.5] * 3) and normalize.std.tolist() == pytest.approx(overlay["std"])
    alone = ImageFolderDataModule(str(tmp_path / "images"), num_workers=0)
    alone.setup("fit")
    assert alone.data_config["mean"] == IMAGENET_DEFAULT_MEAN and alone.data_config["input_size"] == (3, 224, 224)


def test_per_stage_rows_land_in_a_wandb_table(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = ResodeClassifier("resnet10t", num_classes=3, stages=["layer2", "layer3"], scheduler="none")
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="tables")
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_steps=2, logger=[CSVLogger(tmp_path, name="csv"), wandb_logger],
        callbacks=[GradientFidelity(every_n_steps=1, sample_images=2), MemoryMonitor(every_n_steps=1)],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(model, datamodule=SyntheticDataModule(num_classes=3, image_size=16, train_samples=8, batch_size=4))
    wandb_logger.experiment.finish()
    finished_wandb_records(tmp_path)  # W&B may still be writing after finish()

    def rows(key: str) -> list[dict]:
        tables = sorted(tmp_path.glob(f"wandb/offline-run-*/files/media/table/{key}_*.table.json"))
        assert tables, f"no W&B table {key}"
        seen = {}
        for path in tables:  # incremental: each file holds the rows of one check
            table = json.loads(path.read_text())
            for values in table["data"]:
                row = dict(zip(table["columns"], values))
                seen[(row["step"], row["stage"])] = row
        return list(seen.values())

    (metrics,) = tmp_path.glob("csv/version_*/metrics.csv")
    steps = sorted({int(r["step"]) for r in csv.DictReader(metrics.open()) if r.get("adjoint/grad_cosine")})
    assert len(steps) == 2  # the rows carry the step the CSV log gives the same measurements
    fidelity = rows("adjoint/stages")
    assert sorted((r["step"], r["stage"]) for r in fidelity) == [(s, n) for s in steps for n in ("layer2", "layer3")]
    assert all(0.9 < r["grad_cosine"] <= 1.0 + 1e-6 and r["fallback"] is False for r in fidelity)
    memory = rows("mem/stages")
    assert [r["step"] for r in memory] == steps and all(r["activations_mib"] < r["activations_backprop_mib"] for r in memory)


def test_compile_trains_the_network_in_place_with_the_same_keys(tmp_path: Path) -> None:
    seen: list[float] = []

    class _Loss(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            seen.append(float(outputs["loss"]))

    pl.seed_everything(0)
    options = dict(model_kwargs={"channels": [8, 16, 16, 16], "stem_width": 8}, optimizer="sgd", lr=0.1, scheduler="none")
    model = ResodeClassifier("resnet18", num_classes=3, compile="aot_eager", **options)
    plain_keys = list(ResodeClassifier("resnet18", num_classes=3, **options).state_dict())
    assert model.model._compiled_call_impl is not None and list(model.state_dict()) == plain_keys
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=1, logger=False, callbacks=[_Loss()], enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=SyntheticDataModule(num_classes=3, image_size=32, train_samples=16, val_samples=4, batch_size=8))
    assert len(seen) == 2 and all(torch.isfinite(torch.tensor(seen)))
    assert model.policy is not None and model.policy.decisions  # calibrated (eagerly) inside the compiled model
    with pytest.raises(ValueError, match=r"unknown torch.compile backend 'nope'; valid: \["):
        ResodeClassifier("resnet18", num_classes=3, compile="nope", **options)
