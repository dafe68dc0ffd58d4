"""A real Trainer fit with every callback and both loggers; the metrics are read back from the real files."""

from __future__ import annotations

import csv
import struct
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch

from lightning_resode import saved_activation_bytes
from lightning_resode.cli import main
from lightning_resode.convert import adjoint_stages
from lightning_resode.lit import GradientFidelity, MemoryMonitor, ReconstructionMonitor, ResodeClassifier, SyntheticDataModule

REQUIRED = {"train/loss", "val/loss", "val/acc", "mem/peak_mib_per_image", "mem/peak_backprop_mib_per_image", "mem/activations_mib", "adjoint/grad_cosine"}


def wandb_records(run_file: Path) -> list:
    """Records of a W&B offline ``.wandb`` file (LevelDB-style log blocks of protobuf ``Record``s)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, block, pending, out = run_file.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pos += 7
        if length == 0 and kind == 0:
            pos += left - 7
            continue
        if pos + length > len(raw):  # the writer has not flushed this record's payload yet
            break
        pending += raw[pos : pos + length]
        pos += length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def finished_wandb_records(root: Path, timeout: float = 120.0) -> list:
    """The records of the one W&B offline run under ``root``, once W&B has written its exit record.

    ``wandb.finish()`` can return while W&B's service process is still writing the run file (on a loaded
    machine, with tables to store), so a test that reads the file right away waits for the run's last record.
    """
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        (run_file,) = root.glob("wandb/offline-run-*/*.wandb")
        try:
            records = wandb_records(run_file)
        except DecodeError:  # read while a record was half written: its length landed before its bytes
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def _key(item: object) -> str:
    return item.key or "/".join(item.nested_key)  # type: ignore[attr-defined]


def csv_columns(root: Path) -> tuple[set[str], list[dict[str, str]]]:
    (metrics,) = root.glob("csv/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    return {k for row in rows for k, v in row.items() if v}, rows


def test_cli_fit_logs_required_metrics_to_csv_and_wandb(tmp_path: Path) -> None:
    main(
        [
            "fit", "--config", "recipes/quickstart.yaml",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
            "--model.model_name=resnet10t", "--memory.every_n_steps=1", "--fidelity.every_n_steps=1", "--data.init_args.batch_size=8",
            "--reconstruction.every_n_steps=1", "--logging.wandb=true", "--logging.run_name=unit",
        ]
    )
    columns, rows = csv_columns(tmp_path)
    assert REQUIRED <= columns, REQUIRED - columns
    assert {"adjoint/grad_cosine/layer1", "adjoint/recon_error/layer2", "mem/activations_backprop_mib"} <= columns
    cosines = [float(r["adjoint/grad_cosine"]) for r in rows if r["adjoint/grad_cosine"]]
    assert len(cosines) == 2 and all(0.9 < c <= 1.0 + 1e-6 for c in cosines)
    activations = [float(r["mem/activations_mib"]) for r in rows if r["mem/activations_mib"]]
    backprop = [float(r["mem/activations_backprop_mib"]) for r in rows if r["mem/activations_backprop_mib"]]
    assert activations and backprop and activations[0] < backprop[0]

    records = finished_wandb_records(tmp_path)
    history = {_key(item) for r in records if r.WhichOneof("record_type") == "history" for item in r.history.item}
    assert REQUIRED <= history, REQUIRED - history
    summary = {_key(u) for r in records if r.WhichOneof("record_type") == "summary" for u in r.summary.update}
    assert {"summary/best_val_acc", "summary/activations_mib_per_image", "summary/backprop_activations_mib_per_image"} <= summary
    config = {_key(u) for r in records if r.WhichOneof("record_type") == "config" for u in r.config.update}
    assert {"trainer", "model", "data", "fidelity"} <= config  # the full CLI config, not only hparams
    metrics = {r.metric.name for r in records if r.WhichOneof("record_type") == "metric"}
    assert {"val/acc", "mem/peak_mib"} <= metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def _fit(
    tmp_path: Path, callbacks: list[pl.Callback], stages: list[str] | None = None, **options
) -> tuple[list[float], ResodeClassifier]:
    pl.seed_everything(0)
    model = ResodeClassifier(
        "resnet10t", num_classes=4, stages=stages, optimizer="sgd", lr=0.05, scheduler="none", **options
    )
    losses: list[float] = []

    class _Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, deterministic=True,
        callbacks=[*callbacks, _Record()],
    )
    data = SyntheticDataModule(num_classes=4, image_size=16, train_samples=16, batch_size=4)
    trainer.fit(model, datamodule=data)
    return losses, model


def test_sampling_callbacks_leave_the_training_trajectory_unchanged(tmp_path: Path) -> None:
    plain, plain_model = _fit(tmp_path / "a", [])
    sampled, sampled_model = _fit(
        tmp_path / "b", [MemoryMonitor(every_n_steps=1), GradientFidelity(every_n_steps=1), ReconstructionMonitor(every_n_steps=1)]
    )
    # The auto policy picks, by a measured peak, between recomputation graphs that compute the same gradient in a
    # different order, so two runs may differ by rounding (a CI run saw 2e-7 at the third loss). A measurement that
    # leaked into training (BatchNorm statistics updated, a gradient left behind) moves them by far more.
    assert plain == pytest.approx(sampled, rel=1e-5)
    for a, b in zip(plain_model.state_dict().values(), sampled_model.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-7)


def test_fidelity_fallback_switches_a_low_cosine_stage_to_exact(tmp_path: Path) -> None:
    fidelity = GradientFidelity(every_n_steps=1, threshold=1.0, fallback=True)
    # top_step_dtype="none": resnet10t's layer1 is one residual block, which the kept top step would recover
    # almost exactly; reversing it keeps the stage's gradient inexact, which the fallback must catch
    _, model = _fit(tmp_path, [fidelity], stages=["layer1"], top_step_dtype="none")
    assert fidelity.switched == ["layer1"]
    assert adjoint_stages(model.model)["layer1"].method == "block"  # exact, per-block inputs


@pytest.mark.parametrize(
    ("callback", "kwargs"),
    [(MemoryMonitor, {"every_n_steps": 0}), (GradientFidelity, {"threshold": 1.5}), (GradientFidelity, {"fallback_method": "euler_fast"})],
)
def test_bad_callback_options_fail_naming_the_value(callback: type, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=str(next(iter(kwargs.values())))):
        callback(**kwargs)


def test_memory_monitor_compares_with_what_plain_timm_backprop_stores(tmp_path: Path) -> None:
    memory = MemoryMonitor(every_n_steps=1)
    _, model = _fit(tmp_path, [memory])
    plain = timm.create_model("resnet10t", num_classes=4).train()
    images = torch.randn(memory.sample_images, 3, 16, 16)
    expected = saved_activation_bytes(plain, lambda: plain(images)) / images.shape[0] / 2**20
    assert memory.backprop_activations_mib == pytest.approx(expected, rel=1e-6)  # stem included
    assert memory.activations_mib < expected
