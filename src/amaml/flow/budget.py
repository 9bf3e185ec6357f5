"""A memory strategy bounded by bytes rather than by states: :class:`Budget`.

Unrolled MAML keeps every step's autograd graph; checkpointing keeps a few states and
takes the steps again. :class:`Budget` keeps graphs while they fit in a number of
megabytes and checkpoints beyond, so that one setting moves a meta-gradient from
unrolling's time (room for every step) to checkpointing's memory (room for none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..allocator import huge_pages
from .errors import DivergenceError
from .loop import AutogradTape, FlowContext
from .memory import AbstractMemory, recomputed_segment, taped_segment

__all__ = ["Budget", "budget_forward"]


@dataclass(frozen=True)
class Budget(AbstractMemory):
    """Keep each step's autograd graph while the graphs fit in ``megabytes``; checkpoint
    the rest. Exact.

    The last ``T`` steps are taken with their graphs kept (:meth:`FlowContext.tape_step`:
    what unrolled MAML keeps for every step), ``T`` the number of one step's graphs that
    fit in the budget (measured on the first step: the bytes its graph saved); their VJPs
    are one backward pass each through the kept graph, as in unrolling, with no
    recomputation. The first ``N - T`` steps keep a checkpoint every ``T`` steps; the
    sweep takes each such segment again with its graphs kept (at most ``T``, within the
    budget again, since the last steps' graphs are used up by then) and transposes it
    through them: one extra forward pass with its gradient, nothing else. With room for
    every step it does what unrolling does, at its speed; with room for no step (``T =
    0``), what ``Checkpoint`` does. Peak memory: the budget, the checkpoints, and one
    step's working set.

    Where the step's VJP has a faster kernel than autograd (the fused MLP path, compiled
    steps) the first ``N - T`` steps are checkpointed every ``ceil(sqrt(N - T))`` steps
    and transposed by that kernel instead.

    The graphs live between the forward and the backward pass; one backward pass uses
    them up. A second one through the same adapted parameters (``retain_graph=True``)
    takes those steps again, with their graphs, from the state where they began, which is
    kept.

    Args:
        megabytes: The budget for the kept graphs, in MiB (>= 0).
    """

    megabytes: float = 256.0
    name: str = field(default="budget", init=False)

    def __post_init__(self) -> None:
        if isinstance(self.megabytes, bool) or not isinstance(self.megabytes, (int, float)) \
                or not math.isfinite(self.megabytes) or self.megabytes < 0:
            raise ValueError(f"Budget(megabytes=...) must be a finite number >= 0; got "
                             f"{self.megabytes!r}.")

    def describe(self, flow: FlowContext) -> str:
        rest = ("recomputed in segments with their graphs kept"
                if flow.choice.name == "autograd" else "checkpointed")
        return (f"the autograd graphs of the last steps kept while they fit in "
                f"{self.megabytes:g} MiB (measured on step 0), the steps before {rest}")

    def forward(self, flow: FlowContext) -> tuple[Tensor, Tensor]:
        z0 = flow.initial_state()
        z1, tape0 = flow.tape_step(z0, 0)
        taped = min(flow.n_steps, int(self.megabytes * 2**20 // max(tape0.nbytes(), 1)))
        return budget_forward(flow, z0, z1, tape0, taped)

    def sweep(self, flow: FlowContext, kept: Tensor, lam: Tensor) -> Tensor:
        n, stats, carry = flow.n_steps, flow.stats, flow.carry
        start, every = carry["budget_start"], carry["budget_every"]
        tapes = carry.pop("budget", None)
        others = kept.shape[0]
        if tapes is not None:
            stats.peak_states = max(stats.peak_states, others + len(tapes))
            while tapes:
                tape = tapes.pop()
                lam = flow.vjp(tape.start, lam, tape, k=tape.k)
                del tape
        elif start < n:  # a second backward pass: take the taped steps again
            lam = taped_segment(flow, kept[-1], start, n, lam, others)
        if start == 0:
            return lam
        for j in range(kept.shape[0] - 2, -1, -1):
            s0 = j * abs(every)
            s1 = min(s0 + abs(every), start)
            if every > 0:
                lam = taped_segment(flow, kept[j], s0, s1, lam, others)
            else:
                lam = recomputed_segment(flow, kept[j], s0, s1, lam, others - 1)
        return lam


def budget_forward(flow: FlowContext, z0: Tensor, z1: Tensor, tape0: AutogradTape,
                   taped: int) -> tuple[Tensor, Tensor]:
    """:class:`Budget`'s forward pass once step 0 is taken (``z1``, its graph ``tape0``):
    the last ``taped`` steps with their graphs kept, checkpoints before (what
    :meth:`Budget.sweep` reads back). :class:`~amaml.flow.auto.Auto` calls it with the
    count it chose from the same first step."""
    n, carry = flow.n_steps, flow.carry
    start = n - taped
    tapes: list[AutogradTape] = []
    # kept: the checkpoints of steps 0 .. start-1, then the state at ``start``
    if start == 0:
        kept = torch.stack([z0])
        tapes.append(tape0)
        z, first, every = z1, 1, 0
    else:
        del tape0
        graphs = taped > 0 and flow.choice.name == "autograd"
        every = taped if graphs else max(1, math.isqrt(start - 1) + 1)
        n_ckpt = -(-start // every)
        kept = huge_pages(z0.new_empty((n_ckpt + 1, *z0.shape)))
        kept[0].copy_(z0)
        z, _ = flow.integrate(z1, 1, min(every, start))
        if every < start:
            z, _ = flow.integrate(z, every, start, keep_every=every, out=kept[1:n_ckpt])
        kept[-1].copy_(z)
        z, first = kept[-1], start
        every = every if graphs else -every  # < 0: segments without graphs
    for k in range(first, n):
        z, tape = flow.tape_step(z, k)
        tapes.append(tape)
    if not bool(torch.isfinite(z).all()):
        raise DivergenceError(n, n, " (under memory=Budget)")
    carry["budget"] = tapes
    carry["budget_start"] = start
    carry["budget_every"] = every
    flow.stats.taped_steps = taped
    return z, kept
