"""GPU check of the engine's contracts: what the CPU tests check, on CUDA, under bf16 autocast and channels_last.

For a timm ResNet with large residual branches (``zero_init_last=False``, as normally trained checkpoints), on
one GPU:

- gradient cosine of each method (``block``, ``block_fp16``, ``euler_fast``, the default ``auto``) against plain
  timm on the same weights and batch;
- ``torch.func.functional_call`` with values that differ from the module's own: the gradient of every passed
  tensor against the same values loaded into the model;
- two backwards through one forward (``retain_graph=True``) against one backward of the summed losses;
- ``torch.autograd.graph.save_on_cpu(pin_memory=True)`` around the forward of the default's ``block_fp16``:
  peak ``torch.cuda.max_memory_allocated`` and step time with and without offloading what the stages keep.

Writes ``gpu_engine_check.json`` and prints one line per check. ``--dry-run`` runs it on the CPU with a tiny
model (a test keeps it working on machines without a GPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import timm
import torch
from torch import nn
from torch.func import functional_call

from lightning_resode import to_adjoint
from lightning_resode.convert import policy_of


def _flat(grads) -> torch.Tensor:  # noqa: ANN001
    return torch.cat([g.flatten().double() for g in grads])


def _cosine(a, b) -> float:  # noqa: ANN001
    return float(torch.nn.functional.cosine_similarity(_flat(a), _flat(b), dim=0))


class Check:
    def __init__(self, model_name: str, size: int, batch: int, device: str, bf16: bool, channels_last: bool, **model_kwargs: object) -> None:
        self.device, self.bf16 = device, bf16
        torch.manual_seed(0)
        self.plain = timm.create_model(model_name, num_classes=10, zero_init_last=False, **model_kwargs).to(device).train()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.plain = self.plain.to(memory_format=self.memory_format)
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, 3, size, size, generator=gen).to(device).contiguous(memory_format=self.memory_format)
        self.y = torch.randint(0, 10, (batch,), generator=gen).to(device)

    def autocast(self):  # noqa: ANN201
        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16)

    def loss(self, model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
        with self.autocast():
            out = model(self.x if x is None else x)
        return torch.nn.functional.cross_entropy(out.float(), self.y)

    def grads(self, model: nn.Module) -> list[torch.Tensor]:
        torch.manual_seed(0)
        return list(torch.autograd.grad(self.loss(model), list(model.parameters())))

    def converted(self, method: str) -> nn.Module:
        model = to_adjoint(copy.deepcopy(self.plain), scheme=method, check=False)
        if method == "auto":
            policy = policy_of(model)
            policy.calibrate(model, (self.x[:16], self.y[:16]))
            policy.external = True  # fixed decisions while measuring
        return model.train()

    def method_cosines(self) -> dict[str, object]:
        exact = self.grads(self.plain)
        result: dict[str, object] = {}
        for method in ("block", "block_fp16", "euler_fast", "auto"):
            model = self.converted(method)
            try:
                result[method] = round(_cosine(self.grads(model), exact), 6)
            except RuntimeError as err:  # a reconstruction that refuses on these weights
                result[method] = f"{type(err).__name__}"
            if method == "auto":
                result["auto_methods"] = policy_of(model).methods()
        return result

    def functional_call_agrees(self) -> float:
        model = self.converted("block_fp16")
        gen = torch.Generator().manual_seed(2)
        values = {
            k: (v.detach() * (1 + 0.05 * torch.randn(v.shape, generator=gen).to(v.device))).requires_grad_()
            for k, v in model.named_parameters()
        }
        torch.manual_seed(0)
        with self.autocast():
            out = functional_call(model, values, (self.x,))
        got = torch.autograd.grad(torch.nn.functional.cross_entropy(out.float(), self.y), list(values.values()))
        loaded = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in loaded.named_parameters():
                p.copy_(values[name])
        return _cosine(got, self.grads(loaded))

    def retain_graph_agrees(self) -> float:
        model = self.converted("block_fp16")
        with self.autocast():
            out = model(self.x).float()
        torch.nn.functional.cross_entropy(out, self.y).backward(retain_graph=True)
        out.square().mean().backward()
        separate = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        with self.autocast():
            out = model(self.x).float()
        (torch.nn.functional.cross_entropy(out, self.y) + out.square().mean()).backward()
        return _cosine(separate, [p.grad for p in model.parameters()])

    def offload(self, steps: int = 5) -> dict[str, float | None]:
        model = self.converted("block_fp16")
        result: dict[str, float | None] = {}
        times: dict[str, list[float]] = {"kept": [], "offloaded": []}
        for _ in range(steps):
            for mode in ("kept", "offloaded"):
                model.zero_grad(set_to_none=True)
                if self.device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                start = time.perf_counter()
                if mode == "offloaded":
                    with torch.autograd.graph.save_on_cpu(pin_memory=self.device == "cuda"):
                        loss = self.loss(model)
                else:
                    loss = self.loss(model)
                loss.backward()
                if self.device == "cuda":
                    torch.cuda.synchronize()
                    result[f"{mode}_peak_mib_per_image"] = (torch.cuda.max_memory_allocated() - base) / 2**20 / len(self.x)
                times[mode].append(time.perf_counter() - start)
        result["offloaded_time_ratio"] = statistics.median(o / k for o, k in zip(times["offloaded"][1:], times["kept"][1:])) if steps > 1 else None
        return result


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_engine_check_out"))
    parser.add_argument("--dry-run", action="store_true", help="CPU smoke run: tiny model, 64x64")
    args = parser.parse_args(argv)
    if args.dry_run:
        check = Check("resnet18", 64, 8, "cpu", bf16=False, channels_last=False, channels=(8, 16, 16, 16), stem_width=8)
    else:
        check = Check("resnet50", 224, 32, "cuda", bf16=True, channels_last=True)
    report: dict[str, object] = {"device": torch.cuda.get_device_name() if check.device == "cuda" else "cpu", "torch": torch.__version__}
    for name, run in (
        ("method_cosines", check.method_cosines),
        ("functional_call_cosine", check.functional_call_agrees),
        ("retain_graph_cosine", check.retain_graph_agrees),
        ("save_on_cpu", lambda: check.offload(2 if args.dry_run else 5)),
    ):
        start = time.perf_counter()
        report[name] = run()
        print(f"{name}: {report[name]}  ({time.perf_counter() - start:.1f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_engine_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
