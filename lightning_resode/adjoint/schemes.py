"""Discretisation schemes: how a stage steps forward, and how it guesses a step's input from its output.

Notation (docs/method.md): blocks b_n, residuals g_n(x) = b_n(x) - x, states x_s. A scheme's forward is a
sequence of steps x_{s+1} = Phi_s(x_s). Its reverse gives a first guess of x_s from x_{s+1}; the engine may
then refine that guess with Richardson iterations x <- x - (Phi_s(x) - x_{s+1}), which converge to the
exact inverse when Phi_s - id is a contraction (small residuals).

``evaluate(n, x, key)`` runs block n at x for the forward evaluation named ``key``, so BatchNorm
statistics and random draws replay those of that evaluation. ``cache`` is what a step's VJP
evaluation leaves behind for the reverse of the step below it (free reuse, no extra block call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Evaluate = Callable[[int, torch.Tensor, Any], torch.Tensor]


def _reflect(x_next: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """2 x_next - y, written over ``y`` when it is a fresh buffer nobody else can see (saves a state of memory)."""
    if y.dtype == x_next.dtype and not y.requires_grad and y.untyped_storage().data_ptr() != x_next.untyped_storage().data_ptr():
        return y.neg_().add_(x_next, alpha=2)
    return 2 * x_next - y


class Scheme:
    """One discretisation: forward steps and their reverse."""

    name: str = ""
    #: block forwards one ``step`` costs (used for cost accounting and documentation)
    evaluations_per_step: int = 1
    #: whether ``reverse`` reads the cache of the step above (else the backward does not keep it)
    uses_cache: bool = True

    def num_steps(self, num_blocks: int) -> int:
        return num_blocks

    def blocks_of_step(self, s: int) -> tuple[int, ...]:
        return (s,)

    def step(self, s: int, x: torch.Tensor, evaluate: Evaluate) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def reverse(self, s: int, x_next: torch.Tensor, cache: Any, evaluate: Evaluate) -> torch.Tensor:
        raise NotImplementedError


class Euler(Scheme):
    """Plain composition x_{s+1} = b_s(x_s); reverse x_s = x_{s+1} - g_s(x_{s+1}) (the paper, as written).

    Backward cost: two block forwards per block (one to reconstruct, one for the VJP).
    Error: O(1/N) in the gradient when residuals are Lipschitz and smooth in depth.
    """

    name = "euler"
    uses_cache = False

    def step(self, s: int, x: torch.Tensor, evaluate: Evaluate) -> tuple[torch.Tensor, Any]:
        out = evaluate(s, x, (s, 0))
        return out, out

    def reverse(self, s: int, x_next: torch.Tensor, cache: Any, evaluate: Evaluate) -> torch.Tensor:
        return _reflect(x_next, evaluate(s, x_next, (s, 0)))


class EulerFast(Euler):
    """Same forward as Euler; reverse x_s = x_{s+1} - g_{s+1}(x_{s+1}) reuses the block above's VJP evaluation.

    The residual of block s+1 stands in for block s's: when weights are smooth in depth they differ by
    O(1/N), so the gradient error stays O(1/N) like Euler's, while the backward needs one block forward per
    block (plus one for the top block): the cost of checkpointing with the memory of the adjoint. Where the
    stage recomputes its steps with lean graphs (``AdjointSequential.lean_graphs``), the top step keeps no cache
    (its VJP then holds one state less) and the step below evaluates its own block: one forward more per stage.
    """

    name = "euler_fast"
    uses_cache = True

    def reverse(self, s: int, x_next: torch.Tensor, cache: Any, evaluate: Evaluate) -> torch.Tensor:
        if cache is None:
            return super().reverse(s, x_next, cache, evaluate)
        return _reflect(x_next, cache)  # cache: block s+1's output at x_{s+1}, from the VJP above


class Heun(Scheme):
    """Explicit trapezoid over pairs of blocks (docs/method.md): N blocks give N - 1 steps.

        y = x_s + g_s(x_s);   x_{s+1} = x_s + 1/2 [g_s(x_s) + g_{s+1}(y)]
    reverse:
        z = x_{s+1} - g_{s+1}(x_{s+1});   x_s = x_{s+1} - 1/2 [g_{s+1}(x_{s+1}) + g_s(z)]

    g_{s+1}(x_{s+1}) is the first evaluation of the step above's VJP, so it is reused: three block
    forwards per step in the backward (one more per stage where the steps are lean: the top step then keeps
    no cache, as with ``EulerFast``). Error: O(1/N^2) in the gradient for residuals smooth in depth.
    """

    name = "heun"
    evaluations_per_step = 2

    def num_steps(self, num_blocks: int) -> int:
        if num_blocks < 2:
            raise ValueError(f"the heun scheme needs at least 2 residual blocks, got {num_blocks}")
        return num_blocks - 1

    def blocks_of_step(self, s: int) -> tuple[int, ...]:
        return (s, s + 1)

    def step(self, s: int, x: torch.Tensor, evaluate: Evaluate) -> tuple[torch.Tensor, Any]:
        y = evaluate(s, x, (s, 0))
        residual_here = y - x
        residual_ahead = evaluate(s + 1, y, (s, 1)) - y
        return x + 0.5 * (residual_here + residual_ahead), residual_here

    def reverse(self, s: int, x_next: torch.Tensor, cache: Any, evaluate: Evaluate) -> torch.Tensor:
        if cache is not None:
            residual_above = cache  # g_{s+1} at x_{s+1}, from the VJP of step s+1
        else:
            residual_above = evaluate(s + 1, x_next, (s, 1)) - x_next
        z = x_next - residual_above
        return x_next - 0.5 * (residual_above + (evaluate(s, z, (s, 0)) - z))


SCHEMES: dict[str, Scheme] = {scheme.name: scheme for scheme in (Euler(), EulerFast(), Heun())}


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown scheme {name!r}; valid schemes: {sorted(SCHEMES)}") from None
