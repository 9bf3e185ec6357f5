"""Adjoints: how ``d u(T) / d (theta, dt, mu)`` is computed, and the one autograd Function.

The forward map is ``N`` steps ``z_{k+1} = Phi_k(z_k; reads)`` of a step map (a
Runge-Kutta tableau on gradient flow, or an inner optimiser), ``z_0 = (theta, 0, ...)``.
Given the cotangent ``lam_N = dJ/dz_N`` the exact discrete adjoint is

    lam_k = (dPhi_k/dz (z_k))^T lam_{k+1}
    dJ/dp = sum_k (dPhi_k/dp (z_k))^T lam_{k+1}     for every read p (theta, lr, mu, ...)
    dJ/dtheta += lam_0[0]                            (through z_0 = (theta, 0, ...))

Each term is the vector-Jacobian product of one step, by the flow's kernel
(:mod:`amaml.flow.kernels`; Hessian-vector products, no Hessian formed, no graph outliving a
step). With :class:`~amaml.flow.step_maps.runge_kutta.Euler` this is, to round-off, the
gradient of ``N`` unrolled steps of gradient descent, i.e. second-order MAML.

Adjoints (what to compute), each implementing :meth:`AbstractAdjoint.solve`:
    :class:`Unrolled` (MAML: autograd through the whole loop, memory O(N)),
    :class:`FirstOrder` (FOMAML: identity Jacobian),
    :class:`DiscreteAdjoint` (A-MAML, exact for the discrete loop),
    :class:`Implicit` (iMAML: ``(I + H/mu)^{-1}`` by conjugate gradients).

The last two are :class:`AbstractSweepAdjoint`: a forward pass that keeps something and
a backward sweep, joined by the package's one autograd Function. A
:class:`DiscreteAdjoint` hands both to its memory strategy (:mod:`amaml.flow.memory`).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .kernels import compile_mode
from .loop import FlowContext
from .memory import AbstractMemory, Checkpoint
from .objective import conjugate_gradient
from .reads import THETA
from .step_maps.base import AbstractStepMap
from .step_maps.runge_kutta import AbstractSolver

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
    """What ``d u(T) / d (theta, lr, mu, ...)`` the flow provides."""

    @abc.abstractmethod
    def solve(self, flow: FlowContext) -> Tensor:
        """Integrate the flow and return ``u_N``, differentiable as this adjoint provides.

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
        if flow.spec.n_tasks is not None:
            start = start.expand(u_end.shape[0], *start.shape)
        return start + (u_end - start).detach()


class AbstractSweepAdjoint(AbstractAdjoint):
    """An adjoint made of a forward pass that keeps something and a backward sweep.

    :meth:`solve` runs both through the package's one autograd Function; the sweep
    receives ``lam_N = dJ/dz_N`` and returns ``lam_0``, accumulating the reads' cotangents
    in ``flow.bars`` (see :func:`adjoint_sweep`).
    """

    @abc.abstractmethod
    def forward(self, flow: FlowContext) -> tuple[Tensor, Tensor]:
        """Integrate the flow; return ``(z_N, kept)``, ``kept`` one tensor stacked on dim 0."""

    @abc.abstractmethod
    def sweep(self, flow: FlowContext, kept: Tensor, lam: Tensor) -> Tensor:
        """From ``lam_N`` (shaped like ``z_N``) to ``lam_0``, given what ``forward`` kept."""

    def solve(self, flow: FlowContext) -> Tensor:
        z_end, _ = _FlowFn.apply(self, flow, *flow.reads.tensors())
        return flow.params(z_end)


@dataclass(frozen=True)
class DiscreteAdjoint(AbstractSweepAdjoint):
    """The exact adjoint of the discrete solver (A-MAML), under a memory strategy.

    Args:
        memory: How the states are kept: :class:`~amaml.flow.memory.Store`,
            :class:`~amaml.flow.memory.Checkpoint` (default),
            :class:`~amaml.flow.revolve.Revolve`, :class:`~amaml.flow.memory.Backsolve`,
            or any :class:`~amaml.flow.memory.AbstractMemory`.
        compile: Take each step and its vector-Jacobian product by the compiled kernel
            (:mod:`amaml.flow.kernels.compiled`): the same gradient, several times faster
            on small models, after a one-off compilation of tens of seconds per model, loss
            and data shape. A string picks the ``torch.compile`` mode
            (:data:`~amaml.flow.kernels.COMPILE_MODES`), e.g. ``"reduce-overhead"`` for CUDA
            graphs on a GPU.
    """

    memory: AbstractMemory = field(default_factory=Checkpoint)
    compile: bool | str = False

    def __post_init__(self) -> None:
        if not isinstance(self.memory, AbstractMemory):
            raise TypeError(f"DiscreteAdjoint(memory=...) must be an AbstractMemory instance "
                            f"(e.g. Checkpoint()); got {self.memory!r}.")
        compile_mode(self.compile)  # raises on a bad value

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
        mu = 0.0 if flow.reads.mu is None else float(flow.reads.mu.detach())
        if mu <= 0:
            raise ValueError(f"The implicit (iMAML) adjoint needs proximal weight mu > 0; got "
                             f"mu={mu}.")
        return super().solve(flow)

    def forward(self, flow: FlowContext) -> tuple[Tensor, Tensor]:
        z_end, _ = flow.integrate(flow.initial_state())
        return z_end, torch.stack([z_end])

    def sweep(self, flow: FlowContext, kept: Tensor, lam: Tensor) -> Tensor:
        mu = flow.reads.mu
        if mu is None:
            raise ValueError("The implicit (iMAML) adjoint needs a proximal weight mu > 0.")
        objective, mu_d = flow.spec.objective, mu.detach()
        flow.stats.peak_states = 1
        hessian = objective.hessian(flow.params(kept[0]), flow.reads.data)
        lam_u = conjugate_gradient(lambda v: v + hessian(v) / mu_d, flow.params(lam),
                                   max_iter=self.cg_steps, tol=self.cg_tol,
                                   batched=flow.spec.n_tasks is not None)
        return lam_u  # a solver's state is u


# ----------------------------------------------------------------------------- pure passes

#: Initial states that hold theta at the parameters and zeros elsewhere: theta's cotangent
#: is then the parameters' cotangent, summed over tasks.
_THETA_FIRST = (AbstractStepMap.init, AbstractSolver.init)



def forward_kept(adjoint: AbstractSweepAdjoint, flow: FlowContext) -> tuple[Tensor, Tensor]:
    """Run the forward pass and stack what the adjoint keeps: ``(z_N, kept)``."""
    with flow.spec.scope():
        return adjoint.forward(flow)


def adjoint_sweep(adjoint: AbstractSweepAdjoint, flow: FlowContext, kept: Tensor,
                  lam: Tensor) -> list[Tensor | None]:
    """The backward pass: from ``lam = dJ/dz_N`` to the gradients of the reads, aligned with
    ``flow.reads.tensors()`` (zeros where needed but untouched, ``None`` where not needed).

    Args:
        adjoint: The adjoint whose forward pass kept ``kept``.
        flow: The flow of this backward pass (its ``need`` says which gradients to compute;
            its ``stats`` are filled).
        kept: What :func:`forward_kept` kept.
        lam: Cotangent of ``z_N``, same shape as ``z_N``.
    """
    with flow.spec.scope():
        lam0 = adjoint.sweep(flow, kept, lam)
    bars, step_map = flow.bars, flow.spec.step_map
    if flow.need[THETA]:
        if type(step_map).init in _THETA_FIRST:  # z_0 = (theta, 0, ...) or theta
            g = flow.params(lam0)
            g = g.sum(0) if flow.spec.n_tasks is not None else g
        else:  # a step map's own initial state: its transpose, by autograd
            with torch.enable_grad():
                th = flow.reads.theta.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(step_map.init(th, flow.spec.n_tasks), th, lam0)
        prev = bars[THETA]
        bars[THETA] = g if prev is None else g + prev
    return [None if not n or t is None else (torch.zeros_like(t) if g is None else g)
            for t, n, g in zip(flow.reads.tensors(), flow.need, bars)]


# ----------------------------------------------------------------------------- the Function


class _FlowFn(torch.autograd.Function):
    """The final state ``z_N``, differentiable through the adjoint sweep.

    Inputs: the adjoint, the flow, then ``flow.reads.tensors()``.
    Outputs: ``z_N`` and the kept states (non-differentiable).
    """

    @staticmethod
    def forward(adjoint: AbstractSweepAdjoint, flow: FlowContext,  # type: ignore[override]
                *tensors: Tensor | None) -> tuple[Tensor, Tensor]:
        z_end, kept = forward_kept(adjoint, flow)
        return z_end.clone(), kept

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        adjoint, flow, *tensors = inputs
        ctx.adjoint, ctx.flow = adjoint, flow
        ctx.mark_non_differentiable(output[1])
        # Without this, autograd hands backward a zero tensor the size of the kept states
        # as the (unused) cotangent of the second output: one more copy of everything kept,
        # allocated at the start of the backward pass (issue 25: store's peak was 2.1x its
        # N + 1 states). ``lam`` is then ``None`` when ``z_N`` received no cotangent.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1], *tensors)

    @staticmethod
    def backward(ctx: Any, lam: Tensor | None, _: Any) -> tuple[Any, ...]:  # type: ignore[override]
        if lam is None:  # z_N did not reach the loss: nothing flows back
            return (None,) * (len(ctx.needs_input_grad))
        kept, *tensors = ctx.saved_tensors
        spec = ctx.flow.spec
        spec.watched.check(spec.scope)  # the steps are evaluated again: as they ran
        flow = ctx.flow.backward_flow(tensors, ctx.needs_input_grad[2:])
        return (None, None, *adjoint_sweep(ctx.adjoint, flow, kept, lam.contiguous()))
