"""Memory strategies of the discrete adjoint: which states ``u_k`` to keep, how to get them back.

The backward sweep of :class:`~amaml.flow.adjoint.DiscreteAdjoint` needs every state
``u_k``, ``k = N-1 .. 0``, in reverse order, at the moment it takes step ``k``'s
vector-Jacobian product. A strategy decides what the forward pass keeps and how the sweep
recovers the rest:

    :class:`Store` (all N+1 states), :class:`Checkpoint` (every k-th state, segments
    recomputed; about ``2 sqrt(N)`` states), :class:`Backsolve` (only ``u_N``; the state is
    integrated backward with ``lam``; approximate); in :mod:`amaml.flow.revolve`,
    :class:`~amaml.flow.revolve.Revolve` (binomial checkpointing: at most ``snapshots + 1``
    states whatever ``N``); in :mod:`amaml.flow.budget`, :class:`~amaml.flow.budget.Budget`
    (steps' autograd graphs kept while they fit in a memory budget); in
    :mod:`amaml.flow.auto`, :class:`~amaml.flow.auto.Auto` (the fastest that fits).

A new strategy subclasses :class:`AbstractMemory` and implements ``forward`` and
``sweep`` with the :class:`~amaml.flow.loop.FlowContext` it is given; it can be passed
as ``memory=`` to :func:`amaml.adapt` without any change to the package.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..allocator import huge_pages
from .errors import BacksolveError
from .loop import AutogradTape, FlowContext
from .reads import THETA
from .step_maps.runge_kutta import AbstractSolver

__all__ = ["AbstractMemory", "Backsolve", "Checkpoint", "Store", "recomputed_segment",
           "taped_segment"]


class AbstractMemory(abc.ABC):
    """How the discrete adjoint keeps the forward states and gets them back.

    Exact strategies must call ``flow.vjp(u_k, lam)`` once for every step
    ``k = N-1, ..., 0`` in that order, with ``u_k`` equal to the forward pass's state
    (recomputed states are: the forward loop is deterministic).
    """

    name: str = "abstract"

    def describe(self, flow: FlowContext) -> str:
        """What this strategy keeps for ``flow``, in words (:func:`amaml.explain`)."""
        return self.name

    @abc.abstractmethod
    def forward(self, flow: FlowContext) -> tuple[Tensor, Tensor]:
        """Run all ``flow.n_steps`` steps from ``flow.initial_state()``; keep what ``sweep``
        needs.

        Returns:
            ``(u_N, kept)``: the final state and what was kept, one tensor stacked on
            dim 0 (saved for the backward pass; never differentiated).
        """

    @abc.abstractmethod
    def sweep(self, flow: FlowContext, kept: Tensor, lam: Tensor) -> Tensor:
        """From ``lam_N = dJ/du_N`` back to ``lam_0``, one ``flow.vjp`` per step.

        Args:
            flow: The flow; ``flow.vjp`` also accumulates the parameter cotangents.
            kept: What :meth:`forward` kept.
            lam: ``lam_N``, shaped like ``u_N``.

        Returns:
            ``lam_0 = dJ/du_0``.
        """


@dataclass(frozen=True)
class Store(AbstractMemory):
    """Keep all ``N + 1`` states: ``(N + 1) x P`` numbers, no recomputation.

    Args:
        tapes: Also keep what each step's kernel recorded for its VJP (the fused MLP path:
            each gradient's layer outputs and cotangents, ``tape_numel`` numbers a step),
            so that no step VJP evaluates the network's gradient again: about a quarter of
            a fused step VJP's time, for ``N * tape_numel`` more numbers held between the
            forward and the backward pass. What ``memory="auto"`` picks on the fused path
            when it fits. No effect on other kernels.
    """

    tapes: bool = False
    name: str = field(default="store", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.tapes, bool):
            raise TypeError(f"Store(tapes=...) must be a bool; got {self.tapes!r}.")

    def describe(self, flow: FlowContext) -> str:
        return "store" + (" with the fused tapes" if self.tapes else "")

    def forward(self, flow: FlowContext) -> tuple[Tensor, Tensor]:
        u0 = flow.initial_state()
        # Written in place into one buffer: the peak is N + 1 states, not twice that
        # (a list of states then ``torch.stack``).
        states = huge_pages(u0.new_empty((flow.n_steps + 1, *u0.shape)))
        tapes: list[Any] | None = [] if self.tapes and flow.tape_numel() > 0 else None
        u_end, _ = flow.integrate(u0, keep_every=1, out=states, tapes=tapes)
        states[-1].copy_(u_end)
        if tapes is not None:
            flow.carry["store_tapes"] = tapes
        return states[-1], states

    def sweep(self, flow: FlowContext, kept: Tensor, lam: Tensor) -> Tensor:
        flow.stats.peak_states = max(flow.stats.peak_states, kept.shape[0])
        # used up by one backward pass (a second one takes the steps' gradients again)
        tapes = flow.carry.pop("store_tapes", None)
        for k in range(flow.n_steps - 1, -1, -1):
            tape = tapes.pop() if tapes else None
            flow.stats.taped_steps += bool(tape)
            lam = flow.vjp(kept[k], lam, tape, k=k)
        return lam


@dataclass(frozen=True)
class Checkpoint(AbstractMemory):
    """Keep every ``every``-th state; recompute each segment in the backward pass.

    Where a step's VJP is double backward through autograd (the ``"autograd"`` kernel:
    convolutions, BatchNorm, any model off the fused path), a segment is recomputed with
    each step's autograd graph kept (:meth:`FlowContext.tape_step`) and its VJPs are one
    backward pass each through those graphs: the recomputation then costs nothing beyond
    what a VJP needs anyway, and checkpointing takes the time of :class:`Store`. The
    graphs of a segment are held during its sweep, so the segment length is chosen to
    hold the fewest bytes, ``sqrt(N * state / graph)`` steps, from one step's graph
    measured in the forward pass (Conv-4 at N = 100: 3 steps, 34 checkpoints).

    With ``tapes=True``, on the fused MLP path (:mod:`amaml.flow.fused`), the recomputed
    forward steps of a segment keep their tapes (each layer's output and cotangent, what
    the gradient at that state computed) and the segment's step VJPs reuse them instead
    of running the network forward and backward again: the same gradient bit for bit,
    about 8% less time on the paper's MLP, but ``every * tape_numel`` more numbers held
    during a segment's sweep, about 16 states' worth per step there (activations grow
    with the support set and the width), so that checkpoint then holds about
    ``18 sqrt(N)`` states instead of ``2 sqrt(N)``: off by default there.

    Args:
        every: Segment length; ``None`` picks ``ceil(sqrt(N))`` (or the length above
            when graphs are kept), which holds at most about ``2 sqrt(N)`` states at once
            for one extra forward pass. Exact.
        tapes: ``None`` (default): keep autograd graphs on the autograd kernel, no fused
            tapes; ``True``: also the fused path's tapes; ``False``: keep nothing, every
            recomputed step is taken again inside its VJP.
    """

    every: int | None = None
    tapes: bool | None = None
    name: str = field(default="checkpoint", init=False)

    def __post_init__(self) -> None:
        if self.every is not None and (not isinstance(self.every, int) or self.every < 1):
            raise ValueError(f"Checkpoint(every=...) must be a positive int; got {self.every!r}.")
        if self.tapes is not None and not isinstance(self.tapes, bool):
            raise TypeError(f"Checkpoint(tapes=...) must be None or a bool; got "
                            f"{self.tapes!r}.")

    def segment(self, n_steps: int) -> int:
        """The segment length used for ``n_steps`` steps when no graphs are kept."""
        return self.every if self.every is not None else max(1, math.isqrt(n_steps - 1) + 1)

    @staticmethod
    def taped_segment(n_steps: int, state_bytes: int, graph_bytes: int) -> int:
        """The segment length holding the fewest bytes when a segment's graphs are kept:
        ``ceil(N / L)`` states and ``L`` graphs, least at ``L = sqrt(N * state / graph)``."""
        best = math.sqrt(n_steps * state_bytes / max(graph_bytes, 1))
        return max(1, min(n_steps, round(best)))

    def describe(self, flow: FlowContext) -> str:
        if self.graphs(flow):
            how = (f"every {self.every} steps" if self.every is not None
                   else "spaced so that a segment's graphs and the checkpoints hold the fewest "
                        "bytes (one step's graph measured on step 0)")
            return (f"checkpoint {how}; each segment recomputed with its steps' autograd "
                    "graphs kept and transposed through them")
        return (f"checkpoint every {self.segment(flow.n_steps)} steps; each segment's states "
                "recomputed" + (" with the fused tapes" if self.tapes else ""))

    def graphs(self, flow: FlowContext) -> bool:
        """Whether the segments are recomputed with their autograd graphs kept."""
        return self.tapes is not False and flow.choice.name == "autograd"

    def forward(self, flow: FlowContext) -> tuple[Tensor, Tensor]:
        u0, n = flow.initial_state(), flow.n_steps
        if self.every is not None or n < 2 or not self.graphs(flow):
            every = self.segment(n)
            ckpts = huge_pages(u0.new_empty((-(-n // every), *u0.shape)))
            u_end, _ = flow.integrate(u0, keep_every=every, out=ckpts)
            flow.carry["checkpoint_every"] = every
            return u_end, ckpts
        # Measure one step's graph on step 0, then place the checkpoints.
        u1, tape = flow.tape_step(u0, 0)
        return self.forward_taken(flow, u0, u1, tape)

    def forward_taken(self, flow: FlowContext, u0: Tensor, u1: Tensor,
                      tape: AutogradTape) -> tuple[Tensor, Tensor]:
        """The forward pass with segments recomputed with their graphs, once step 0 is taken
        (``u1``, its graph ``tape``, which sets the segment length; ``N >= 2``)."""
        n = flow.n_steps
        every = (self.every if self.every is not None else
                 self.taped_segment(n, u0.numel() * u0.element_size(), tape.nbytes()))
        del tape
        ckpts = huge_pages(u0.new_empty((-(-n // every), *u0.shape)))
        ckpts[0].copy_(u0)
        u, _ = flow.integrate(u1, 1, min(every, n))  # checks its last state (n >= 2)
        if every < n:
            u, _ = flow.integrate(u, every, n, keep_every=every, out=ckpts[1:])
        flow.carry["checkpoint_every"] = every
        return u, ckpts

    def sweep(self, flow: FlowContext, kept: Tensor, lam: Tensor) -> Tensor:
        n = flow.n_steps
        every = flow.carry.get("checkpoint_every") or self.segment(n)
        graphs = self.graphs(flow)
        use_tapes = not graphs and self.tapes is True and flow.tape_numel() > 0
        for j in range(kept.shape[0] - 1, -1, -1):
            start = j * every
            stop = min(start + every, n)
            segment = taped_segment if graphs else recomputed_segment
            lam = segment(flow, kept[j], start, stop, lam, kept.shape[0] - 1, use_tapes)
        return lam


def recomputed_segment(flow: FlowContext, u: Tensor, start: int, stop: int, lam: Tensor,
                       others: int, fused_tapes: bool = False) -> Tensor:
    """States ``start .. stop-1`` recomputed from ``u`` (with the fused loss's tapes of the
    steps taken, all but the last, where ``fused_tapes``), then one ``flow.vjp`` per step,
    last to first; ``others``: states held besides."""
    stats = flow.stats
    tapes: list[Any] | None = [] if fused_tapes else None
    u_last, seg = flow.integrate(u, start, stop - 1, keep_every=1, tapes=tapes)
    seg.append(u_last)
    stats.recomputed_steps += stop - 1 - start
    stats.peak_states = max(stats.peak_states, others + len(seg))
    for k in range(stop - 1, start - 1, -1):
        tape = tapes.pop() if tapes and k - start < len(tapes) else None
        stats.taped_steps += bool(tape)
        lam = flow.vjp(seg[k - start], lam, tape, k=k)
    return lam


def taped_segment(flow: FlowContext, u: Tensor, start: int, stop: int, lam: Tensor,
                   others: int, fused_tapes: bool = False) -> Tensor:
    """Steps ``start .. stop-1`` from ``u`` taken with their autograd graphs kept, then
    transposed last to first through them; ``others``: states held besides
    (``fused_tapes`` is :func:`recomputed_segment`'s, unused here)."""
    stats = flow.stats
    graphs: list[AutogradTape] = []
    for k in range(start, stop):
        u, tape = flow.tape_step(u, k)
        graphs.append(tape)
    del u
    stats.recomputed_steps += stop - 1 - start
    stats.taped_steps += stop - start
    stats.peak_states = max(stats.peak_states, others + stop - start)
    while graphs:
        tape = graphs.pop()
        lam = flow.vjp(tape.start, lam, tape, k=tape.k)
        del tape
    return lam


@dataclass(frozen=True)
class Backsolve(AbstractMemory):
    """Keep only ``u_N``; integrate the state backward together with ``lam``.

    O(1) states, but the gradient is approximate (its error is O(dt**order) at a
    fixed horizon), and running gradient flow backward is gradient *ascent*,
    unstable on long non-convex horizons. The reconstructed ``u_0`` is compared
    with ``theta`` (which is known); a relative error above ``tol`` raises
    :class:`BacksolveError` rather than returning a wrong gradient.

    Args:
        tol: Largest accepted ``||u_0_reconstructed - theta|| / ||theta||``.
    """

    tol: float = 1e-2
    name: str = field(default="backsolve", init=False)

    def __post_init__(self) -> None:
        if not (self.tol > 0):
            raise ValueError(f"Backsolve(tol=...) must be positive; got {self.tol!r}.")

    def forward(self, flow: FlowContext) -> tuple[Tensor, Tensor]:
        u_end, _ = flow.integrate(flow.initial_state())
        return u_end, torch.stack([u_end])

    def sweep(self, flow: FlowContext, kept: Tensor, lam: Tensor) -> Tensor:
        spec, need = flow.spec, flow.need
        solver = spec.step_map
        if not isinstance(solver, AbstractSolver):
            raise ValueError("memory='backsolve' integrates gradient flow backward in time; it "
                             "has no version for an inner optimiser, a per-step learning "
                             "rate, mini-batches or meta-parameters beyond theta, lr and mu. "
                             "Use memory='revolve' or 'checkpoint' (exact).")
        zeros = [(i, torch.zeros_like(t.detach())) for i, t in enumerate(flow.reads.tensors())
                 if t is not None and need[i] and (i != THETA or flow.reads.mu is not None)]

        def augmented(z: Sequence[Tensor]) -> list[Tensor]:
            # Reverse time tau = N - s: du/dtau = -F(u), dlam/dtau = J_F(u)^T lam,
            # d(bar_p)/dtau = (dF/dp)^T lam.
            f, lam_u, bars = flow.field_vjp(z[0], z[1])
            got = {i: g for i, g in bars if g is not None}
            return [-f, lam_u, *(got.get(i, torch.zeros_like(b)) for i, b in zeros)]

        z: list[Tensor] = [flow.params(kept[0]).detach(), flow.params(lam),
                           *(b for _, b in zeros)]
        flow.stats.peak_states = max(flow.stats.peak_states, 1)
        check = flow.check_every
        for k in range(spec.n_steps):
            z = solver.step_tuple(augmented, z)
            if (k + 1) % check == 0 and not bool(torch.isfinite(z[0]).all()):
                break
        u0 = flow.params(flow.initial_state())
        err = float((z[0] - u0).norm() / u0.norm().clamp_min(torch.finfo(u0.dtype).tiny))
        if not math.isfinite(err) or err > self.tol or not bool(torch.isfinite(z[1]).all()):
            raise BacksolveError(
                f"Backsolve failed to reconstruct the initial parameters: relative error "
                f"{err:.3g} > tol={self.tol:g} after integrating {spec.n_steps} steps backward "
                f"(gradient flow run backward is unstable on long horizons). Its gradient "
                f"would be wrong; use memory='checkpoint' (exact, O(sqrt(steps)) memory) "
                f"instead."
            )
        flow.add_bars([(i, b) for (i, _), b in zip(zeros, z[2:])])
        return z[1]  # a solver's state is u
