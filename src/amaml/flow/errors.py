"""The flow's own errors: a diverged inner loop, an untrustworthy backsolve."""

from __future__ import annotations

__all__ = ["BacksolveError", "DivergenceError"]


class DivergenceError(FloatingPointError):
    """The inner trajectory became non-finite (the learning rate is too large for the flow).

    Attributes:
        step: The first step (1-based) after which the parameters were non-finite.
        n_steps: The number of steps asked for.
    """

    def __init__(self, step: int, n_steps: int, detail: str = "") -> None:
        self.step = step
        self.n_steps = n_steps
        super().__init__(
            f"The inner loop diverged: the parameters became non-finite at step {step} of "
            f"{n_steps}{detail}. Use a smaller inner learning rate (lr) or fewer steps."
        )


class BacksolveError(RuntimeError):
    """Backsolve could not reconstruct the initial state: its gradient is untrustworthy."""
