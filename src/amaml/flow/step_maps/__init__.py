"""Step maps: one inner step ``z_{k+1} = step(k, z_k, grad, reads_k)`` (see :mod:`.base`).

:mod:`.runge_kutta` (gradient flow under Euler, Heun, RK4, a user's tableau), :mod:`.sgd`,
:mod:`.adam` (Adam, AdamW), :mod:`.rmsprop`: torch.optim's rules on a flat vector.
"""

from __future__ import annotations

from .adam import Adam, AdamW
from .base import AbstractInnerOptimizer, AbstractStepMap, sqrt0
from .rmsprop import RMSprop
from .runge_kutta import RK4, SOLVERS, AbstractSolver, Euler, Heun, is_tableau
from .sgd import SGD

__all__ = ["OPTIMIZERS", "RK4", "SGD", "SOLVERS", "AbstractInnerOptimizer", "AbstractSolver",
           "AbstractStepMap", "Adam", "AdamW", "Euler", "Heun", "RMSprop", "is_tableau",
           "resolve_optimizer", "sqrt0"]

#: Registered inner optimiser names, for ``optimizer="adam"`` and the CLI.
OPTIMIZERS: dict[str, type[AbstractInnerOptimizer]] = {
    "sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop,
}


def resolve_optimizer(optimizer: str | AbstractStepMap | None) -> AbstractStepMap | None:
    """An optimiser instance from a registered name (``"sgd"``, ``"adam"``, ``"adamw"``,
    ``"rmsprop"``; defaults as torch.optim), an instance (or any step map) as it is, or
    ``None``."""
    if optimizer is None or isinstance(optimizer, AbstractStepMap):
        return optimizer
    if isinstance(optimizer, str) and optimizer.lower() in OPTIMIZERS:
        return OPTIMIZERS[optimizer.lower()]()
    raise ValueError(f"Unknown inner optimizer {optimizer!r}; expected one of "
                     f"{sorted(OPTIMIZERS)}, an amaml.optim optimiser instance, or None "
                     "(gradient flow with solver=).")
