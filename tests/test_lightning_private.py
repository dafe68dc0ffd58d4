"""Each Lightning internal lightning-resode relies on still exists and still means what we use it for.

These run a real Trainer. A failure here means a Lightning upgrade changed an internal: update
lightning_resode/lit/_lightning_private.py (the only module that touches them), not the callers.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_resode.lit._lightning_private import (
    LightningInternalsChanged,
    _internal,
    averaged_model,
    forget_train_loader,
    logging_step,
    optimizer_stepped_on_this_batch,
    quiet_wandb_init,
    request_stop_after_batch,
    sync_batchnorm_requested,
    train_loaders,
)


def _trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
    )
    return L.Trainer(**{**defaults, **kwargs})


class _LoggedModel(BoringModel):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.log("probe", float(batch_idx), on_step=True, on_epoch=False)
        return super().training_step(batch, batch_idx)


class _RecordStep(L.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.steps.append(logging_step(trainer))


def test_logging_step_is_the_step_lightning_logs_the_same_batch_at(tmp_path: Path) -> None:
    recorder = _RecordStep()
    trainer = _trainer(
        tmp_path, logger=CSVLogger(tmp_path, name="", version=""), log_every_n_steps=1, max_steps=5,
        limit_val_batches=0, accumulate_grad_batches=1, callbacks=[recorder],
    )
    trainer.fit(_LoggedModel())
    with open(tmp_path / "metrics.csv") as f:
        logged = {int(float(row["probe"])): int(row["step"]) for row in csv.DictReader(f) if row.get("probe")}
    assert recorder.steps == [logged[batch] for batch in range(5)], (
        "logging_step() no longer matches the step Lightning gives self.log metrics of the same batch: "
        f"{recorder.steps} vs {logged}; update lightning_resode/lit/_lightning_private.py"
    )


class _StopAt(L.Callback):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.batch:
            request_stop_after_batch(trainer)
            assert trainer.received_sigterm, "request_stop_after_batch() no longer sets trainer.received_sigterm"


def test_request_stop_after_batch_stops_like_sigterm_once_the_batch_is_done(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=10, limit_val_batches=0, callbacks=[_StopAt(3)])
    with pytest.raises(SIGTERMException):
        trainer.fit(BoringModel())
    assert trainer.global_step == 4, (
        f"after a stop requested during batch 3, Lightning ran {trainer.global_step} optimizer steps (want 4: the "
        "batch finishes, then it stops); update lightning_resode/lit/_lightning_private.py"
    )


def test_sync_batchnorm_requested_reads_the_trainer_flag(tmp_path: Path) -> None:
    assert sync_batchnorm_requested(_trainer(tmp_path, devices=2, strategy="ddp", sync_batchnorm=True))
    assert not sync_batchnorm_requested(_trainer(tmp_path, devices=2, strategy="ddp"))
    # one device: Lightning ignores the flag, and so do we
    assert not sync_batchnorm_requested(_trainer(tmp_path, devices=1, sync_batchnorm=True))


class _RecordStepped(L.Callback):
    def __init__(self) -> None:
        self.stepped: list[bool] = []
        self.loaders: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.stepped.append(optimizer_stepped_on_this_batch(trainer))
        self.loaders.append(len(train_loaders(trainer)))


def test_optimizer_stepped_on_this_batch_follows_gradient_accumulation(tmp_path: Path) -> None:
    recorder = _RecordStepped()
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=7, limit_val_batches=0, accumulate_grad_batches=3,
                       callbacks=[recorder])
    trainer.fit(BoringModel())
    # windows of 3 micro-batches, and the epoch's last batch steps too
    assert recorder.stepped == [False, False, True, False, False, True, True], recorder.stepped
    assert recorder.loaders == [1] * 7 and trainer.global_step == 3


def test_a_forgotten_train_loader_is_built_again_by_the_fit_loop(tmp_path: Path) -> None:
    built: list[int] = []

    class _Model(BoringModel):
        def train_dataloader(self) -> Any:
            built.append(1)
            return super().train_dataloader()

        def configure_optimizers(self) -> Any:
            assert not train_loaders(self.trainer)
            self.trainer.fit_loop.setup_data()
            assert len(train_loaders(self.trainer)) == 1
            forget_train_loader(self.trainer)
            return super().configure_optimizers()

    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(_Model())
    assert len(built) == 2 and trainer.global_step == 2


def test_a_missing_internal_names_itself_and_what_it_was_for() -> None:
    with pytest.raises(LightningInternalsChanged, match=r"private object\._gone to do a thing.*lightning \d"):
        _internal(object(), "_gone", "do a thing")


def test_quiet_wandb_init_leaves_out_only_the_anonymous_argument(tmp_path: Path) -> None:
    logger = WandbLogger(save_dir=str(tmp_path), project="probe", offline=True)
    quiet_wandb_init(logger)
    arguments = logger._wandb_init
    assert "anonymous" not in arguments and arguments["project"] == "probe" and arguments["dir"] == str(tmp_path), (
        "WandbLogger no longer keeps wandb.init's arguments in _wandb_init; update lightning_resode/lit/_lightning_private.py"
    )


def test_averaged_model_is_what_weight_averaging_validates_with(tmp_path: Path) -> None:
    from torch.optim.swa_utils import AveragedModel

    ema = EMAWeightAveraging(decay=0.5)
    assert averaged_model(ema) is None
    _trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[ema]).fit(BoringModel())
    assert isinstance(averaged_model(ema), AveragedModel), (
        "EMAWeightAveraging no longer keeps its AveragedModel in _average_model; update "
        "lightning_resode/lit/_lightning_private.py"
    )


def _class_sources(module: Any) -> dict[str, str]:
    """Top-level class name -> its source text, parsed from the module's file."""
    import ast

    text = Path(module.__file__).read_text()
    return {
        node.name: ast.get_source_segment(text, node) or ""
        for node in ast.parse(text).body
        if isinstance(node, ast.ClassDef)
    }


def _lightning_private_uses() -> dict[tuple[str, str], str]:
    """(Lightning class, private method) -> where a lightning-resode subclass overrides or calls it."""
    import importlib
    import inspect
    import pkgutil
    import re

    import lightning_resode

    uses: dict[tuple[str, str], str] = {}
    for info in pkgutil.walk_packages(lightning_resode.__path__, "lightning_resode."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for cls in [c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == module.__name__]:
            bases = [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] == "lightning"]
            # the class's text from its own file (inspect.getsource goes through linecache, which another test's
            # reload or a stale cache can leave pointing at other text); overrides are found in vars(cls) anyway
            source = _class_sources(module).get(cls.__qualname__, "")
            names = set(vars(cls)) | set(re.findall(r"(?:self|super\(\))\.(_[a-z]\w*)\(", source))
            for name in sorted(n for n in names if n.startswith("_") and not n.startswith("__") and not n.startswith("_abc")):
                owner = next((b for b in bases if name in vars(b)), None)
                if owner is not None:
                    uses[(f"{owner.__module__}.{owner.__qualname__}", name)] = f"{cls.__module__}.{cls.__qualname__}"
    return uses


def test_every_lightning_private_method_we_override_or_call_is_listed_with_why() -> None:
    from lightning_resode.lit._lightning_private import LIGHTNING_PRIVATE_METHODS

    unlisted = {key: where for key, where in _lightning_private_uses().items() if key not in LIGHTNING_PRIVATE_METHODS}
    assert not unlisted, (
        f"these subclasses override or call Lightning private methods not listed in "
        f"lit/_lightning_private.LIGHTNING_PRIVATE_METHODS (add each with its parameters and why): {unlisted}"
    )


def test_the_lightning_private_methods_we_rely_on_still_exist_with_the_same_parameters() -> None:
    import importlib
    import inspect

    from lightning_resode.lit._lightning_private import LIGHTNING_PRIVATE_METHODS

    for (qualified, name), (parameters, why) in LIGHTNING_PRIVATE_METHODS.items():
        module_name, _, class_name = qualified.rpartition(".")
        owner = getattr(importlib.import_module(module_name), class_name)
        assert name in vars(owner), f"Lightning's {qualified} no longer has {name} (we need it: {why})"
        got = tuple(inspect.signature(getattr(owner, name)).parameters)
        assert got == parameters, f"Lightning's {qualified}.{name} now takes {got}, not {parameters} (we need it: {why})"
