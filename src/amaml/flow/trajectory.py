"""The discrete trajectory ``u_0 .. u_N``: run it forward, transpose it one step at a time.

One step is ``u_{k+1} = Phi(u_k) = solver.step(F, u_k)`` on the unit-step field
``F(u) = -dt * (grad L(u) + mu (u - theta))``, ``u_0 = theta``. :func:`integrate` runs
steps ``start .. stop-1`` (keeping some states, or building the graph for unrolled MAML);
:func:`_step_vjp` gives one step's vector-Jacobian product ``(dPhi/du)^T lam`` and adds
``(dPhi/dp)^T lam`` for ``p`` in ``(theta, dt, mu)``. :class:`FlowContext` bundles one flow's
tensors with both, and is what the adjoint and memory strategies receive.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .compiled import Need
from .errors import DivergenceError
from .hvp import Objective, make_field
from .kernels import KernelChoice, is_tableau, select_kernel
from .solvers import AbstractSolver
from .steps import (
    InnerLoop,
    add_cotangents,
    initial_state,
    integrate_steps,
    params_of,
    step_vjp,
    tape_step,
)

_LOG = logging.getLogger("amaml")

__all__ = ["AutogradTape", "FlowContext", "FlowSpec", "StepTape", "SweepStats", "can_tape",
           "integrate"]


@dataclass(frozen=True)
class FlowSpec:
    """Everything non-tensor about one flow: passed through the autograd Function."""

    objective: Objective
    solver: AbstractSolver
    #: The :class:`~amaml.flow.adjoint.AbstractAdjoint` (typed ``Any``: the adjoints import
    #: this module, and it imports none of theirs).
    adjoint: Any
    n_steps: int
    has_mu: bool
    #: Compiled kernels: :class:`~amaml.flow.compiled.StepFunctions` for gradient flow,
    #: :class:`~amaml.flow.compiled_maps.MapFunctions` for a general step map.
    compiled: Any = None
    #: A general step map (inner optimiser, per-step rates, mini-batches, meta-parameters
    #: beyond theta): the state is ``(rows, P)`` per task; ``None``: gradient flow on ``u``.
    inner: InnerLoop | None = None
    #: How many extra tensors (hyperparameters, then captured ones) follow the data.
    n_extra: int = 0
    #: What a memory strategy holds between the forward and the backward pass besides the
    #: tensors it keeps (e.g. :class:`~amaml.flow.memory.Budget`'s autograd tapes); one
    #: dict per flow (a flow's spec is made per call).
    scratch: dict[str, Any] = field(default_factory=dict, compare=False, hash=False,
                                    repr=False)


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


@dataclass
class SweepStats:
    """Bookkeeping of one adjoint sweep, for tests and benchmarks."""

    peak_states: int = 0
    recomputed_steps: int = 0
    #: Step VJPs that reused the tape of their recomputed forward step (fused path).
    taped_steps: int = 0


def _initial_state(theta: Tensor, objective: Objective, data: Sequence[Tensor]) -> Tensor:
    if objective.batched:
        return theta.expand(data[0].shape[0], *theta.shape).contiguous()
    return theta


def _check_every(n_steps: int) -> int:
    """How often the state is checked for non-finite values (a check syncs a GPU)."""
    return max(1, math.isqrt(n_steps))


def _locate_divergence(
    spec: FlowSpec, field_fn: Any, u: Tensor, start: int, stop: int
) -> DivergenceError:
    """Replay steps ``start..stop`` from the last finite state to name the first bad one."""
    for k in range(start, stop):
        u = spec.solver.step(field_fn, u)
        if not bool(torch.isfinite(u).all()):
            return DivergenceError(k + 1, spec.n_steps, f" (solver {spec.solver.name})")
    return DivergenceError(stop, spec.n_steps, f" (solver {spec.solver.name})")


def integrate(
    spec: FlowSpec,
    theta: Tensor,
    dt: Tensor,
    mu: Tensor | None,
    data: Sequence[Tensor],
    *,
    keep_every: int | None = None,
    create_graph: bool = False,
    u0: Tensor | None = None,
    start: int = 0,
    stop: int | None = None,
    out: Tensor | None = None,
    tapes: list[StepTape] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Integrate the flow from step ``start`` (state ``u0``) to ``stop``.

    Args:
        spec: The flow.
        theta, dt, mu: Its parameters (``mu`` is ``None`` without proximal term).
        data: The support data tensors.
        keep_every: Keep the state at every step ``k`` with ``(k - start) % keep_every == 0``
            and ``k < stop`` (``1`` keeps all but the last; ``None`` keeps none).
        create_graph: Build the autograd graph of every step (unrolled MAML).
        u0: The state at step ``start``; ``None`` means ``u_0 = theta`` (per task if batched).
        start, stop: The steps to take (``stop=None`` means ``spec.n_steps``).
        out: Optional buffer with one row per kept state (no graph): the kept states
            are written into it, so that stacking them later needs no second copy.
        tapes: Optional list: each step appends its :data:`StepTape` (the stage states and
            the fused loss's tapes of their gradients) for :func:`_step_vjp` to reuse.
            Only where :func:`can_tape` (else nothing is appended).

    Returns:
        ``(u_stop, kept_states)`` (with ``out``, the kept states are rows of ``out``).

    Raises:
        DivergenceError: If the state becomes non-finite; names the first bad step.
    """
    stop = spec.n_steps if stop is None else stop
    record: list[tuple[Tensor, Any]] | None = None
    if tapes is not None and not create_graph and can_tape(spec):
        record = []
    field_fn = make_field(spec.objective, data, theta, dt, mu, create_graph, record)
    u = _initial_state(theta, spec.objective, data) if u0 is None else u0
    kept: list[Tensor] = []
    every = _check_every(spec.n_steps)
    last_ok, last_ok_k = u, start
    fast = None if create_graph else spec.compiled
    consts = (theta.detach(), dt.detach(), None if mu is None else mu.detach())
    for k in range(start, stop):
        if keep_every is not None and (k - start) % keep_every == 0:
            if out is not None:
                row = out[len(kept)]
                row.copy_(u)
                u = row
            kept.append(u)
        u_next = None if fast is None else fast.step(u, *consts, data)
        if u_next is None:
            fast = None
            u_next = spec.solver.step(field_fn, u)
            if record is not None and tapes is not None:
                tapes.append(record[:])
                record.clear()
        u = u_next
        if (k + 1 - start) % every == 0 or k + 1 == stop:
            if not bool(torch.isfinite(u).all()):
                replay = make_field(spec.objective, data, theta.detach(), dt.detach(),
                                    None if mu is None else mu.detach(), False)
                raise _locate_divergence(spec, replay, last_ok.detach(), last_ok_k, k + 1)
            last_ok, last_ok_k = u, k + 1
    return u, kept


# ----------------------------------------------------------------------------- step VJPs

#: One step's stage states ``U_i`` and the fused loss's tape of ``g(U_i)`` for each stage.
StepTape = list[tuple[Tensor, Any]]


def can_tape(spec: FlowSpec) -> bool:
    """Whether the steps of this flow can keep tapes that make their VJPs cheaper: a fused
    loss, a tableau solver, and no compiled step functions (whether the loss keeps
    anything is its :meth:`~amaml.flow.fused.AbstractFusedLoss.tape_numel`)."""
    fused = spec.objective.fused
    return (fused is not None and spec.compiled is None and spec.inner is None
            and is_tableau(spec.solver))


def _leaves(
    theta: Tensor, dt: Tensor, mu: Tensor | None, need: Need
) -> tuple[Tensor, Tensor, Tensor | None, list[Tensor]]:
    """Detached copies of the parameters; those whose gradient is needed require grad.

    ``theta`` enters a step only through the proximal term, so it needs no grad without it.
    """
    th = theta.detach().requires_grad_(need[0] and mu is not None)
    d = dt.detach().requires_grad_(need[1])
    m = None if mu is None else mu.detach().requires_grad_(need[2])
    params = [t for t in (th, d, m) if t is not None and t.requires_grad]
    return th, d, m, params


def _accumulate(bars: dict[str, Tensor], names: list[str], grads: Sequence[Tensor | None]) -> None:
    for name, g in zip(names, grads):
        if g is None:
            continue
        bars[name] = g if name not in bars else bars[name] + g


def _param_names(th: Tensor, d: Tensor, m: Tensor | None) -> list[str]:
    """The names (``theta``, ``dt``, ``mu``) of the leaves of :func:`_leaves` that need grad."""
    names = []
    if th.requires_grad:
        names.append("theta")
    if d.requires_grad:
        names.append("dt")
    if m is not None and m.requires_grad:
        names.append("mu")
    return names


def _step_vjp(
    spec: FlowSpec,
    u: Tensor,
    lam: Tensor,
    theta: Tensor,
    dt: Tensor,
    mu: Tensor | None,
    data: Sequence[Tensor],
    need: Need,
    bars: dict[str, Tensor],
    tape: StepTape | None = None,
    kernel: str | None = None,
) -> Tensor:
    """``(dPhi/du)^T lam``; adds ``(dPhi/dp)^T lam`` for the needed parameters to ``bars``.

    ``tape``: what :func:`integrate` recorded when it took this step from ``u`` (the
    result is the same; the fused path then skips recomputing the stages). ``kernel``:
    the choice of :func:`~amaml.flow.kernels.select_kernel` (made here if ``None``)."""
    if kernel is None:
        kernel = select_kernel(spec.objective, spec.solver, None, spec.compiled).name
    if kernel == "compiled" and spec.compiled is not None:
        res = spec.compiled.vjp(u.detach(), lam, theta.detach(), dt.detach(),
                                None if mu is None else mu.detach(), data, need)
        if res is not None:
            lam_u, pbars = res
            _accumulate(bars, list(pbars), list(pbars.values()))
            return lam_u
        kernel = select_kernel(spec.objective, spec.solver, None, spec.compiled).name
    if kernel == "fused":
        return _fused_step_vjp(spec, u.detach(), lam, theta.detach(), dt.detach(),
                               None if mu is None else mu.detach(), data, need, bars, tape)
    th, d, m, params = _leaves(theta, dt, mu, need)
    with torch.enable_grad():
        u = u.detach().requires_grad_(True)
        field_fn = make_field(spec.objective, data, th, d, m, create_graph=True)
        u_next = spec.solver.step(field_fn, u)
        grads = torch.autograd.grad(u_next, [u, *params], lam)
    _accumulate(bars, _param_names(th, d, m), grads[1:])
    return grads[0]


def _fused_step_vjp(
    spec: FlowSpec,
    u: Tensor,
    lam: Tensor,
    theta: Tensor,
    dt: Tensor,
    mu: Tensor | None,
    data: Sequence[Tensor],
    need: Need,
    bars: dict[str, Tensor],
    tape: StepTape | None = None,
) -> Tensor:
    """:func:`_step_vjp` from the loss's own gradient and Hessian-vector products.

    The step of an explicit Runge-Kutta tableau ``(a, b)`` on ``F(U) = -dt (g(U) +
    mu (U - theta))`` is ``U_i = u + sum_j a_ij k_j``, ``k_i = F(U_i)``,
    ``Phi(u) = u + sum_i b_i k_i``. Its transpose, stage by stage from the last:
    ``w_i = b_i lam + sum_{j > i} a_ji bar_U_j`` (the cotangent of ``k_i``),
    ``bar_U_i = J_F(U_i)^T w_i = -(H(U_i) + mu) (dt w_i)`` (``H`` is symmetric), and
    ``(dPhi/du)^T lam = lam + sum_i bar_U_i``; the parameters collect
    ``bar_dt = -sum_i (g(U_i) + mu (U_i - theta)) w_i``,
    ``bar_mu = -sum_i dt (U_i - theta) . w_i``, ``bar_theta = mu sum_i dt w_i``
    (summed over tasks when batched). No autograd graph is built. With the step's
    ``tape`` the stage states and the forward halves of their derivatives are reused.
    """
    fused = spec.objective.fused
    if fused is None:
        raise TypeError("_fused_step_vjp needs an objective with its own derivatives.")
    a, b = spec.solver.a, spec.solver.b
    stages = len(b)
    batched = spec.objective.batched
    # The stage states U_i, recomputed (Euler: U_0 = u, nothing to recompute).
    states = [u]
    stage_tapes: list[Any] = [None] * stages
    if tape is not None and len(tape) == stages:
        states = [ui.detach() for ui, _ in tape]
        stage_tapes = [t for _, t in tape]
    ks: list[Tensor] = []
    for i in range(len(states), stages):
        g = fused.grad(states[i - 1], data)
        if mu is not None:
            g = g + mu * (states[i - 1] - theta)
        ks.append(-dt * g)
        ui = u
        for aij, kj in zip(a[i], ks):
            if aij != 0.0:
                ui = ui + aij * kj
        states.append(ui)
    del ks
    bar_u: list[Tensor | None] = [None] * stages
    lam_u = lam
    for i in range(stages - 1, -1, -1):
        w = b[i] * lam if b[i] != 1.0 else lam
        for j in range(i + 1, stages):
            bj = bar_u[j]
            if bj is not None and a[j][i] != 0.0:
                w = w + a[j][i] * bj
        dw = dt * w
        g_i, hv = fused.grad_hvp(states[i], dw, data, with_grad=need[1], tape=stage_tapes[i])
        back = hv if mu is None else hv + mu * dw
        bar_u[i] = -back
        lam_u = lam_u - back
        if need[1] and g_i is not None:
            field = g_i if mu is None else g_i + mu * (states[i] - theta)
            gd = -(field * w)
            if dt.ndim == 0:
                gd = gd.sum()
            elif batched:
                gd = gd.sum(0)
            _accumulate(bars, ["dt"], [gd])
        if mu is not None and need[2]:
            _accumulate(bars, ["mu"], [-(dw * (states[i] - theta)).sum()])
        if mu is not None and need[0]:
            _accumulate(bars, ["theta"], [mu * (dw.sum(0) if batched else dw)])
    return lam_u


# ----------------------------------------------------------------------------- context


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
        return _initial_state(self.theta, self.spec.objective, self.data)

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
                                   check_every=_check_every(spec.n_steps),
                                   compiled=spec.compiled)
        return integrate(self.spec, self.theta, self.dt, self.mu, self.data,
                         keep_every=keep_every, create_graph=create_graph, u0=u0,
                         start=start, stop=stop, out=out, tapes=tapes)

    def solve(self) -> Tensor:
        """``u_N``, differentiable as the flow's adjoint provides (``spec.adjoint.solve``)."""
        result: Tensor = self.spec.adjoint.solve(self)
        return result

    @property
    def check_every(self) -> int:
        """How often (in steps) a strategy should check its states for non-finite values."""
        return _check_every(self.spec.n_steps)

    def field_vjp(self, u: Tensor, lam: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The unit-step field ``F(u) = -dt (grad L(u) + mu (u - theta))`` of gradient flow,
        ``J_F(u)^T lam`` and ``{name: (dF/dp)^T lam}`` for the needed ``theta``, ``dt``,
        ``mu`` (what a continuous adjoint integrates; :class:`~amaml.flow.memory.Backsolve`).
        """
        if self.spec.inner is not None:
            raise ValueError("field_vjp is defined for gradient flow only, not for a general "
                             "step map (inner optimiser, schedules, meta-parameters).")
        th, d, m, params = _leaves(self.theta, self.dt, self.mu, self.need)
        with torch.enable_grad():
            u = u.detach().requires_grad_(True)
            f = make_field(self.spec.objective, self.data, th, d, m, create_graph=True)(u)
            grads = torch.autograd.grad(f, [u, *params], lam)
        return f.detach(), grads[0], dict(zip(_param_names(th, d, m), grads[1:]))

    def zero_bars(self) -> dict[str, Tensor]:
        """Zeros shaped like each parameter (``theta``, ``dt``, ``mu``) that
        :meth:`field_vjp` gives a cotangent for, in its order."""
        th, d, m, _ = _leaves(self.theta, self.dt, self.mu, self.need)
        like = {"theta": th, "dt": d, "mu": m}
        return {n: torch.zeros_like(t.detach()) for n in _param_names(th, d, m)
                if (t := like[n]) is not None}

    def add_bars(self, grads: dict[str, Tensor]) -> None:
        """Add parameter cotangents by name to :attr:`bars`."""
        _accumulate(self.bars, list(grads), list(grads.values()))

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
            _accumulate(self.bars, names, list(res[1:]))
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
                                           self.extras)
        else:
            need = (self.theta.requires_grad, self.dt.requires_grad,
                    self.mu is not None and self.mu.requires_grad)
            th, d, m, _ = _leaves(self.theta, self.dt, self.mu, need)
            with torch.enable_grad():
                start = u.detach().requires_grad_(True)
                field_fn = make_field(spec.objective, self.data, th, d, m, create_graph=True)
                out = spec.solver.step(field_fn, start)
            named = {"theta": th, "dt": d, "mu": m}
            leaves = [(n, t) for n in _param_names(th, d, m) if (t := named[n]) is not None]
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
                            spec.compiled)
        return _step_vjp(self.spec, u, lam, self.theta, self.dt, self.mu, self.data,
                         self.need, self.bars, tape, kernel)
