"""Two gloo processes of a plain PyTorch DDP-style loop (gradients all-reduced by hand) whose policy is wired as
``ResodeClassifier.setup`` wires it: rank 0 decides, the others receive. Rank 1's first batch has a NaN pixel.
Run by ``tests/test_ddp.py``: ``python tests/ddp_policy_nan_batch.py PORT OUT_DIR``; each rank writes its methods.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_resode import policy_of, to_adjoint


def _rank(rank: int, port: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = to_adjoint(timm.create_model("resnet18", num_classes=5, channels=(8, 16, 32, 64), stem_width=8).train(), recheck_every=0)
    policy = policy_of(model)
    policy.leader = rank == 0

    def broadcast(settings):  # noqa: ANN001, ANN202
        box = [settings]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    policy.sync = broadcast
    failure = None
    for step in range(3):
        torch.manual_seed(100 + step + rank)
        images, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
        if rank == 1 and step == 0:
            images[0, 0, 0, 0] = float("nan")
        try:
            torch.nn.functional.cross_entropy(model(images), targets).backward()
        except ValueError as err:  # a clear refusal is fine; a rank left waiting in a collective is not
            failure = str(err)
            break
        for parameter in model.parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
    methods = {name: stage.method for name, stage in policy.stages.items()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({"methods": methods, "failure": failure}, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(_rank, args=(sys.argv[1], sys.argv[2]), nprocs=2)
