"""What one call of a stage holds for its backward, besides the tensors its autograd nodes save.

A :class:`Tape` is made by each training forward of a stage and shared by the call's autograd nodes. Every
tensor the backward needs (stored block inputs, the stage output, BatchNorm statistics) is saved by a node
through ``ctx.save_for_backward``, so autograd's saved-tensor hooks (``save_on_cpu``, compression) and its
in-place checks see it, and a graph kept with ``retain_graph=True`` can be differentiated again. The tape holds
the rest: the plan, the parameter tensors the blocks were called with, generator states, the autocast state, and
the one object the nodes hand each other during a backward (:class:`BackwardRelay`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .lean import StepGradient
from .replay import AutocastState, BatchNormReplay, RngSnapshot, batch_counters_preserved

if TYPE_CHECKING:
    from .plan import PlanLog, StagePlan
    from .schemes import Scheme
    from .stage import AdjointSequential


# ---------------------------------------------------------------------------------------------- parameters
@dataclass
class ParameterBinding:
    """The parameter tensors each block held when the forward ran, put back into the blocks for recomputation.

    ``torch.func.functional_call`` (and anything that swaps module parameters for a call) gives the blocks other
    tensors during the forward than after it; recomputing with the module's own parameters would compute the
    wrong function and give the passed tensors no gradient. So the forward records, per block, the tensor in each
    parameter and buffer slot; the backward puts exactly those back around each recomputation (only where they
    differ from what the module holds then) and differentiates with respect to them.
    """

    #: per block of the stage: (module, slot kind, name, tensor at forward time)
    block_slots: list[list[tuple[nn.Module, str, str, torch.Tensor]]]
    #: unique tensors that require grad, in first-seen order: the inputs of the stage's entry node
    trainable: list[torch.Tensor]
    #: per block: indices into ``trainable`` of the tensors it uses
    block_params: list[list[int]]
    #: id of a trainable tensor -> its index in ``trainable``
    index: dict[int, int]
    #: the version counter of each trainable tensor when the forward ran (in-place changes are refused)
    versions: list[int]

    @staticmethod
    def capture(blocks: list[nn.Module]) -> "ParameterBinding":
        index: dict[int, int] = {}
        trainable: list[torch.Tensor] = []
        block_slots, block_params = [], []
        for block in blocks:
            slots, used = [], []
            for module in block.modules():
                for kind, table in (("param", module._parameters), ("buffer", module._buffers)):
                    for name, tensor in table.items():
                        if tensor is None:
                            continue
                        slots.append((module, kind, name, tensor))
                        if kind == "param" and tensor.requires_grad:
                            if id(tensor) not in index:
                                index[id(tensor)] = len(trainable)
                                trainable.append(tensor)
                            if index[id(tensor)] not in used:
                                used.append(index[id(tensor)])
            block_slots.append(slots)
            block_params.append(used)
        return ParameterBinding(block_slots, trainable, block_params, index, [t._version for t in trainable])

    def changed_in_place(self) -> list[int]:
        """Indices of the trainable tensors modified in place since the forward (e.g. an optimizer step before a
        second backward through a retained graph): recomputing with them would differentiate another function."""
        return [i for i, (t, v) in enumerate(zip(self.trainable, self.versions)) if t._version != v]

    def params_of(self, blocks: list[int]) -> list[int]:
        """Indices into ``trainable`` of the tensors the given blocks use, each once."""
        seen: dict[int, None] = {}
        for b in blocks:
            seen.update(dict.fromkeys(self.block_params[b]))
        return list(seen)

    @contextlib.contextmanager
    def bound(self, blocks: list[int], leaves: dict[int, torch.Tensor]) -> Iterator[None]:
        """Within this context the given blocks compute with the forward's tensors (``leaves`` for trainable ones)."""
        swapped: list[tuple[dict, str, torch.Tensor]] = []
        try:
            for b in blocks:
                for module, kind, name, tensor in self.block_slots[b]:
                    table = module._parameters if kind == "param" else module._buffers
                    wanted = tensor
                    if kind == "param" and tensor.requires_grad:
                        wanted = leaves.get(self.index[id(tensor)], tensor)
                    if table.get(name) is not wanted:
                        swapped.append((table, name, table.get(name)))
                        table[name] = wanted
            yield
        finally:
            for table, name, original in reversed(swapped):
                table[name] = original

    def leaves(self, indices: list[int]) -> dict[int, torch.Tensor]:
        """Tensors to differentiate with respect to: the forward's own where they are leaves, else detached copies
        (a non-leaf, e.g. fast weights computed from others, must not be back-propagated through here)."""
        return {i: (t if t.is_leaf else t.detach().requires_grad_()) for i in indices for t in (self.trainable[i],)}


# ---------------------------------------------------------------------------------------------- backward relay
@dataclass
class BackwardRelay:
    """What a stage's autograd nodes hand down to each other during one backward, outside autograd.

    Autograd keeps the gradient it hands a node alive until that node returns, so a node that receives the
    stage's real gradient keeps it through its whole VJP. The nodes of one stage therefore pass autograd a
    zero-size placeholder and put the real gradient here; the next node takes it out, and the VJP root owns it
    (freed after the VJP's first op). The same goes for the reconstructed state and the stored input of the next
    step: each is taken out by the node that uses it, so nothing is held longer than needed.

    One relay per tape, owned by the tape; the stage's top node (``StageExit``) starts a fresh one at every
    backward, so several backwards through one forward (``retain_graph=True``) each start clean.
    """

    #: ∂L/∂(state) at the boundary between the node that ran last and the next one
    grad: torch.Tensor | None = None
    #: whether ``grad`` is the engine's own (a step's input gradient), not the stage's incoming one (``StepGradient``)
    grad_private: bool = False
    #: reconstruction methods: x̂ at that boundary
    state: torch.Tensor | None = None
    #: the kept input of the next step down (a stored block input, or an anchor), unpacked by the node above it
    stored: torch.Tensor | None = None
    top_increment: torch.Tensor | None = None
    #: ``store_every``: the run of steps below whose kept input is ``stored``, handed down by the node above it,
    #: as (first step, [(counts, statistics) of each step of the run but its top]) for re-running it forward
    run_below: tuple[int, list[tuple[list[int], tuple[torch.Tensor, ...]]]] | None = None
    #: ``store_every``: the re-run inputs of the current run, by step, each taken by the step that uses it
    run_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    #: what the scheme's VJP evaluation leaves for the reverse step below (``Scheme.reverse``'s cache)
    cache: Any = None
    #: parameter gradients accumulated over the steps, by index into ``ParameterBinding.trainable``
    param_grads: dict[int, torch.Tensor] = field(default_factory=dict)
    #: one flag per reconstruction step (checked once, at the bottom: one device sync per backward)
    finite_flags: list[torch.Tensor] = field(default_factory=list)
    #: the stage's incoming gradient, kept only where an exact fallback may need it
    grad_out: torch.Tensor | None = None
    grad_out_finite: torch.Tensor | None = None
    output_finite: torch.Tensor | None = None
    block_forwards: int = 0

    def take_grad(self) -> StepGradient:
        """The gradient, for the VJP root to hand to autograd; no longer held here."""
        holder = StepGradient(self.grad, self.grad_private)
        self.grad, self.grad_private = None, False
        return holder

    def accumulate(self, indices: list[int], grads: tuple[torch.Tensor | None, ...]) -> None:
        for i, g in zip(indices, grads):
            if g is not None:
                self.param_grads[i] = g if i not in self.param_grads else self.param_grads[i] + g


# ---------------------------------------------------------------------------------------------- the tape
class Tape:
    """One call of a stage: the plan it follows, what its blocks were called with, and how to re-run them."""

    def __init__(self, stage: "AdjointSequential", binding: ParameterBinding, x: torch.Tensor) -> None:
        self.stage = stage
        self.binding = binding
        self.plan: StagePlan | None = None  # set once, by the node that starts the forward
        self.logs: tuple[PlanLog, ...] = ()
        self.scheme: Scheme | None = None
        self.num_steps = 0
        self.autocast = AutocastState.capture(x.device.type)
        self.input_dtype = x.dtype
        #: the stage input's storage, to tell the user's tensor from internal copies in messages
        self.stage_input_storage = x.untyped_storage().data_ptr()
        #: dtype of the states the residual blocks saw in the forward (recomputation feeds them the same dtype)
        self.state_dtype = x.dtype
        self.replay = BatchNormReplay()
        self.replay.lean_parts = stage.lean_graphs
        self.rng: dict[Any, RngSnapshot] = {}
        #: whether the input of the residual part needs a gradient (the stage input or head parameters do)
        self.chain_input_needs_grad = True
        #: 16-bit stored inputs: one finiteness flag each, taken when stored (overflow is known before backward)
        self.stored_finite: list[torch.Tensor] = []
        #: ``store_every``: the batch statistics of steps whose input is re-run in backward, until the node that
        #: keeps their run's input saves them too (their own nodes save them as well: two references, no copy)
        self.rerun_records: dict[int, tuple[list[int], tuple[torch.Tensor, ...]]] = {}
        self.relay = BackwardRelay()
        #: each block's modules' ``training`` flags at the forward: a recomputation runs the graph the forward
        #: built (as autograd's own saved graph would) even if ``model.eval()`` came between forward and backward
        self.training_modes = [tuple(m.training for m in block.modules()) for block in stage]

    def set_plan(self, plan: "StagePlan", logs: tuple["PlanLog", ...]) -> None:
        from .schemes import get_scheme

        self.plan, self.logs = plan, logs
        self.scheme = get_scheme(plan.scheme)
        residual = len(self.stage) - self.stage.exact_head
        self.num_steps = self.scheme.num_steps(residual) if residual > 0 else 0

    # ------------------------------------------------------------------ structure
    def step_blocks(self, s: int) -> list[int]:
        """Indices (in the stage) of the blocks step s evaluates."""
        head = self.stage.exact_head
        return [head + n for n in self.scheme.blocks_of_step(s)]

    def head_blocks(self) -> list[int]:
        return list(range(self.stage.exact_head))

    # ------------------------------------------------------------------ evaluation with replay
    def call(self, b: int, x: torch.Tensor, key: Any, mode: str) -> torch.Tensor:
        """Run block b at x as the forward evaluation ``key`` (BatchNorm routed by ``mode``, see ``BatchNormReplay``).

        In the forward (modes ``record``/``forward``) the generator state is kept when the block drew random
        numbers; in recomputation it is restored around the call, and the block is fed the dtype it saw in
        the forward (reconstructions run in float32 even for 16-bit blocks).
        """
        block = self.stage[b]
        if mode in ("record", "forward"):
            before = RngSnapshot.capture(x.device) if self.stage.preserve_rng_state else None
            with self.replay.evaluation(mode, key):
                out = block(x)
            if before is not None and not before.same_as(RngSnapshot.capture(x.device)):
                self.rng[key] = before
            return out
        if x.dtype != self.state_dtype and x.is_floating_point() and b >= self.stage.exact_head:
            x = x.to(self.state_dtype)
        snapshot = self.rng.get(key)
        with self.replay.evaluation(mode, key):
            if snapshot is None:
                return block(x)
            with snapshot.restored():
                return block(x)

    def evaluator(self, mode: str):
        """``evaluate(n, x, key)`` for the schemes: residual block n, counted as one block forward."""
        head = self.stage.exact_head

        def evaluate(n: int, x: torch.Tensor, key: Any) -> torch.Tensor:
            self.relay.block_forwards += 1
            return self.call(head + n, x, key, mode)

        return evaluate

    def run_head(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        for i in self.head_blocks():
            x = self.call(i, x, ("head", i), mode)
        return x

    @contextlib.contextmanager
    def recomputing(self, blocks: list[int], leaves: dict[int, torch.Tensor]) -> Iterator[None]:
        """Around a recomputation of ``blocks``: the forward's parameters bound, autocast replayed, BatchNorm batch
        counters left as they were (modules bump them in Python before calling BatchNorm)."""
        stage = self.stage
        with self.binding.bound(blocks, leaves), self.autocast.replayed(), self._forward_modes(blocks):
            with batch_counters_preserved(stage.batchnorm_modules([stage[b] for b in blocks])):
                yield

    @contextlib.contextmanager
    def _forward_modes(self, blocks: list[int]) -> Iterator[None]:
        """The ``blocks``' modules in the train/eval mode they had at the forward, then back as the user left them."""
        switched: list[torch.nn.Module] = []
        for b in blocks:
            for module, mode in zip(self.stage[b].modules(), self.training_modes[b]):
                if module.training != mode:
                    module.training = mode
                    switched.append(module)
        try:
            yield
        finally:
            for module in switched:
                module.training = not module.training

    # ------------------------------------------------------------------ runs of steps re-run in backward
    def run_of(self, s: int) -> tuple[int, int]:
        """Re-runs: (first, top) step of the run containing step s."""
        first = 0
        for length in self.plan.run_lengths or ():
            if s < first + length:
                return first, first + length - 1
            first += length
        raise IndexError(f"step {s} is beyond the stage's {self.num_steps} steps")

    def note_for_rerun(self, s: int, counts: list[int], statistics: list[torch.Tensor]) -> None:
        """In the forward of step s: keep its statistics for the node that will keep its run's input."""
        if self.plan.run_lengths and s != self.run_of(s)[1]:
            self.rerun_records[s] = (counts, tuple(statistics))

    def take_run_records(self, first: int, top: int) -> tuple[list[list[int]], list[torch.Tensor]]:
        """The statistics of steps first..top-1, as (counts per step, flat tensors) for ``save_for_backward``."""
        counts, flat = [], []
        for s in range(first, top):
            step_counts, statistics = self.rerun_records.pop(s)
            counts.append(step_counts)
            flat += statistics
        return counts, flat

    # ------------------------------------------------------------------ BatchNorm statistics of one step
    def take_records(self, s: int) -> tuple[list[int], list[torch.Tensor]]:
        """Remove step s's recorded batch statistics from the tape: (counts per evaluation, flat tensors), for the
        step's node to save through autograd."""
        counts, tensors = [], []
        for j in range(self.scheme.evaluations_per_step):
            records = self.replay.records.pop((s, j), [])
            counts.append(len(records))
            tensors += [t for pair in records for t in pair]
        return counts, tensors

    @contextlib.contextmanager
    def records_restored(self, s: int, counts: list[int], tensors: tuple[torch.Tensor, ...]) -> Iterator[None]:
        """Step s's statistics back on the replay while its node runs its backward, then dropped again."""
        pos = 0
        for j, count in enumerate(counts):
            self.replay.records[(s, j)] = [(tensors[pos + 2 * k], tensors[pos + 2 * k + 1]) for k in range(count)]
            pos += 2 * count
        try:
            yield
        finally:
            for j in range(len(counts)):
                self.replay.records.pop((s, j), None)
