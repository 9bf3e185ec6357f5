"""One flow and its tensors, as the adjoints and memory strategies receive it.

:class:`FlowContext` bundles a flow's spec (:class:`~amaml.flow.trajectory.FlowSpec`) with
its tensors and offers what a memory strategy needs: the initial state, the forward steps
(:meth:`FlowContext.integrate`), one step back (:meth:`FlowContext.vjp`, by the kernel
:func:`~amaml.flow.kernels.select_kernel` chooses), a step taken with its autograd graph
kept (:meth:`FlowContext.tape_step`, an :class:`AutogradTape`), and the continuous field's
VJP for backsolve. Gradient flow's steps live in :mod:`amaml.flow.trajectory`, a general
step map's in :mod:`amaml.flow.steps`; this module dispatches between them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .compiled import Need
from .hvp import make_field
from .kernels import KernelChoice, select_kernel
from .steps import (
    RngLog,
    add_cotangents,
    initial_state,
    integrate_steps,
    params_of,
    step_vjp,
    tape_step,
)
from .trajectory import (
    FlowSpec,
    StepTape,
    SweepStats,
    accumulate,
    can_tape,
    check_every,
    flow_step_vjp,
    initial_flow_state,
    integrate,
    param_leaves,
    param_names,
)

_LOG = logging.getLogger("amaml")

__all__ = ["AutogradTape", "FlowContext"]


@dataclass
class AutogradTape:
    """One step taken with its autograd graph kept (what unrolled MAML keeps for every
    step): its output, the leaf it started from and the named parameter leaves. The VJP of
    the step is then one backward pass through this graph, which it frees."""

    out: Tensor
    start: Tensor
    leaves: list[tuple[str, Tensor]]
    k: int

    def nbytes(self) -> int:
        """Bytes of the tensors the graph saved (each storage once; the leaves, which
        exist anyway, not counted), read from the nodes' ``_saved_*`` attributes."""
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
            for name in dir(node):
                if not name.startswith("_saved_"):
                    continue
                try:
                    value = getattr(node, name)
                except RuntimeError:  # already freed
                    continue
                for t in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(t, Tensor):
                        storage = t.untyped_storage()
                        ptr = storage.data_ptr()
                        if ptr not in seen and ptr not in skip:
                            seen.add(ptr)
                            total += storage.nbytes()
            stack.extend(nxt for nxt, _ in node.next_functions)
        return total



@dataclass(frozen=True)
class FlowContext:
    """One flow and its tensors, as the adjoint and memory strategies receive it.

    A memory strategy needs only :meth:`initial_state`, :meth:`integrate` (forward and
    recomputation) and :meth:`vjp` (one step back); see
    :class:`~amaml.flow.memory.AbstractMemory`.

    Attributes:
        spec: The flow (objective, solver, adjoint, ``n_steps``).
        theta: Meta-parameters ``(P,)``.
        dt: Step size: a 0-d tensor or ``(P,)`` per-parameter rates.
        mu: Proximal weight (0-d), ``None`` when the flow has no proximal term.
        data: The support data tensors.
        need: Which of ``(theta, dt, mu)`` need a gradient (backward pass only).
        bars: Parameter cotangents ``(dPhi/dp)^T lam`` summed so far, by name
            (``"theta"``, ``"dt"``, ``"mu"``, and for a general step map ``"data{i}"``,
            ``"extra{j}"``); :meth:`vjp` adds to it.
        stats: Peak states held and steps recomputed, for tests and benchmarks.
        extras: A general step map's extra tensors (hyperparameters, captured tensors).
        need_data, need_extras: Which data and extra tensors need a gradient.
    """

    spec: FlowSpec
    theta: Tensor
    dt: Tensor
    mu: Tensor | None
    data: Sequence[Tensor]
    need: Need = (False, False, False)
    bars: dict[str, Tensor] = field(default_factory=dict)
    stats: SweepStats = field(default_factory=SweepStats)
    extras: Sequence[Tensor] = ()
    need_data: Sequence[bool] = ()
    need_extras: Sequence[bool] = ()
    #: The step the next :meth:`vjp` without ``k`` transposes (strategies go N-1 .. 0).
    _cursor: list[int] = field(default_factory=list, repr=False)
    _kernel: list[KernelChoice] = field(default_factory=list, repr=False)

    def kernel(self) -> KernelChoice:
        """The kernel of this flow's step VJPs and why not the faster ones
        (:func:`~amaml.flow.kernels.select_kernel`; chosen once per sweep)."""
        compiled = self.spec.compiled
        if not self._kernel or (self._kernel[0].name == "compiled"
                                and getattr(compiled, "failed", False)):
            spec = self.spec
            self._kernel[:] = [select_kernel(spec.objective, spec.solver, spec.inner, compiled,
                                             self.need_data, self.need_extras)]
            _LOG.debug("step VJP kernel: %s", self._kernel[0].describe())
        return self._kernel[0]

    @property
    def n_steps(self) -> int:
        """``N``, the number of solver steps."""
        return self.spec.n_steps

    def initial_state(self) -> Tensor:
        """``u_0 = theta``: ``(P,)``, or ``(B, P)`` (one row per task) if batched. For a
        general step map the state ``z_0 = (theta, 0, ...)``: ``(rows, P)`` or ``(B, rows,
        P)``."""
        if self.spec.inner is not None:
            return initial_state(self.spec.inner, self.theta.detach())
        return initial_flow_state(self.theta, self.spec.objective, self.data)

    def params(self, state: Tensor) -> Tensor:
        """The parameters ``u`` of a state (the state itself for gradient flow)."""
        return state if self.spec.inner is None else params_of(state)

    def integrate(
        self,
        u0: Tensor | None = None,
        start: int = 0,
        stop: int | None = None,
        *,
        keep_every: int | None = None,
        out: Tensor | None = None,
        create_graph: bool = False,
        tapes: list[StepTape] | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Steps ``start .. stop-1`` from ``u0`` (the state at ``start``); see :func:`integrate`.

        Returns:
            ``(u_stop, kept_states)``.
        """
        spec = self.spec
        if spec.inner is not None:
            z0 = self.initial_state() if u0 is None else u0
            if create_graph and u0 is None:  # unrolled: the graph starts at theta
                z0 = torch.cat([self.theta.expand(*z0.shape[:-2], 1, -1),
                                z0[..., 1:, :]], dim=-2)
            return integrate_steps(spec.inner, spec.objective, spec.solver, spec.n_steps,
                                   self.theta, self.dt, self.mu, self.data, self.extras, z0,
                                   start, spec.n_steps if stop is None else stop,
                                   keep_every=keep_every, out=out, create_graph=create_graph,
                                   check_every=check_every(spec.n_steps),
                                   compiled=spec.compiled, rng=self._rng())
        return integrate(self.spec, self.theta, self.dt, self.mu, self.data,
                         keep_every=keep_every, create_graph=create_graph, u0=u0,
                         start=start, stop=stop, out=out, tapes=tapes)

    def _rng(self) -> RngLog | None:
        """The random states of a random loss's steps, kept with the flow's spec."""
        inner = self.spec.inner
        if inner is None or not inner.random:
            return None
        log: RngLog = self.spec.scratch.setdefault("rng", {})
        return log

    def solve(self) -> Tensor:
        """``u_N``, differentiable as the flow's adjoint provides (``spec.adjoint.solve``)."""
        result: Tensor = self.spec.adjoint.solve(self)
        return result

    @property
    def check_every(self) -> int:
        """How often (in steps) a strategy should check its states for non-finite values."""
        return check_every(self.spec.n_steps)

    def field_vjp(self, u: Tensor, lam: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The unit-step field ``F(u) = -dt (grad L(u) + mu (u - theta))`` of gradient flow,
        ``J_F(u)^T lam`` and ``{name: (dF/dp)^T lam}`` for the needed ``theta``, ``dt``,
        ``mu`` (what a continuous adjoint integrates; :class:`~amaml.flow.memory.Backsolve`).
        """
        if self.spec.inner is not None:
            raise ValueError("field_vjp is defined for gradient flow only, not for a general "
                             "step map (inner optimiser, schedules, meta-parameters).")
        th, d, m, params = param_leaves(self.theta, self.dt, self.mu, self.need)
        with torch.enable_grad():
            u = u.detach().requires_grad_(True)
            f = make_field(self.spec.objective, self.data, th, d, m, create_graph=True)(u)
            grads = torch.autograd.grad(f, [u, *params], lam)
        return f.detach(), grads[0], dict(zip(param_names(th, d, m), grads[1:]))

    def zero_bars(self) -> dict[str, Tensor]:
        """Zeros shaped like each parameter (``theta``, ``dt``, ``mu``) that
        :meth:`field_vjp` gives a cotangent for, in its order."""
        th, d, m, _ = param_leaves(self.theta, self.dt, self.mu, self.need)
        like = {"theta": th, "dt": d, "mu": m}
        return {n: torch.zeros_like(t.detach()) for n in param_names(th, d, m)
                if (t := like[n]) is not None}

    def add_bars(self, grads: dict[str, Tensor]) -> None:
        """Add parameter cotangents by name to :attr:`bars`."""
        accumulate(self.bars, list(grads), list(grads.values()))

    def _tape_vjp(self, tape: AutogradTape, lam: Tensor) -> Tensor:
        need = {"theta": self.need[0], "dt": self.need[1], "mu": self.need[2]}
        for i, n in enumerate(self.need_data):
            need[f"data{i}"] = n
        for j, n in enumerate(self.need_extras):
            need[f"extra{j}"] = n
        wanted = [(n, t) for n, t in tape.leaves if need.get(n, False)]
        res = torch.autograd.grad(tape.out, [tape.start, *(t for _, t in wanted)], lam,
                                  allow_unused=True)
        names = [n for n, _ in wanted]
        if self.spec.inner is not None:
            add_cotangents(self.spec.inner, self.bars, tape.k, self.dt, names, res[1:])
        else:
            accumulate(self.bars, names, list(res[1:]))
        return res[0] if res[0] is not None else torch.zeros_like(tape.start)

    def tape_numel(self) -> int:
        """Numbers one step's tape holds (0 where this flow keeps none; see
        :func:`can_tape`): a memory strategy weighs them against the states it keeps."""
        fused = self.spec.objective.fused
        if fused is None or not can_tape(self.spec):
            return 0
        return fused.tape_numel(self.data) * self.spec.solver.stages

    def tape_step(self, u: Tensor, k: int) -> tuple[Tensor, AutogradTape]:
        """Step ``k`` from ``u`` with its autograd graph kept: ``(u_{k+1}, tape)``; pass the
        tape to :meth:`vjp` for that step (a backward pass through the graph, no
        recomputation: what unrolling does). Every tensor that requires grad now is a leaf
        of the graph."""
        spec = self.spec
        if spec.inner is not None:
            out, start, leaves = tape_step(spec.inner, spec.objective, spec.solver, k, u,
                                           self.theta, self.dt, self.mu, self.data,
                                           self.extras, self._rng())
        else:
            need = (self.theta.requires_grad, self.dt.requires_grad,
                    self.mu is not None and self.mu.requires_grad)
            th, d, m, _ = param_leaves(self.theta, self.dt, self.mu, need)
            with torch.enable_grad():
                start = u.detach().requires_grad_(True)
                field_fn = make_field(spec.objective, self.data, th, d, m, create_graph=True)
                out = spec.solver.step(field_fn, start)
            named = {"theta": th, "dt": d, "mu": m}
            leaves = [(n, t) for n in param_names(th, d, m) if (t := named[n]) is not None]
        return out.detach(), AutogradTape(out, start, leaves, k)

    def vjp(self, u: Tensor, lam: Tensor, tape: StepTape | AutogradTape | None = None,
            k: int | None = None) -> Tensor:
        """One step back: ``(dPhi/du (u))^T lam``, where ``u`` is the state the step starts
        from; adds ``(dPhi/dp (u))^T lam`` to :attr:`bars` for the needed parameters.
        ``tape``: what ``integrate(..., tapes=...)`` recorded for this step, if anything.
        ``k``: the step's index; without it, the steps are taken to come in the order the
        contract of :class:`~amaml.flow.memory.AbstractMemory` fixes (``N-1`` down to 0)
        (a general step map depends on ``k``: rates, bias corrections, mini-batches)."""
        if k is None:
            k = self._cursor[0] if self._cursor else self.n_steps - 1
        self._cursor[:] = [k - 1]
        spec = self.spec
        if isinstance(tape, AutogradTape):
            return self._tape_vjp(tape, lam)
        kernel = self.kernel().name
        if spec.inner is not None:
            return step_vjp(spec.inner, spec.objective, spec.solver, k, u, lam, self.theta,
                            self.dt, self.mu, self.data, self.extras, self.need,
                            self.need_data, self.need_extras, self.bars, kernel,
                            spec.compiled, self._rng())
        return flow_step_vjp(self.spec, u, lam, self.theta, self.dt, self.mu, self.data,
                         self.need, self.bars, tape, kernel)
