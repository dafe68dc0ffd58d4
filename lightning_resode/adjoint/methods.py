"""One vocabulary for how a stage computes its gradient: a method name.

A method fixes the engine's ``gradient`` mode, the reconstruction ``scheme`` where there is one, and the
dtype step inputs are stored in. The converter, the auto policy, the CLI (``--model.scheme``), the
fidelity callback and ``diagnose`` all speak these names. Methods are listed from the least activation
memory to the most (what a stage keeps, and what its backward needs on top):

==============  =========================================================  =========================
name            what the stage keeps / does in backward                    gradient
==============  =========================================================  =========================
euler_fast      output only; reconstructs backwards, 1 block forward/block  approximate, O(1/N)
euler           output only; reconstructs backwards, 2 forwards/block      approximate, O(1/N)
heun            output only; a Heun network (not a pretrained Euler one)   approximate, O(1/N²)
block_fp16      each block's input in float16                              input rounding (2^-11)
block_bf16      each block's input in bfloat16 (float32's range)           input rounding (2^-8)
block           each block's input as is                                   exact
checkpoint      stage input; rebuilds the whole stage's graph in backward  exact
backprop        every activation (plain autograd)                          exact
==============  =========================================================  =========================

The reconstruction methods only work on ODE-like stages (small residuals, smooth in depth); normally
trained checkpoints need ``block_*`` on most stages. ``scheme="auto"`` (the converter's default) measures
and picks per stage (``lightning_resode.policy``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .stage import AdjointSequential


@dataclass(frozen=True)
class Method:
    """How one stage computes its gradient."""

    name: str
    gradient: str
    #: reconstruction scheme; None keeps the stage's own (the network it is: Euler for timm, Heun for some ODE ResNets)
    scheme: str | None
    block_dtype: torch.dtype | None
    #: the gradient equals plain backprop's up to float rounding
    exact: bool
    summary: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("euler_fast", "adjoint", "euler_fast", None, False, "reconstruct backwards, 1 block forward per block"),
        Method("euler", "adjoint", "euler", None, False, "reconstruct backwards (the paper's reverse Euler step)"),
        Method("heun", "adjoint", "heun", None, False, "a Heun network, reconstructed backwards"),
        Method("block_fp16", "block", None, torch.float16, False, "each block's input stored in float16"),
        Method("block_bf16", "block", None, torch.bfloat16, False, "each block's input stored in bfloat16"),
        Method("block", "block", None, None, True, "each block's input stored exactly"),
        Method("checkpoint", "checkpoint", None, None, True, "whole-stage checkpoint (stage input only)"),
        Method("backprop", "backprop", None, None, True, "plain autograd"),
    )
}
#: what ``to_adjoint`` and ``--model.scheme`` accept: every method, plus the measured per-stage choice
SCHEME_CHOICES: tuple[str, ...] = ("auto", *METHODS)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown scheme {name!r}; valid: {list(METHODS)}") from None


def method_of(gradient: str, scheme: str, block_dtype: torch.dtype | None) -> str:
    """The method name an engine mode, scheme and stored dtype correspond to."""
    if gradient == "adjoint":
        return scheme
    if gradient == "block":
        return {torch.float16: "block_fp16", torch.bfloat16: "block_bf16"}.get(block_dtype, "block")
    return gradient


def method_name(stage: "AdjointSequential") -> str:
    """The method name a stage's settings correspond to."""
    return method_of(stage.gradient, stage.scheme, stage.block_dtype)
