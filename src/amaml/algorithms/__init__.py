"""Meta-learning algorithms by name: amaml, maml, maml1, fomaml, reptile, imaml.

A-MAML, MAML, first-order MAML and iMAML are one :class:`GradientMetaLearner` with
different adjoints; Reptile has its own meta-direction. Add an algorithm by
registering a builder in :data:`ALGORITHMS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..api import resolve_memory, resolve_solver
from ..flow import AbstractMemory, AbstractSolver, DiscreteAdjoint, FirstOrder, Implicit, Unrolled
from .base import AbstractAlgorithm, GradientMetaLearner, TaskBatch, query_losses
from .reptile import Reptile

__all__ = [
    "ALGORITHMS", "AbstractAlgorithm", "GradientMetaLearner", "Reptile", "TaskBatch",
    "list_algorithms", "make_algorithm", "query_losses",
]


def _amaml(n_steps: int, inner_lr: float, solver: AbstractSolver, memory: AbstractMemory,
           proximal: float, compile: bool | str = False, proximal_in_query: bool = False,
           **_: Any) -> AbstractAlgorithm:
    return GradientMetaLearner("amaml", n_steps, inner_lr, solver,
                               DiscreteAdjoint(memory, compile=compile), proximal,
                               proximal_in_query)


def _maml(n_steps: int, inner_lr: float, solver: AbstractSolver, proximal: float,
          maml_steps: int | None = None, **_: Any) -> AbstractAlgorithm:
    steps = maml_steps if maml_steps is not None else max(1, n_steps // 10)
    return GradientMetaLearner("maml", steps, inner_lr, solver, Unrolled(), proximal)


def _maml1(inner_lr: float, solver: AbstractSolver, proximal: float,
           **_: Any) -> AbstractAlgorithm:
    return GradientMetaLearner("maml1", 1, inner_lr, solver, Unrolled(), proximal)


def _fomaml(n_steps: int, inner_lr: float, solver: AbstractSolver, proximal: float,
            **_: Any) -> AbstractAlgorithm:
    return GradientMetaLearner("fomaml", n_steps, inner_lr, solver, FirstOrder(), proximal)


def _imaml(n_steps: int, inner_lr: float, solver: AbstractSolver, proximal: float,
           cg_steps: int = 20, **_: Any) -> AbstractAlgorithm:
    mu = proximal if proximal > 0 else 1.0  # iMAML needs mu > 0; 1.0 as in the authors' code
    return GradientMetaLearner("imaml", n_steps, inner_lr, solver,
                               Implicit(cg_steps=cg_steps), mu)


def _reptile(n_steps: int, inner_lr: float, solver: AbstractSolver,
             **_: Any) -> AbstractAlgorithm:
    return Reptile(n_steps, inner_lr, solver)


#: name -> builder(n_steps, inner_lr, solver, memory, proximal, maml_steps, cg_steps,
#: compile).
ALGORITHMS: dict[str, Callable[..., AbstractAlgorithm]] = {
    "amaml": _amaml,
    "maml": _maml,
    "maml1": _maml1,
    "fomaml": _fomaml,
    "reptile": _reptile,
    "imaml": _imaml,
}


def list_algorithms() -> list[str]:
    """Registered algorithm names."""
    return sorted(ALGORITHMS)


def make_algorithm(
    name: str,
    *,
    n_steps: int,
    inner_lr: float,
    solver: str | AbstractSolver = "euler",
    memory: str | AbstractMemory = "checkpoint",
    proximal: float = 0.0,
    maml_steps: int | None = None,
    cg_steps: int = 20,
    compile: bool | str = False,
    proximal_in_query: bool = False,
) -> AbstractAlgorithm:
    """Build an algorithm by name.

    Args:
        name: One of :func:`list_algorithms`.
        n_steps: Inner steps (A-MAML, FOMAML, iMAML, Reptile).
        inner_lr: Inner learning rate (solver step size).
        solver: Inner-loop solver name or instance.
        memory: A-MAML's memory strategy.
        proximal: Proximal weight (iMAML uses 1.0 when this is 0).
        maml_steps: Steps of ``maml`` (default ``n_steps // 10``, the paper's protocol).
        cg_steps: Conjugate-gradient iterations of iMAML.
        compile: A-MAML's solver steps compiled with ``torch.compile`` (see
            :class:`amaml.flow.DiscreteAdjoint`).
        proximal_in_query: A-MAML's meta-objective carries the proximal term too (see
            :class:`GradientMetaLearner`).
    """
    if name not in ALGORITHMS:
        raise ValueError(f"Unknown method {name!r}; expected one of {list_algorithms()}.")
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1:
        raise ValueError(f"n_steps must be an int >= 1; got {n_steps!r}.")
    if maml_steps is not None and (not isinstance(maml_steps, int) or maml_steps < 1):
        raise ValueError(f"maml_steps must be an int >= 1; got {maml_steps!r}.")
    return ALGORITHMS[name](n_steps=n_steps, inner_lr=inner_lr, solver=resolve_solver(solver),
                            memory=resolve_memory(memory), proximal=proximal,
                            maml_steps=maml_steps, cg_steps=cg_steps, compile=compile,
                            proximal_in_query=proximal_in_query)
