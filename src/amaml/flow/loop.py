"""The forward loop and one step back: :class:`FlowContext`, what memory strategies receive.

A flow is a step map run ``N`` times from ``z_0 = (theta, 0, ...)``: ``z_{k+1} =
Phi_k(z_k; reads)`` (:mod:`~amaml.flow.step_maps`, :mod:`~amaml.flow.reads`). Its discrete
adjoint goes back one step at a time, ``lam_k = (dPhi_k/dz (z_k))^T lam_{k+1}``, adding each
step's ``(dPhi_k/dreads)^T lam_{k+1}`` to the reads' cotangents. :class:`FlowContext` offers a
memory strategy exactly that: the initial state, the forward steps (:meth:`~FlowContext.
integrate`), one step back (:meth:`~FlowContext.vjp`) and a step taken with its autograd graph
kept (:meth:`~FlowContext.tape_step`); both go straight to the one kernel chosen for the flow
(:func:`~amaml.flow.kernels.select_kernel`) and back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import DivergenceError
from .kernels import KernelChoice, select_kernel
from .kernels.autograd import AutogradKernel, eager_step
from .kernels.base import Cotangents
from .reads import FIRST_DATA, LR, Reads
from .spec import FlowSpec
from .step_maps.runge_kutta import AbstractSolver

__all__ = ["AutogradTape", "FlowContext", "SweepStats", "check_every"]

_LOG = logging.getLogger("amaml")


@dataclass
class SweepStats:
    """Bookkeeping of one adjoint sweep, for tests and benchmarks."""

    peak_states: int = 0
    recomputed_steps: int = 0
    #: Step VJPs that reused what their step recorded: its autograd graph, or the fused
    #: loss's tapes of a recomputed step.
    taped_steps: int = 0


def check_every(n_steps: int) -> int:
    """How often the state is checked for non-finite values (a check syncs a GPU)."""
    return max(1, math.isqrt(n_steps))


@dataclass
class AutogradTape:
    """One step taken with its autograd graph kept (what unrolled MAML keeps for every
    step): its output, the leaf it started from, the reads' leaves ``(index, leaf)`` and the
    step. Its VJP is one backward pass through the graph, which frees it."""

    out: Tensor
    start: Tensor
    leaves: list[tuple[int, Tensor]]
    k: int

    def nbytes(self) -> int:
        """Bytes of the tensors the graph saved (each storage once; the leaves, which
        exist anyway, not counted), read from the nodes' ``_saved_*`` attributes (a custom
        Function's node: its ``saved_tensors``)."""
        skip = {self.start.untyped_storage().data_ptr()}
        skip |= {t.untyped_storage().data_ptr() for _, t in self.leaves}
        seen: set[int] = set()
        total = 0
        stack, visited = [self.out.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in visited:
                continue
            visited.add(id(node))
            names = [n for n in dir(node) if n.startswith("_saved_")]
            if hasattr(node, "save_for_backward"):  # a custom autograd.Function's node
                names.append("saved_tensors")
            for name in names:
                try:
                    value = getattr(node, name)
                except RuntimeError:  # already freed
                    continue
                for t in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(t, Tensor):
                        ptr = t.untyped_storage().data_ptr()
                        if ptr not in seen and ptr not in skip:
                            seen.add(ptr)
                            total += t.untyped_storage().nbytes()
            stack.extend(nxt for nxt, _ in node.next_functions)
        return total


class FlowContext:
    """One flow and its tensors, as the adjoints and memory strategies receive it.

    A memory strategy needs only :meth:`initial_state`, :meth:`integrate` (forward and
    recomputation) and :meth:`vjp` (one step back); see
    :class:`~amaml.flow.memory.AbstractMemory`.

    Args:
        spec: The flow (objective, step map, ``N``).
        reads: What the steps read besides the state.
        need: Which of ``reads.tensors()`` need a gradient (default: those that require
            grad); the kernel is chosen for them, once.
        carry: What a memory strategy passes from its forward pass to its sweep (a dict
            shared by the forward pass's flow and the backward passes' flows).
        choice: The kernel, when chosen already (a backward pass's flow keeps the forward's).

    Attributes:
        n_steps: ``N``, the number of steps.
        choice: The kernel of this flow's steps and why not the faster ones.
        bars: The reads' cotangents summed so far, aligned with ``reads.tensors()``
            (``None`` where none); :meth:`vjp` adds to it.
        stats: Peak states held and steps recomputed, for tests and benchmarks.
    """

    def __init__(self, spec: FlowSpec, reads: Reads, need: Sequence[bool] | None = None,
                 carry: dict[str, Any] | None = None, choice: KernelChoice | None = None
                 ) -> None:
        self.spec, self.reads, self.n_steps = spec, reads, spec.n_steps
        tensors = reads.tensors()
        self.need = tuple(need) if need is not None else tuple(
            t is not None and t.requires_grad for t in tensors)
        self.choice = choice if choice is not None else select_kernel(spec, reads, self.need)
        if choice is None:
            _LOG.debug("step VJP kernel: %s", self.choice.describe())
        self.carry: dict[str, Any] = {} if carry is None else carry
        self.bars: list[Tensor | None] = [None] * len(tensors)
        self.stats = SweepStats()
        self._next_k = spec.n_steps - 1
        self._graphs: AutogradKernel | None = None  # takes steps with graphs (tape_step)

    def backward_flow(self, tensors: Sequence[Tensor | None], need: Sequence[bool]
                      ) -> FlowContext:
        """The flow of one backward pass: the saved tensors, the needs autograd asks for,
        this flow's kernel and carry; fresh cotangents."""
        return FlowContext(self.spec, self.reads.with_tensors(tensors), need, self.carry,
                           self.choice)

    @property
    def theta(self) -> Tensor:
        """The meta-parameters ``(P,)``."""
        return self.reads.theta

    @property
    def check_every(self) -> int:
        """How often (in steps) a strategy should check its states for non-finite values."""
        return check_every(self.spec.n_steps)

    def initial_state(self) -> Tensor:
        """``z_0``: ``(theta, 0, ...)`` as ``(rows, P)`` (``(B, rows, P)`` for a batch), or
        ``theta`` itself for a solver (:meth:`~amaml.flow.step_maps.base.AbstractStepMap.init`)."""
        return self.spec.step_map.init(self.reads.theta.detach(), self.spec.n_tasks)

    def params(self, z: Tensor) -> Tensor:
        """The parameters ``u`` of a state (the step map's row 0; a solver's state itself)."""
        return self.spec.step_map.params(z)

    def integrate(self, u0: Tensor | None = None, start: int = 0, stop: int | None = None, *,
                  keep_every: int | None = None, out: Tensor | None = None,
                  create_graph: bool = False, tapes: list[Any] | None = None
                  ) -> tuple[Tensor, list[Tensor]]:
        """Steps ``start .. stop-1`` from ``u0`` (the state at ``start``; ``None``: ``z_0``).

        Args:
            keep_every: Keep the state at every step ``k`` with ``(k - start) % keep_every
                == 0`` and ``k < stop`` (``1`` keeps all but the last; ``None`` none).
            out: Optional buffer with one row per kept state: the kept states are written
                into it, so that stacking them later needs no second copy.
            create_graph: Build the autograd graph of every step (unrolled MAML).
            tapes: Optional list: each step appends what the kernel recorded for its VJP.

        Returns:
            ``(z_stop, kept_states)``.

        Raises:
            DivergenceError: If the state becomes non-finite; names the first bad step.
        """
        spec = self.spec
        stop = spec.n_steps if stop is None else stop
        if create_graph and u0 is None:  # unrolled: the graph starts at theta
            z = spec.step_map.init(self.reads.theta, spec.n_tasks)
        else:
            z = self.initial_state() if u0 is None else u0
        reads = self.reads if create_graph else self.reads.detached()
        kernel = self.choice.kernel
        every = check_every(spec.n_steps)
        kept: list[Tensor] = []
        last_ok, last_k = z, start
        for k in range(start, stop):
            if keep_every is not None and (k - start) % keep_every == 0:
                if out is not None:
                    row = out[len(kept)]
                    row.copy_(z)
                    z = row
                kept.append(z)
            if create_graph:
                with reads.random_step(k, z.device):
                    z = eager_step(spec, k, z, reads, graph=True)
            else:
                record: list[Any] | None = None if tapes is None else []
                z = kernel.step(k, z, reads, record)
                if tapes is not None:
                    tapes.append(record)
            if (k + 1 - start) % every == 0 or k + 1 == stop:
                if not bool(torch.isfinite(z).all()):
                    raise self._diverged(last_ok.detach(), last_k, k + 1)
                last_ok, last_k = z, k + 1
        return z, kept

    def _diverged(self, z: Tensor, start: int, stop: int) -> DivergenceError:
        """Steps ``start..stop`` replayed from the last finite state to name the first bad one."""
        reads, kernel = self.reads.detached(), self.choice.kernel
        for k in range(start, stop):
            z = kernel.step(k, z, reads)
            if not bool(torch.isfinite(z).all()):
                return DivergenceError(k + 1, self.n_steps, self.spec.diverged())
        return DivergenceError(stop, self.n_steps, self.spec.diverged())

    def vjp(self, u: Tensor, lam: Tensor, tape: Any = None, k: int | None = None) -> Tensor:
        """One step back: ``(dPhi_k/dz (u))^T lam``, where ``u`` is the state step ``k``
        starts from; adds ``(dPhi_k/dreads (u))^T lam`` to :attr:`bars`. ``tape``: what the
        step recorded (an :class:`AutogradTape` of :meth:`tape_step`, or what
        ``integrate(..., tapes=...)`` appended). ``k``: the step's index; without it, the
        steps are taken to come in the order the contract of
        :class:`~amaml.flow.memory.AbstractMemory` fixes (``N-1`` down to 0)."""
        if k is None:
            k = self._next_k
        self._next_k = k - 1
        if isinstance(tape, AutogradTape):
            lam_z, cots = self._tape_vjp(tape, lam)
        else:
            lam_z, cots = self.choice.kernel.vjp(k, u, lam, self.reads, self.need, tape)
        self.add_bars(cots, k)
        return lam_z

    def _tape_vjp(self, tape: AutogradTape, lam: Tensor) -> tuple[Tensor, Cotangents]:
        wanted = [(i, t) for i, t in tape.leaves if self.need[i]]
        res = torch.autograd.grad(tape.out, [tape.start, *(t for _, t in wanted)], lam,
                                  allow_unused=True)
        lam_z = res[0] if res[0] is not None else torch.zeros_like(tape.start)
        return lam_z, [(i, g) for (i, _), g in zip(wanted, res[1:])]

    def tape_step(self, u: Tensor, k: int) -> tuple[Tensor, AutogradTape]:
        """Step ``k`` from ``u`` with its autograd graph kept: ``(u_{k+1}, tape)``; pass the
        tape to :meth:`vjp` for that step (a backward pass through the graph, no
        recomputation: what unrolling does)."""
        kernel = self.choice.kernel
        if not isinstance(kernel, AutogradKernel):
            kernel = self._graphs = self._graphs or AutogradKernel(self.spec)
        out, start, leaves = kernel.tape(k, u, self.reads, self.need)
        return out.detach(), AutogradTape(out, start, leaves, k)

    def tape_numel(self) -> int:
        """Numbers one step's record holds (0 where the kernel records nothing): a memory
        strategy weighs them against the states it keeps."""
        return self.choice.kernel.active()[0].tape_numel(self.reads)

    def tape_flops(self) -> int:
        """Floating-point operations one step's record saves its VJP (0: not known)."""
        return self.choice.kernel.active()[0].tape_flops(self.reads)

    def field_vjp(self, u: Tensor, lam: Tensor) -> tuple[Tensor, Tensor, Cotangents]:
        """Gradient flow's unit-step field ``F(u) = -lr (grad L(u) + mu (u - theta))``,
        ``J_F(u)^T lam`` and ``(dF/dreads)^T lam`` for the needed reads (what a continuous
        adjoint integrates; :class:`~amaml.flow.memory.Backsolve`). ``u``: ``(..., P)``."""
        if not isinstance(self.spec.step_map, AbstractSolver) or self.reads.per_step \
                or self.reads.batches is not None or len(self.bars) > FIRST_DATA + len(
                    self.reads.data) or any(self.need[FIRST_DATA:]):
            raise ValueError("field_vjp is defined for gradient flow only, not for a general "
                             "step map (inner optimiser, schedules, meta-parameters).")
        with torch.enable_grad():
            leaves = self.reads.leaves(self.need, 0)
            r = leaves.at(0)
            ul = u.detach().requires_grad_(True)
            g = self.spec.objective.grad(ul, r.data, create_graph=True)
            f = -r.lr * (g if r.mu is None else g + r.mu * (ul - r.theta))
            wanted = list(leaves.wanted(self.need))
            res = torch.autograd.grad(f, [ul, *(t for _, t in wanted)], lam, allow_unused=True)
        return f.detach(), res[0], [(i, g) for (i, _), g in zip(wanted, res[1:])]

    def add_bars(self, grads: Cotangents, k: int = 0) -> None:
        """Add step ``k``'s cotangents ``(index in reads.tensors(), g)`` to :attr:`bars`; a
        per-step rate's go into its row ``k``."""
        bars = self.bars
        for i, g in grads:
            if g is None:
                continue
            if i == LR and self.reads.per_step:
                if bars[LR] is None:
                    bars[LR] = torch.zeros_like(self.reads.lr)
                row = bars[LR]
                assert row is not None
                row[k] += g
            else:
                prev = bars[i]
                bars[i] = g if prev is None else prev + g
