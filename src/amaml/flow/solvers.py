"""Explicit Runge-Kutta steppers for the inner gradient flow.

Every solver integrates an autonomous field ``F`` with a unit step: the step size is
folded into the field (``F(u) = -dt * (grad L(u) + mu (u - theta))``), so one step of
:class:`Euler` is exactly one step of gradient descent with learning rate ``dt``, and
``Heun``/``RK4`` are the classical second- and fourth-order methods with step ``dt`` on
``du/dt = -grad L(u) - mu (u - theta)``. A per-parameter ``dt`` (Meta-SGD) is a
diagonally preconditioned flow.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

__all__ = ["AbstractSolver", "Euler", "Heun", "RK4", "SOLVERS"]

Field = Callable[[Tensor], Tensor]


class AbstractSolver(abc.ABC):
    """An explicit Runge-Kutta method given by its Butcher tableau.

    Subclasses set ``a`` (strictly lower-triangular stage coefficients),
    ``b`` (weights) and ``order``. ``step`` is then generic, and so is every
    adjoint built on it (they differentiate ``step`` itself).
    """

    a: ClassVar[tuple[tuple[float, ...], ...]]
    b: ClassVar[tuple[float, ...]]
    order: ClassVar[int]
    name: ClassVar[str]

    @property
    def stages(self) -> int:
        """Number of field evaluations per step."""
        return len(self.b)

    def step(self, field: Field, u: Tensor) -> Tensor:
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

    def step_tuple(
        self, field: Callable[[Sequence[Tensor]], Sequence[Tensor]], z: Sequence[Tensor]
    ) -> list[Tensor]:
        """The same step on a tuple of tensors (used by the backsolve adjoint)."""
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


@dataclass(frozen=True)
class Euler(AbstractSolver):
    """Forward Euler: exactly gradient descent. Order 1, one gradient per step."""

    a: ClassVar[tuple[tuple[float, ...], ...]] = ((),)
    b: ClassVar[tuple[float, ...]] = (1.0,)
    order: ClassVar[int] = 1
    name: ClassVar[str] = "euler"

    def step(self, field: Field, u: Tensor) -> Tensor:  # fast path, same maths
        return u + field(u)


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
