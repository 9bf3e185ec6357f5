"""Which kernel computes one inner step's vector-Jacobian product, and why: the one place.

A flow's step map is gradient flow under a Runge-Kutta solver (state ``u``) or a general
step map (:mod:`amaml.flow.steps`: an inner optimiser, per-step rates, mini-batches,
meta-parameters beyond ``theta``; state ``(u, buffers)``). Its VJP is computed by one of
three kernels, tried in this order; each says what it supports, or why not:

    ``"compiled"``  the step and its VJP as functions compiled by :func:`torch.compile`
                    (written with :mod:`torch.func`; :mod:`amaml.flow.compiled`);
    ``"fused"``     the loss's own gradient and Hessian-vector product (a plain MLP,
                    :class:`~amaml.flow.fused.AbstractFusedLoss`) and the step's own
                    algebra written out: no autograd graph through the model;
    ``"autograd"``  double backward through one step: every loss, solver and
                    meta-parameter.

:func:`select_kernel` returns the first kernel that supports the flow with the reasons
the faster ones did not; :func:`amaml.explain` reports it for a model. A user's own solver
(an :class:`~amaml.flow.solvers.AbstractSolver` with its tableau, ``step`` not overridden)
gets the fused kernel like the built-in ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .hvp import Objective
from .solvers import AbstractSolver, Euler
from .steps import InnerLoop

__all__ = ["KERNEL_ORDER", "KernelChoice", "is_tableau", "select_kernel"]

#: The kernels, fastest first.
KERNEL_ORDER = ("compiled", "fused", "autograd")


@dataclass(frozen=True)
class KernelChoice:
    """The kernel of a flow's step VJPs and why each faster one was not taken.

    Attributes:
        name: One of :data:`KERNEL_ORDER`.
        declined: ``(kernel, reason)`` for each faster kernel, in order.
    """

    name: str
    declined: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        """One line: the kernel, then why not the faster ones."""
        why = "; ".join(f"not {k}: {r}" for k, r in self.declined)
        return self.name + (f" ({why})" if why else "")


def is_tableau(solver: AbstractSolver) -> bool:
    """Whether ``solver.step`` is its Butcher tableau (Euler's own fast ``step`` is the
    same map), so that a kernel may transpose the tableau instead of the code."""
    return isinstance(solver, Euler) or type(solver).step is AbstractSolver.step


def _fused_support(objective: Objective, solver: AbstractSolver, inner: InnerLoop | None,
                   need_data: Sequence[bool], need_captured: bool) -> str | None:
    if objective.fused is None:
        return ("the loss has no derivatives of its own (only a model that is a chain of "
                "Linear and tanh/ReLU/sigmoid/identity layers has them)")
    if inner is None:
        if not is_tableau(solver):
            return f"solver {type(solver).__name__} overrides step(): its tableau is unknown"
        return None
    if inner.random:
        return ("the loss draws random numbers: each replayed step is differentiated by "
                "autograd, drawing once, as it drew in the forward pass")
    if inner.optimizer is None:
        return ("a Runge-Kutta solver under a general step map (per-step rates, mini-batches "
                "or meta-parameters) is transposed by autograd")
    if need_captured:
        return ("a tensor the loss reads needs a gradient: the fused loss gives H w, not "
                "the mixed derivative")
    if any(need_data[1:]):
        return "the support targets need a gradient (the fused loss gives the inputs' only)"
    if need_data and need_data[0] and not getattr(objective.fused, "input_grad", False):
        return "the support inputs need a gradient and this fused loss has no mixed derivative"
    return None


def select_kernel(objective: Objective, solver: AbstractSolver, inner: InnerLoop | None,
                  compiled: object | None, need_data: Sequence[bool] = (),
                  need_extras: Sequence[bool] = ()) -> KernelChoice:
    """The kernel of a flow's step VJPs (see the module).

    Args:
        objective: The support objective.
        solver: The flow's solver.
        inner: The general step map, or ``None`` for gradient flow.
        compiled: The flow's compiled step functions, or ``None``.
        need_data, need_extras: Which data and extra tensors (hyperparameters, then
            captured tensors) need a gradient.
    """
    declined: list[tuple[str, str]] = []
    n_hyper = 0 if inner is None else len(inner.hyper_tensors)
    need_captured = any(need_extras[n_hyper:])
    if inner is not None and inner.random:
        declined.append(("compiled", "the loss draws random numbers (replayed step by step)"))
    elif compiled is None:
        declined.append(("compiled", "compile=False"))
    elif getattr(compiled, "failed", False):
        declined.append(("compiled", "compilation failed"))
    else:
        data_ok = inner is not None and inner.batches is None  # MapFunctions take data slots
        if not need_captured and (data_ok or not any(need_data)):
            return KernelChoice("compiled")
        declined.append(("compiled", "a tensor the loss reads needs a gradient" if need_captured
                         else "a mini-batch's tensors need a gradient"))
    why = _fused_support(objective, solver, inner, need_data, need_captured)
    if why is None:
        return KernelChoice("fused", tuple(declined))
    declined.append(("fused", why))
    return KernelChoice("autograd", tuple(declined))
