"""The core: gradient flow, its solvers and its adjoints. Knows nothing of tasks."""

from .adjoint import (
    MEMORIES,
    AbstractAdjoint,
    AbstractMemory,
    Backsolve,
    BacksolveError,
    Checkpoint,
    DiscreteAdjoint,
    DivergenceError,
    FirstOrder,
    Implicit,
    Revolve,
    Store,
    SweepStats,
    Unrolled,
    adjoint_sweep,
)
from .hvp import Objective, conjugate_gradient
from .integrate import gradient_flow
from .solvers import RK4, SOLVERS, AbstractSolver, Euler, Heun

__all__ = [
    "AbstractAdjoint", "AbstractMemory", "AbstractSolver", "Backsolve", "BacksolveError",
    "Revolve",
    "Checkpoint", "DiscreteAdjoint", "DivergenceError", "Euler", "FirstOrder", "Heun",
    "Implicit", "MEMORIES", "Objective", "RK4", "SOLVERS", "Store", "SweepStats", "Unrolled",
    "adjoint_sweep", "conjugate_gradient", "gradient_flow",
]
