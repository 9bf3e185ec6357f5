"""The discrete trajectory ``u_0 .. u_N``: run it forward, transpose it one step at a time.

One step is ``u_{k+1} = Phi(u_k) = solver.step(F, u_k)`` on the unit-step field
``F(u) = -dt * (grad L(u) + mu (u - theta))``, ``u_0 = theta``. :func:`integrate` runs
steps ``start .. stop-1`` (keeping some states, or building the graph for unrolled MAML);
:func:`flow_step_vjp` gives one step's vector-Jacobian product ``(dPhi/du)^T lam`` and adds
``(dPhi/dp)^T lam`` for ``p`` in ``(theta, dt, mu)``, by the fused or the autograd kernel.
:class:`~amaml.flow.context.FlowContext` bundles one flow's tensors with both (and with the
general step maps of :mod:`amaml.flow.steps`), and is what the adjoints and memory
strategies receive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .compiled import Need
from .errors import DivergenceError
from .hvp import Objective, make_field
from .kernels import is_tableau, select_kernel
from .scope import StepScope, Watched
from .solvers import AbstractSolver
from .steps import InnerLoop

__all__ = ["FlowSpec", "StepTape", "SweepStats", "accumulate", "can_tape", "check_every",
           "flow_step_vjp", "initial_flow_state", "integrate", "param_leaves", "param_names"]


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
    #: tensors it keeps (e.g. :class:`~amaml.flow.budget.Budget`'s autograd tapes); one
    #: dict per flow (a flow's spec is made per call).
    scratch: dict[str, Any] = field(default_factory=dict, compare=False, hash=False,
                                    repr=False)
    #: The context every evaluation of the steps runs in, forward and backward (module
    #: flags and attention kernel as when the loop ran; :mod:`amaml.flow.scope`).
    scope: StepScope = field(default_factory=StepScope, compare=False, hash=False, repr=False)
    #: Tensors the steps read outside the Function's inputs, checked unchanged before a
    #: backward pass evaluates the steps again.
    watched: Watched = field(default_factory=Watched, compare=False, hash=False, repr=False)


@dataclass
class SweepStats:
    """Bookkeeping of one adjoint sweep, for tests and benchmarks."""

    peak_states: int = 0
    recomputed_steps: int = 0
    #: Step VJPs that reused the tape of their recomputed forward step (fused path).
    taped_steps: int = 0


def initial_flow_state(theta: Tensor, objective: Objective, data: Sequence[Tensor]) -> Tensor:
    if objective.batched:
        return theta.expand(data[0].shape[0], *theta.shape).contiguous()
    return theta


def check_every(n_steps: int) -> int:
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
            the fused loss's tapes of their gradients) for :func:`flow_step_vjp` to reuse.
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
    u = initial_flow_state(theta, spec.objective, data) if u0 is None else u0
    kept: list[Tensor] = []
    every = check_every(spec.n_steps)
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


def param_leaves(
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


def accumulate(bars: dict[str, Tensor], names: list[str], grads: Sequence[Tensor | None]) -> None:
    for name, g in zip(names, grads):
        if g is None:
            continue
        bars[name] = g if name not in bars else bars[name] + g


def param_names(th: Tensor, d: Tensor, m: Tensor | None) -> list[str]:
    """The names (``theta``, ``dt``, ``mu``) of the leaves of :func:`param_leaves` that need
    grad."""
    names = []
    if th.requires_grad:
        names.append("theta")
    if d.requires_grad:
        names.append("dt")
    if m is not None and m.requires_grad:
        names.append("mu")
    return names


def flow_step_vjp(
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
            accumulate(bars, list(pbars), list(pbars.values()))
            return lam_u
        kernel = select_kernel(spec.objective, spec.solver, None, spec.compiled).name
    if kernel == "fused":
        return _fused_step_vjp(spec, u.detach(), lam, theta.detach(), dt.detach(),
                               None if mu is None else mu.detach(), data, need, bars, tape)
    th, d, m, params = param_leaves(theta, dt, mu, need)
    with torch.enable_grad():
        u = u.detach().requires_grad_(True)
        field_fn = make_field(spec.objective, data, th, d, m, create_graph=True)
        u_next = spec.solver.step(field_fn, u)
        grads = torch.autograd.grad(u_next, [u, *params], lam)
    accumulate(bars, param_names(th, d, m), grads[1:])
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
    """:func:`flow_step_vjp` from the loss's own gradient and Hessian-vector products.

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
            accumulate(bars, ["dt"], [gd])
        if mu is not None and need[2]:
            accumulate(bars, ["mu"], [-(dw * (states[i] - theta)).sum()])
        if mu is not None and need[0]:
            accumulate(bars, ["theta"], [mu * (dw.sum(0) if batched else dw)])
    return lam_u
