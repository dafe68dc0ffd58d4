"""The stage policy inside Lightning: real targets, decisions logged and checkpointed, one decision for all ranks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_resode.lit import GradientFidelity, ResodeClassifier, SyntheticDataModule

NARROW = dict(channels=(8, 16, 32, 64), stem_width=8)


def _trainer(root: Path, **kwargs) -> pl.Trainer:
    options = dict(
        default_root_dir=root, max_steps=2, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu",
    )
    options.update(kwargs)
    return pl.Trainer(**options)


class _RecordPolicy(pl.Callback):
    """Each rank writes the methods its stages train with and how many decisions it measured itself."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: ResodeClassifier) -> None:
        policy = pl_module.policy
        record = {"methods": policy.methods(), "measured": len(policy.decisions), "rank": trainer.global_rank}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _model(**kwargs) -> ResodeClassifier:
    return ResodeClassifier("resnet18", num_classes=4, model_kwargs=dict(zero_init_last=False, **NARROW), optimizer="sgd", lr=0.01, scheduler="none", **kwargs)


def test_auto_decides_on_the_first_batch_and_logs_why(tmp_path: Path) -> None:
    model = _model()
    assert {s.method for s in model.policy.stages.values()} == {"block"}  # exact until measured
    trainer = _trainer(tmp_path, logger=pl.loggers.CSVLogger(tmp_path))
    trainer.fit(model, datamodule=SyntheticDataModule(num_classes=4, image_size=16, train_samples=16, batch_size=4))
    decisions = json.loads((Path(trainer.log_dir) / "policy.json").read_text())
    assert [d["stage"] for d in decisions if d["step"] == 0] == ["layer1", "layer2", "layer3", "layer4"]
    assert all(d["reason"] for d in decisions)  # later rows: the recheck after one step, where a method changed
    rows = list(csv.DictReader(open(Path(trainer.log_dir) / "metrics.csv")))
    assert any(row.get("policy/grad_cosine/layer1") for row in rows)
    state = {}
    model.on_save_checkpoint(state)
    fresh = _model()
    fresh.on_load_checkpoint(state)
    assert fresh.policy.methods() == model.policy.methods() and not fresh.policy.due()


def test_ddp_ranks_train_with_rank_zeros_decisions(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, logger=False, strategy="ddp_spawn", devices=2, callbacks=[_RecordPolicy(tmp_path)])
    trainer.fit(_model(), datamodule=SyntheticDataModule(num_classes=4, image_size=16, train_samples=32, batch_size=4))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["methods"] == ranks[1]["methods"]
    assert ranks[0]["measured"] >= 4 and ranks[1]["measured"] == 0  # rank 1 only received the decisions


def test_a_frozen_stage_logs_no_nan_fidelity(tmp_path: Path) -> None:
    model = _model(scheme="euler_fast", freeze=["conv1", "bn1", "layer1"])
    fidelity = GradientFidelity(every_n_steps=1)
    trainer = _trainer(tmp_path, logger=False, callbacks=[fidelity])
    trainer.fit(model, datamodule=SyntheticDataModule(num_classes=4, image_size=16, train_samples=16, batch_size=4))
    assert "layer1" not in fidelity.last_cosines  # nothing trainable there: nothing to measure
    assert all(value == value for value in fidelity.last_cosines.values())  # no NaN
    assert torch.isfinite(torch.tensor(list(fidelity.last_cosines.values()))).all()
