"""Meta-learning algorithms by name: amaml, maml, maml1, fomaml, reptile, imaml.

A-MAML, MAML, first-order MAML and iMAML are one :class:`GradientMetaLearner` with
different adjoints; Reptile has its own meta-direction. Add an algorithm by
registering a builder in :data:`ALGORITHMS`: its keyword parameters are the
:func:`make_algorithm` arguments it uses (:func:`algorithm_options`).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

from ..api import resolve_memory, resolve_solver
from ..flow import AbstractMemory, AbstractSolver, DiscreteAdjoint, FirstOrder, Implicit, Unrolled
from ..optim import AbstractInnerOptimizer, resolve_optimizer
from .base import AbstractAlgorithm, GradientMetaLearner, TaskBatch, check_steps, query_losses
from .reptile import Reptile

__all__ = [
    "ALGORITHMS", "AbstractAlgorithm", "GradientMetaLearner", "Reptile", "TaskBatch",
    "algorithm_options", "list_algorithms", "maml_default_steps", "make_algorithm",
    "query_losses",
]

#: iMAML's proximal weight when none (or 0) is given: it needs mu > 0 (the authors' code).
IMAML_DEFAULT_PROXIMAL = 1.0


def maml_default_steps(n_steps: int) -> int:
    """MAML's inner steps when none are given: ``max(1, n_steps // 10)`` (the paper)."""
    return max(1, n_steps // 10)


_Opt = AbstractInnerOptimizer | None


def _amaml(n_steps: int, inner_lr: float, solver: AbstractSolver, memory: AbstractMemory,
           proximal: float = 0.0, compile: bool | str = False,
           proximal_in_query: bool = False, optimizer: _Opt = None) -> AbstractAlgorithm:
    return GradientMetaLearner("amaml", n_steps, inner_lr, solver,
                               DiscreteAdjoint(memory, compile=compile), proximal,
                               proximal_in_query, optimizer=optimizer)


def _maml(n_steps: int, inner_lr: float, solver: AbstractSolver, proximal: float = 0.0,
          maml_steps: int | None = None, optimizer: _Opt = None) -> AbstractAlgorithm:
    steps = maml_steps if maml_steps is not None else maml_default_steps(n_steps)
    return GradientMetaLearner("maml", steps, inner_lr, solver, Unrolled(), proximal,
                               optimizer=optimizer)


def _maml1(inner_lr: float, solver: AbstractSolver, proximal: float = 0.0,
           optimizer: _Opt = None) -> AbstractAlgorithm:
    return GradientMetaLearner("maml1", 1, inner_lr, solver, Unrolled(), proximal,
                               optimizer=optimizer)


def _fomaml(n_steps: int, inner_lr: float, solver: AbstractSolver,
            proximal: float = 0.0, optimizer: _Opt = None) -> AbstractAlgorithm:
    return GradientMetaLearner("fomaml", n_steps, inner_lr, solver, FirstOrder(), proximal,
                               optimizer=optimizer)


def _reptile(n_steps: int, inner_lr: float, solver: AbstractSolver,
             optimizer: _Opt = None) -> AbstractAlgorithm:
    return Reptile(n_steps, inner_lr, solver, optimizer=optimizer)


def _imaml(n_steps: int, inner_lr: float, solver: AbstractSolver,
           proximal: float = IMAML_DEFAULT_PROXIMAL, cg_steps: int = 20) -> AbstractAlgorithm:
    # No optimizer: the implicit gradient is that of the fixed point of the gradient flow
    # (amaml.flow.Implicit refuses an inner optimiser).
    return GradientMetaLearner("imaml", n_steps, inner_lr, solver,
                               Implicit(cg_steps=cg_steps), proximal)


#: name -> builder, in the paper's order. A builder's keyword parameters are the
#: :func:`make_algorithm` arguments it uses (``n_steps``, ``inner_lr``, ``solver``,
#: ``memory``, ``proximal``, ``maml_steps``, ``cg_steps``, ``compile``,
#: ``proximal_in_query``, ``optimizer``).
ALGORITHMS: dict[str, Callable[..., AbstractAlgorithm]] = {
    "amaml": _amaml,
    "maml": _maml,
    "maml1": _maml1,
    "fomaml": _fomaml,
    "reptile": _reptile,
    "imaml": _imaml,
}

#: The optional arguments of :func:`make_algorithm` and their neutral values (``None`` is
#: neutral too); a method that does not use one refuses any other value.
_OPTIONAL: dict[str, Any] = {"solver": "euler", "memory": "checkpoint", "proximal": 0.0,
                             "maml_steps": None, "cg_steps": 20, "compile": False,
                             "proximal_in_query": False, "optimizer": None}


def list_algorithms() -> list[str]:
    """Registered algorithm names, sorted."""
    return sorted(ALGORITHMS)


def algorithm_options(name: str) -> frozenset[str]:
    """The arguments of :func:`make_algorithm` that method ``name`` uses.

    Raises:
        ValueError: Unknown method.
    """
    if name not in ALGORITHMS:
        raise ValueError(f"Unknown method {name!r}; expected one of {list_algorithms()}.")
    return frozenset(inspect.signature(ALGORITHMS[name]).parameters)


def _is_default(arg: str, value: Any) -> bool:
    return value is None or bool(value == _OPTIONAL[arg])


def make_algorithm(
    name: str,
    *,
    n_steps: int,
    inner_lr: float,
    solver: str | AbstractSolver = "euler",
    memory: str | AbstractMemory = "checkpoint",
    proximal: float | None = None,
    maml_steps: int | None = None,
    cg_steps: int = 20,
    compile: bool | str = False,
    proximal_in_query: bool = False,
    optimizer: str | AbstractInnerOptimizer | None = None,
) -> AbstractAlgorithm:
    """Build an algorithm by name.

    Args:
        name: One of :func:`list_algorithms`.
        n_steps: Inner steps (A-MAML, FOMAML, iMAML, Reptile; MAML's default
            ``maml_steps`` derives from it; MAML-1 takes one step).
        inner_lr: Inner learning rate (solver step size).
        solver: Inner-loop solver name or instance.
        memory: A-MAML's memory strategy.
        proximal: Proximal weight of the inner flow (A-MAML, MAML, MAML-1, FOMAML; 0 when
            ``None``) or iMAML's (1.0 when ``None``; iMAML needs one > 0, and 0 is
            replaced by 1.0 with a warning). Reptile takes none.
        maml_steps: Steps of ``maml`` (default ``n_steps // 10``, the paper's protocol,
            see :func:`maml_default_steps`).
        cg_steps: Conjugate-gradient iterations of iMAML.
        compile: A-MAML's solver steps compiled with ``torch.compile`` (see
            :class:`amaml.flow.DiscreteAdjoint`).
        proximal_in_query: A-MAML's meta-objective carries the proximal term too (see
            :class:`GradientMetaLearner`).
        optimizer: Inner optimiser, a name of :data:`amaml.optim.OPTIMIZERS` or an
            instance, stepped at ``inner_lr`` (with ``solver`` Euler); ``None`` (default):
            the gradient flow of ``solver``. Every method but iMAML takes one (iMAML's
            implicit gradient is that of the gradient flow's fixed point).

    Raises:
        ValueError: Unknown method, invalid step counts, or an argument the method does
            not use (:func:`algorithm_options`) given a value other than its default.
    """
    used = algorithm_options(name)
    check_steps("n_steps", n_steps)
    if maml_steps is not None:
        check_steps("maml_steps", maml_steps)
    given = {"solver": solver, "memory": memory, "proximal": proximal,
             "maml_steps": maml_steps, "cg_steps": cg_steps, "compile": compile,
             "proximal_in_query": proximal_in_query, "optimizer": optimizer}
    for arg, value in given.items():
        if arg not in used and not _is_default(arg, value):
            raise ValueError(f"Method {name!r} does not use {arg} (got {arg}={value!r}); "
                             f"it takes {sorted(used - {'n_steps', 'inner_lr'})}. Drop "
                             f"{arg}, or choose a method that uses it.")
    if name == "imaml" and proximal == 0:
        warnings.warn(f"iMAML needs proximal > 0; got proximal=0, using "
                      f"proximal={IMAML_DEFAULT_PROXIMAL}.", stacklevel=2)
        given["proximal"] = None
    kwargs: dict[str, Any] = {**given, "n_steps": n_steps, "inner_lr": inner_lr,
                              "solver": resolve_solver(solver),
                              "optimizer": resolve_optimizer(optimizer)}
    if "memory" in used:
        kwargs["memory"] = resolve_memory(memory)
    return ALGORITHMS[name](**{k: v for k, v in kwargs.items()
                               if k in used and (k not in _OPTIONAL or v is not None)})
