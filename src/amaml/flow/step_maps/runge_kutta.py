"""Explicit Runge-Kutta steps of gradient flow, as step maps.

Every solver integrates ``du/dt = -grad L(u) - mu (u - theta)`` with steps of size ``lr``:
one step is the tableau applied to the unit-step field ``F(v) = -lr grad(v)``, so one step of
:class:`Euler` is exactly one step of gradient descent with learning rate ``lr``, and
``Heun``/``RK4`` are the classical second- and fourth-order methods. A per-parameter ``lr``
(Meta-SGD) is a diagonally preconditioned flow. The state is ``u`` itself.

A user's solver is a subclass with its tableau (``a``, ``b``, ``order``, ``name``); its steps
and their transposes are then derived from the tableau, as for the built-in ones. A solver
that overrides :meth:`AbstractSolver.advance` is transposed by autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..reads import StepReads
from .base import AbstractStepMap, Gradient, Oracle, Transposed, lr_cotangent

__all__ = ["RK4", "SOLVERS", "AbstractSolver", "Euler", "Heun", "is_tableau"]

Field = Callable[[Tensor], Tensor]


class AbstractSolver(AbstractStepMap):
    """An explicit Runge-Kutta method given by its Butcher tableau.

    Subclasses set ``a`` (strictly lower-triangular stage coefficients), ``b`` (weights),
    ``order`` and ``name``; :meth:`advance` and every transpose then follow from them.
    """

    a: ClassVar[tuple[tuple[float, ...], ...]]
    b: ClassVar[tuple[float, ...]]
    order: ClassVar[int]
    kind: ClassVar[str] = "solver"

    @property
    def stages(self) -> int:  # type: ignore[override]
        """Number of field evaluations per step."""
        return len(self.b)

    def advance(self, field: Field, u: Tensor) -> Tensor:
        """One unit step ``u -> u + sum_i b_i k_i`` with ``k_i = field(U_i)``."""
        ks: list[Tensor] = []
        for i in range(self.stages):
            ui = u
            for aij, kj in zip(self.a[i], ks):
                if aij != 0.0:
                    ui = ui + aij * kj
            ks.append(field(ui))
        out = u
        for bi, ki in zip(self.b, ks):
            out = out + bi * ki
        return out

    def step_tuple(self, field: Callable[[Sequence[Tensor]], Sequence[Tensor]],
                   z: Sequence[Tensor]) -> list[Tensor]:
        """The same step on a tuple of tensors (the backsolve adjoint's augmented state)."""
        ks: list[Sequence[Tensor]] = []
        for i in range(self.stages):
            zi = list(z)
            for aij, kj in zip(self.a[i], ks):
                if aij != 0.0:
                    zi = [zz + aij * kk for zz, kk in zip(zi, kj)]
            ks.append(field(zi))
        out = list(z)
        for bi, ki in zip(self.b, ks):
            out = [oo + bi * kk for oo, kk in zip(out, ki)]
        return out

    def params(self, z: Tensor) -> Tensor:
        """The state is ``u`` itself: ``(P,)``, or ``(B, P)`` for a batch."""
        return z

    def init(self, theta: Tensor, n_tasks: int | None) -> Tensor:
        """``u_0 = theta`` (one row per task if batched)."""
        return theta if n_tasks is None else theta.expand(n_tasks, *theta.shape).contiguous()

    def step(self, k: int | Tensor, z: Tensor, grad: Gradient, r: StepReads) -> Tensor:
        lr, u = r.lr, z
        if not is_tableau(self):
            return self.advance(lambda v: -lr * grad(v), u)
        # The tableau on descents d_i = lr G(U_i) = -k_i: the same numbers as advance() on
        # k_i (IEEE negation is exact), one tensor op fewer a stage.
        ds: list[Tensor] = []
        for i in range(self.stages):
            ui = u
            for aij, dj in zip(self.a[i], ds):
                if aij != 0.0:
                    ui = ui - (dj if aij == 1.0 else aij * dj)
            ds.append(lr * grad(ui))
        out = u
        for bi, di in zip(self.b, ds):
            out = out - (di if bi == 1.0 else bi * di)
        return out

    def transpose(self, k: int, z: Tensor, lam: Tensor, oracle: Oracle,
                  r: StepReads) -> Transposed:
        """The tableau transposed stage by stage from the last, on ``F(U) = -lr G(U)``:
        ``w_i = b_i lam + sum_{j > i} a_ji bar_U_j`` (the cotangent of ``k_i``),
        ``bar_U_i = J_G(U_i)^T (-lr w_i)``, ``(dPhi/du)^T lam = lam + sum_i bar_U_i``,
        ``bar_lr = -sum_i G(U_i) . w_i``; the oracle collects ``theta``'s, ``mu``'s and the
        data's. No autograd graph is built."""
        a, b, stages = self.a, self.b, self.stages
        lr = r.lr.detach()
        need_lr = r.lr.requires_grad
        u, lam_u = z, lam
        states, ks = [u], []
        for i in range(1, stages):  # the stage states (Euler: U_0 = u, nothing to do)
            ks.append(-lr * oracle.grad(states[i - 1], i - 1))
            ui = u
            for aij, kj in zip(a[i], ks):
                if aij != 0.0:
                    ui = ui + aij * kj
            states.append(ui)
        del ks
        bar: list[Tensor | None] = [None] * stages
        out, lr_bar = lam_u, None
        for i in range(stages - 1, -1, -1):
            w = b[i] * lam_u if b[i] != 1.0 else lam_u
            for j in range(i + 1, stages):
                bj = bar[j]
                if bj is not None and a[j][i] != 0.0:
                    w = w + a[j][i] * bj
            g_i, back = oracle.pull(states[i], -lr * w, i, need_lr)
            bar[i] = back
            out = out + back
            if g_i is not None:
                term = lr_cotangent(lr, -(g_i * w))
                lr_bar = term if lr_bar is None else lr_bar + term
        return out, ([(r.lr, lr_bar)] if need_lr else [])


def is_tableau(solver: AbstractStepMap) -> bool:
    """Whether a solver's step is its Butcher tableau (:meth:`AbstractSolver.advance` not
    overridden, or Euler's own), so that a kernel may transpose the tableau instead of the
    code."""
    return isinstance(solver, AbstractSolver) and (
        isinstance(solver, Euler) or type(solver).advance is AbstractSolver.advance)


@dataclass(frozen=True)
class Euler(AbstractSolver):
    """Forward Euler: exactly gradient descent. Order 1, one gradient per step."""

    a: ClassVar[tuple[tuple[float, ...], ...]] = ((),)
    b: ClassVar[tuple[float, ...]] = (1.0,)
    order: ClassVar[int] = 1
    name: ClassVar[str] = "euler"

    def advance(self, field: Field, u: Tensor) -> Tensor:  # fast path, same maths
        return u + field(u)

    def step(self, k: int | Tensor, z: Tensor, grad: Gradient, r: StepReads) -> Tensor:
        return z - r.lr * grad(z)  # the tableau's step, without its loops


@dataclass(frozen=True)
class Heun(AbstractSolver):
    """Heun's method (explicit trapezoid). Order 2, two gradients per step."""

    a: ClassVar[tuple[tuple[float, ...], ...]] = ((), (1.0,))
    b: ClassVar[tuple[float, ...]] = (0.5, 0.5)
    order: ClassVar[int] = 2
    name: ClassVar[str] = "heun"


@dataclass(frozen=True)
class RK4(AbstractSolver):
    """The classical fourth-order Runge-Kutta method. Four gradients per step."""

    a: ClassVar[tuple[tuple[float, ...], ...]] = ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0))
    b: ClassVar[tuple[float, ...]] = (1 / 6, 1 / 3, 1 / 3, 1 / 6)
    order: ClassVar[int] = 4
    name: ClassVar[str] = "rk4"


#: Registered solver names, for the convenience functions and the CLI.
SOLVERS: dict[str, type[AbstractSolver]] = {"euler": Euler, "heun": Heun, "rk4": RK4}
