"""Adjoints: how ``d u(T) / d (theta, dt, mu)`` is computed, and the one autograd Function.

The forward map is ``N`` unit steps ``u_{k+1} = Phi(u_k) = step(F, u_k)`` of an
explicit Runge-Kutta solver on ``F(u) = -dt * (grad L(u) + mu (u - theta))``,
``u_0 = theta``. Given the cotangent ``lam_N = dJ/du_N`` the exact discrete adjoint is

    lam_k = (dPhi/du (u_k))^T lam_{k+1}
    dJ/dp = sum_k (dPhi/dp (u_k))^T lam_{k+1}      for p in (theta, dt, mu)
    dJ/dtheta += lam_0                              (through u_0 = theta)

Each term is the vector-Jacobian product of one solver step, computed by
differentiating ``step`` itself with autograd (Hessian-vector products by double
backward; no Hessian is formed, no graph outlives one step). With
:class:`~amaml.flow.solvers.Euler` this is, to round-off, the gradient of ``N``
unrolled steps of gradient descent, i.e. second-order MAML.

Adjoints (what to compute), each implementing :meth:`AbstractAdjoint.solve`:
    :class:`Unrolled` (MAML: autograd through the whole loop, memory O(N)),
    :class:`FirstOrder` (FOMAML: identity Jacobian),
    :class:`DiscreteAdjoint` (A-MAML, exact for the discrete loop),
    :class:`Implicit` (iMAML: ``(I + H/mu)^{-1}`` by conjugate gradients).

The last two are :class:`AbstractSweepAdjoint`: a forward pass that keeps something and
a backward sweep, joined by the package's one autograd Function. A
:class:`DiscreteAdjoint` hands both to its memory strategy
(:mod:`amaml.flow.memory`): :class:`~amaml.flow.memory.Store` (all N+1 states),
:class:`~amaml.flow.memory.Checkpoint` (every k-th state, segments recomputed; about
``2 sqrt(N)`` states), :class:`~amaml.flow.memory.Revolve` (binomial checkpointing: at
most ``snapshots + 1`` states whatever ``N``, exact) or
:class:`~amaml.flow.memory.Backsolve` (only ``u_N``; the state is integrated backward with
``lam``; approximate).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .compiled import Need, compile_mode, step_functions
from .compiled_maps import map_functions
from .context import FlowContext
from .hvp import conjugate_gradient
from .memory import AbstractMemory, Checkpoint
from .trajectory import FlowSpec, SweepStats

__all__ = [
    "AbstractAdjoint",
    "AbstractSweepAdjoint",
    "DiscreteAdjoint",
    "FirstOrder",
    "Implicit",
    "Unrolled",
    "adjoint_sweep",
    "forward_kept",
]


class AbstractAdjoint(abc.ABC):
    """What ``d u(T) / d (theta, dt, mu)`` the flow provides."""

    @abc.abstractmethod
    def solve(self, flow: FlowContext) -> Tensor:
        """Integrate the flow and return ``u_N``, differentiable as this adjoint provides.

        Args:
            flow: The validated flow and its tensors (``flow.need`` is unused here).

        Returns:
            ``u_N``: ``(P,)``, or ``(B, P)`` if batched.
        """


@dataclass(frozen=True)
class Unrolled(AbstractAdjoint):
    """Back-propagate through every unrolled step (second-order MAML). Memory O(N)."""

    def solve(self, flow: FlowContext) -> Tensor:
        with flow.spec.scope():
            u_end, _ = flow.integrate(create_graph=torch.is_grad_enabled())
        return flow.params(u_end)


@dataclass(frozen=True)
class FirstOrder(AbstractAdjoint):
    """Treat ``d u(T) / d theta`` as the identity (first-order MAML). No Hessians."""

    def solve(self, flow: FlowContext) -> Tensor:
        with torch.no_grad(), flow.spec.scope():
            u_end, _ = flow.integrate()
        u_end = flow.params(u_end)
        start = flow.theta
        if flow.spec.objective.batched:
            start = start.expand(u_end.shape[0], *start.shape)
        return start + (u_end - start).detach()


class AbstractSweepAdjoint(AbstractAdjoint):
    """An adjoint made of a forward pass that keeps something and a backward sweep.

    :meth:`solve` runs both through the package's one autograd Function; the sweep
    receives ``lam_N = dJ/du_N`` and returns ``lam_0``, accumulating the parameter
    cotangents in ``flow.bars`` (see :func:`adjoint_sweep`).
    """

    @abc.abstractmethod
    def forward(self, flow: FlowContext) -> tuple[Tensor, Tensor]:
        """Integrate the flow; return ``(u_N, kept)``, ``kept`` one tensor stacked on dim 0."""

    @abc.abstractmethod
    def sweep(self, flow: FlowContext, kept: Tensor, lam: Tensor) -> Tensor:
        """From ``lam_N`` (shaped like ``u_N``) to ``lam_0``, given what ``forward`` kept."""

    def solve(self, flow: FlowContext) -> Tensor:
        u_end, _ = _FlowFn.apply(flow.theta, flow.dt, flow.mu, flow.spec, *flow.data,
                                 *flow.extras)
        return flow.params(u_end)


@dataclass(frozen=True)
class DiscreteAdjoint(AbstractSweepAdjoint):
    """The exact adjoint of the discrete solver (A-MAML), under a memory strategy.

    Args:
        memory: How the states are kept: :class:`~amaml.flow.memory.Store`,
            :class:`~amaml.flow.memory.Checkpoint` (default),
            :class:`~amaml.flow.memory.Revolve`, :class:`~amaml.flow.memory.Backsolve`,
            or any :class:`~amaml.flow.memory.AbstractMemory`.
        compile: Run each solver step and its vector-Jacobian product as functions
            compiled by :func:`torch.compile` (see :mod:`amaml.flow.compiled`): the same
            gradient, several times faster on small models, after a one-off compilation
            of tens of seconds per model, loss and data shape. A string picks the
            ``torch.compile`` mode (:data:`amaml.flow.compiled.COMPILE_MODES`), e.g.
            ``"reduce-overhead"`` for CUDA graphs on a GPU.
    """

    memory: AbstractMemory = field(default_factory=Checkpoint)
    compile: bool | str = False

    def __post_init__(self) -> None:
        if not isinstance(self.memory, AbstractMemory):
            raise TypeError(f"DiscreteAdjoint(memory=...) must be an AbstractMemory instance "
                            f"(e.g. Checkpoint()); got {self.memory!r}.")
        compile_mode(self.compile)  # raises on a bad value

    def prepare(self, flow: FlowContext) -> FlowContext:
        """The flow with its compiled step functions attached when ``compile`` asks for them
        (:class:`~amaml.flow.compiled.StepFunctions` for gradient flow,
        :class:`~amaml.flow.compiled_maps.MapFunctions` for a general step map); built
        lazily, compiled at their first call."""
        mode = compile_mode(self.compile)
        spec, inner = flow.spec, flow.spec.inner
        if mode is None or spec.compiled is not None:
            return flow
        if inner is not None:
            fns: object = map_functions(spec.objective.loss, inner, spec.solver,
                                        spec.objective.batched, spec.has_mu, mode)
        else:
            fns = step_functions(spec.objective.loss, spec.solver, spec.objective.batched,
                                 spec.has_mu, mode)
        return replace(flow, spec=replace(spec, compiled=fns))

    def solve(self, flow: FlowContext) -> Tensor:
        return super().solve(self.prepare(flow))

    def forward(self, flow: FlowContext) -> tuple[Tensor, Tensor]:
        return self.memory.forward(flow)

    def sweep(self, flow: FlowContext, kept: Tensor, lam: Tensor) -> Tensor:
        return self.memory.sweep(flow, kept, lam)


@dataclass(frozen=True)
class Implicit(AbstractSweepAdjoint):
    """iMAML's implicit gradient ``(I + H(u_N)/mu)^{-1} lam_N``, by conjugate gradients.

    Valid when ``u_N`` minimises ``L(u) + mu/2 ||u - theta||^2`` (needs ``mu > 0``).
    It gives no gradient for the step size or ``mu``.

    Args:
        cg_steps: Maximum CG iterations (Hessian-vector products).
        cg_tol: Relative residual at which CG stops.
    """

    cg_steps: int = 20
    cg_tol: float = 1e-10

    def __post_init__(self) -> None:
        if not isinstance(self.cg_steps, int) or self.cg_steps < 1:
            raise ValueError(
                f"Implicit(cg_steps=...) must be a positive int; got {self.cg_steps!r}."
            )

    def solve(self, flow: FlowContext) -> Tensor:
        if flow.spec.inner is not None:
            raise ValueError("The implicit (iMAML) adjoint differentiates the fixed point of "
                             "gradient flow on a fixed support set; it does not apply to an "
                             "inner optimiser, a per-step learning rate, mini-batches or "
                             "meta-parameters beyond theta. Use DiscreteAdjoint().")
        mu = 0.0 if flow.mu is None else float(flow.mu.detach())
        if mu <= 0:
            raise ValueError(f"The implicit (iMAML) adjoint needs proximal weight mu > 0; got "
                             f"mu={mu}.")
        return super().solve(flow)

    def forward(self, flow: FlowContext) -> tuple[Tensor, Tensor]:
        u_end, _ = flow.integrate(flow.initial_state())
        return u_end, torch.stack([u_end])

    def sweep(self, flow: FlowContext, kept: Tensor, lam: Tensor) -> Tensor:
        if flow.mu is None:
            raise ValueError("The implicit (iMAML) adjoint needs a proximal weight mu > 0.")
        objective, data = flow.spec.objective, flow.data
        mu_d = flow.mu.detach()
        flow.stats.peak_states = 1
        with torch.enable_grad():
            u = kept[0].detach().requires_grad_(True)
            (g,) = torch.autograd.grad(objective.total(u, data), u, create_graph=True)

            def matvec(v: Tensor) -> Tensor:
                (hv,) = torch.autograd.grad(g, u, v, retain_graph=True)
                return v + hv / mu_d

            return conjugate_gradient(matvec, lam, max_iter=self.cg_steps, tol=self.cg_tol,
                                      batched=objective.batched)


# ----------------------------------------------------------------------------- pure passes


def _sweep_adjoint(spec: FlowSpec) -> AbstractSweepAdjoint:
    if not isinstance(spec.adjoint, AbstractSweepAdjoint):
        raise TypeError(f"{spec.adjoint!r} has no backward sweep; expected an "
                        f"AbstractSweepAdjoint such as DiscreteAdjoint() or Implicit().")
    return spec.adjoint


def forward_kept(
    spec: FlowSpec, theta: Tensor, dt: Tensor, mu: Tensor | None, data: Sequence[Tensor],
    extras: Sequence[Tensor] = (),
) -> tuple[Tensor, Tensor]:
    """Run the forward pass and stack what the adjoint needs to keep: ``(u_N, kept)``
    (for a general step map, the state ``z_N`` and kept states)."""
    return _sweep_adjoint(spec).forward(FlowContext(spec, theta, dt, mu, data,
                                                    extras=extras))


def adjoint_sweep(
    spec: FlowSpec,
    kept: Tensor,
    lam: Tensor,
    theta: Tensor,
    dt: Tensor,
    mu: Tensor | None,
    data: Sequence[Tensor],
    need: Need = (True, False, False),
    stats: SweepStats | None = None,
    extras: Sequence[Tensor] = (),
    need_data: Sequence[bool] = (),
    need_extras: Sequence[bool] = (),
    more: dict[str, Tensor] | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The backward pass: from ``lam = dJ/du_N`` to ``(dJ/dtheta, dJ/ddt, dJ/dmu)``.

    Args:
        spec: The flow (its adjoint must be an :class:`AbstractSweepAdjoint`, e.g.
            :class:`DiscreteAdjoint` or :class:`Implicit`).
        kept: What :func:`forward_kept` kept: all states (``Store``), the checkpoints
            (``Checkpoint``), ``u_0`` and the first snapshots (``Revolve``) or ``u_N``
            alone (``Backsolve``,
            ``Implicit``), stacked on dim 0.
        lam: Cotangent of ``u_N``, same shape as ``u_N``.
        theta, dt, mu: The flow's parameters (``mu`` is ``None`` without proximal term).
        data: The support data tensors.
        need: Which of ``(theta, dt, mu)`` need a gradient.
        stats: Filled with the peak number of states held and the steps recomputed.
        extras: A general step map's extra tensors (hyperparameters, captured tensors).
        need_data, need_extras: Which data and extra tensors need a gradient.
        more: Filled with the gradients of the data (``"data{i}"``) and extra tensors
            (``"extra{j}"``) that need one.

    Returns:
        Gradients for ``theta``, ``dt``, ``mu`` (``None`` where not needed), with
        the shapes of the inputs.
    """
    flow = FlowContext(spec, theta, dt, mu, data, need, {},
                       SweepStats() if stats is None else stats, extras,
                       tuple(need_data) or (False,) * len(data),
                       tuple(need_extras) or (False,) * len(extras))
    lam0 = flow.params(_sweep_adjoint(spec).sweep(flow, kept, lam))
    bars = flow.bars
    if more is not None:
        more.update({n: g for n, g in bars.items() if n.startswith(("data", "extra"))})
    g_theta = None
    if need[0]:
        g_theta = lam0.sum(0) if spec.objective.batched else lam0
        if "theta" in bars:
            g_theta = g_theta + bars["theta"]
    g_dt = bars.get("dt") if need[1] else None
    g_mu = bars.get("mu") if need[2] else None
    if need[1] and g_dt is None:
        g_dt = torch.zeros_like(dt)
    if need[2] and g_mu is None and mu is not None:
        g_mu = torch.zeros_like(mu)
    return g_theta, g_dt, g_mu


# ----------------------------------------------------------------------------- the Function


class _FlowFn(torch.autograd.Function):
    """Adapted parameters ``u_N``, differentiable through the adjoint sweep.

    Inputs: ``theta`` (P,), ``dt`` (scalar or (P,)), ``mu`` (scalar, or ``None`` when
    ``spec.has_mu`` is false), ``spec``, then the data tensors.
    Outputs: ``u_N`` and the kept states (non-differentiable).
    """

    @staticmethod
    def forward(theta: Tensor, dt: Tensor, mu: Tensor | None,  # type: ignore[override]
                spec: FlowSpec, *tensors: Tensor) -> tuple[Tensor, Tensor]:
        data, extras = _split(spec, tensors)
        with spec.scope():
            u_end, kept = forward_kept(spec, theta, dt, mu, data, extras)
        return u_end.clone(), kept

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        theta, dt, mu, spec, *tensors = inputs
        ctx.spec = spec
        ctx.n_tensors = len(tensors)
        ctx.mark_non_differentiable(output[1])
        # Without this, autograd hands backward a zero tensor the size of the kept states
        # as the (unused) cotangent of the second output: one more copy of everything kept,
        # allocated at the start of the backward pass (issue 25: store's peak was 2.1x its
        # N + 1 states). ``lam`` is then ``None`` when ``u_N`` received no cotangent.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1], theta, dt, mu, *tensors)

    @staticmethod
    def backward(ctx: Any, lam: Tensor, _: Any) -> tuple[Any, ...]:  # type: ignore[override]
        if lam is None:  # u_N did not reach the loss: nothing flows back
            return (None,) * (4 + ctx.n_tensors)
        kept, theta, dt, mu, *tensors = ctx.saved_tensors
        spec = ctx.spec
        spec.watched.check(spec.scope)  # the steps are evaluated again: as they ran
        data, extras = _split(spec, tensors)
        needs = ctx.needs_input_grad
        need = (needs[0], needs[1], needs[2] and mu is not None)
        need_data = needs[4:4 + len(data)]
        need_extras = needs[4 + len(data):]
        if spec.inner is None and any(need_data):
            raise RuntimeError("internal: a data gradient was asked of a gradient-flow spec; "
                               "gradient_flow routes such flows to the general step map.")
        more: dict[str, Tensor] = {}
        with spec.scope():
            g_theta, g_dt, g_mu = adjoint_sweep(spec, kept, lam.contiguous(), theta, dt, mu,
                                                data, need, extras=extras, need_data=need_data,
                                                need_extras=need_extras, more=more)
        g_data = [more.get(f"data{i}") if n else None for i, n in enumerate(need_data)]
        g_data = [torch.zeros_like(d) if n and g is None else g
                  for d, n, g in zip(data, need_data, g_data)]
        g_extra = [more.get(f"extra{j}") if n else None for j, n in enumerate(need_extras)]
        g_extra = [torch.zeros_like(t) if n and g is None else g
                   for t, n, g in zip(extras, need_extras, g_extra)]
        return (g_theta, g_dt, g_mu, None, *g_data, *g_extra)


def _split(spec: FlowSpec, tensors: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The Function's trailing inputs: the data, then ``spec.n_extra`` extra tensors."""
    cut = len(tensors) - spec.n_extra
    return list(tensors[:cut]), list(tensors[cut:])
