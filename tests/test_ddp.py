"""Real DDP (Lightning, gloo, 2 CPU processes) training a tiny timm ResNet whose stages are adjoint stages.

This file is also the training script: the test runs ``python tests/test_ddp.py --out DIR`` in a subprocess,
and Lightning's subprocess launcher starts the second rank by re-running the same command, exactly as
``lightning-resode fit --trainer.strategy=ddp`` does on a cluster node. Each rank writes what it saw
(its batch indices, the synchronised gradients of the first step, its parameters at the end); the test
compares those with a single process computing the same global batch.

DDP's gradient is the mean of the per-rank gradients, with BatchNorm statistics per device. So the exact
single-process reference is: same weights, the global batch cut into the ranks' shards, one forward per
shard, loss / world_size, gradients accumulated. For the GroupNorm network (no batch statistics) that is
also the plain full-batch gradient, which the test checks too.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from lightning_resode import AdjointSequential

WORLD_SIZE = 2
BATCH_PER_RANK = 4
STEPS = 3
IMAGE = 32
NUM_CLASSES = 5


# ---------------------------------------------------------------------------------------------- the model
def _tiny_resnet(norm: str) -> nn.Module:
    """A timm ResNet (BasicBlock, two blocks per stage) with very few channels: real timm blocks, fast on CPU."""
    norm_layer = nn.BatchNorm2d if norm == "batch" else partial(timm.layers.GroupNorm, num_groups=4)
    return timm.models.resnet.ResNet(
        timm.models.resnet.BasicBlock,
        layers=(2, 2, 2, 2),
        channels=(8, 8, 16, 16),
        stem_width=8,
        num_classes=NUM_CLASSES,
        norm_layer=norm_layer,
        zero_init_last=False,
    )


def _convert(model: nn.Module) -> nn.Module:
    """Swap the residual stages for adjoint stages: the project's converter when it is there, else by hand."""
    try:
        from lightning_resode.convert import to_adjoint
    except ImportError:
        to_adjoint = None
    if to_adjoint is not None:
        model = to_adjoint(model, scheme="euler_fast", check=False)  # fixed methods: DDP mechanics, not the policy
    else:
        for name in ("layer1", "layer2", "layer3", "layer4"):
            layer = getattr(model, name)
            head = 1 if layer[0].downsample is not None else 0
            setattr(model, name, AdjointSequential(list(layer), "euler_fast", exact_head=head, name=name))
    # one stage on the exact checkpoint path, so both recomputing backwards run under DDP
    model.layer4.configure(gradient="checkpoint")
    return model


class TwoNets(nn.Module):
    """A BatchNorm ResNet and a GroupNorm ResNet on the same images; the loss is the sum of both."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_net = _convert(_tiny_resnet("batch"))
        self.gn_net = _convert(_tiny_resnet("group"))

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cross_entropy = nn.functional.cross_entropy
        return cross_entropy(self.bn_net(images), labels) + cross_entropy(self.gn_net(images), labels)

    def stages(self) -> dict[str, AdjointSequential]:
        return {name: m for name, m in self.named_modules() if isinstance(m, AdjointSequential)}


def _dataset(size: int = WORLD_SIZE * BATCH_PER_RANK * STEPS) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(1234)
    images = torch.randn(size, 3, IMAGE, IMAGE, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (size,), generator=gen)
    return torch.utils.data.TensorDataset(torch.arange(size), images, labels)


# ---------------------------------------------------------------------------------------------- the worker
def _train(out: Path) -> None:
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_resode.lit.distributed import validate_distributed

    torch.set_num_threads(1)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TwoNets()
            self.record: dict[str, object] = {"grads": None, "indices": []}

        def setup(self, stage: str) -> None:
            validate_distributed(self.trainer, self)

        def on_train_start(self) -> None:
            if self.global_rank == 0:
                torch.save({k: v.detach().clone() for k, v in self.net.state_dict().items()}, out / "init.pt")

        def training_step(self, batch, batch_idx):
            indices, images, labels = batch
            self.record["indices"].append(indices.tolist())
            return self.net.loss(images, labels)

        def on_before_optimizer_step(self, optimizer) -> None:
            # DDP has all-reduced the gradients by now: this is what the optimizer applies
            if self.record["grads"] is None:
                self.record["grads"] = {n: p.grad.detach().clone() for n, p in self.net.named_parameters()}
                self.record["reports"] = {n: s.last_backward for n, s in self.net.stages().items()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2)

    L.seed_everything(0, workers=True)
    module = Module()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy=DDPStrategy(find_unused_parameters=False, process_group_backend="gloo"),
        precision="64-true",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=BATCH_PER_RANK, shuffle=False)
    trainer.fit(module, loader)
    torch.save(
        {
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "indices": module.record["indices"],
            "grads": module.record["grads"],
            "reports": {n: (r.gradient, r.block_forwards) for n, r in module.record["reports"].items()},
            "params": {n: p.detach().clone() for n, p in module.net.named_parameters()},
        },
        out / f"rank{trainer.global_rank}.pt",
    )


# ---------------------------------------------------------------------------------------------- the test
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reference_grads(init_state: dict, shards: list[list[int]], sharded: bool) -> dict[str, torch.Tensor]:
    """Single-process gradient of the global batch, per-device BatchNorm (sharded) or one forward (not)."""
    net = TwoNets().double()
    net.load_state_dict(init_state)
    net.train()
    _, images, labels = _dataset().tensors
    groups = shards if sharded else [[i for shard in shards for i in shard]]
    for group in groups:
        index = torch.tensor(group)
        (net.loss(images[index], labels[index]) * len(group) / sum(map(len, shards))).backward()
    return {n: p.grad for n, p in net.named_parameters()}


def test_ddp_gloo_two_processes_matches_single_process(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
    }
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "SLURM_JOB_ID", "SLURM_NTASKS"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "mark a variable ready only once" not in log

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    init_state = torch.load(tmp_path / "init.pt")
    assert [r["world_size"] for r in ranks] == [WORLD_SIZE] * WORLD_SIZE
    assert [r["global_step"] for r in ranks] == [STEPS] * WORLD_SIZE

    # the ranks saw disjoint shards of the dataset (Lightning's DistributedSampler): their union is the
    # global batch of the first step
    shards = [r["indices"][0] for r in ranks]
    assert [len(shard) for shard in shards] == [BATCH_PER_RANK] * WORLD_SIZE
    assert len({i for shard in shards for i in shard}) == WORLD_SIZE * BATCH_PER_RANK

    # every stage took its recomputing backward on every rank (none fell back to plain autograd)
    for r in ranks:
        assert r["reports"]["bn_net.layer2"][0] == "adjoint" and r["reports"]["bn_net.layer2"][1] > 0
        assert r["reports"]["gn_net.layer4"][0] == "checkpoint"
        assert all(block_forwards > 0 for _, block_forwards in r["reports"].values())

    # gradients of step 1 equal the single-process gradients of the same global batch
    sharded = _reference_grads(init_state, shards, sharded=True)
    full = _reference_grads(init_state, shards, sharded=False)
    names = list(sharded)
    assert set(ranks[0]["grads"]) == set(names)
    for r in ranks:
        for name in names:
            torch.testing.assert_close(r["grads"][name], sharded[name], rtol=1e-9, atol=1e-12, msg=name)
    for name in (n for n in names if n.startswith("gn_net.")):
        torch.testing.assert_close(ranks[0]["grads"][name], full[name], rtol=1e-9, atol=1e-12, msg=name)

    # parameters moved, and stayed bit-identical across ranks
    moved = [n for n in names if not torch.equal(ranks[0]["params"][n], init_state[n])]
    assert len(moved) == len(names)
    for name in names:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name


@pytest.mark.slow
def test_torchrun_launcher_trains_the_quickstart_recipe_and_resumes(tmp_path: Path) -> None:
    """scripts/launch_torchrun.sh end to end: torchrun, 2 CPU processes, the real CLI, then a resume."""
    repo = Path(__file__).resolve().parents[1]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "RANK", "WORLD_SIZE"))},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "NPROC_PER_NODE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
    }
    root = tmp_path / "run"
    common = [
        "--trainer.accelerator=cpu", f"--trainer.default_root_dir={root}", "--trainer.limit_val_batches=1",
        "--trainer.deterministic=false", "--logging.wandb=false",
    ]
    for max_steps, extra in ((2, []), (4, ["--ckpt_path", "last"])):
        proc = subprocess.run(
            ["bash", str(repo / "scripts" / "launch_torchrun.sh"), str(repo / "recipes" / "quickstart.yaml"),
             *common, f"--trainer.max_steps={max_steps}", *extra],
            env={**env, "MASTER_PORT": str(_free_port())}, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-6000:]
        assert "mark a variable ready only once" not in log
        checkpoint = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert checkpoint["global_step"] == max_steps


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    _train(parser.parse_args().out)


def test_a_nan_batch_on_one_rank_leaves_every_rank_in_step_with_rank_zeros_decisions(tmp_path: Path) -> None:
    """Found by a new-user review: a rank that skipped the calibration for its NaN batch alone left rank 0 in the
    broadcast of the decisions, and the run died. No rank skips alone: both finish with rank 0's methods."""
    script = Path(__file__).with_name("ddp_policy_nan_batch.py")
    result = subprocess.run(
        [sys.executable, str(script), str(_free_port()), str(tmp_path)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["failure"] is None, ranks
