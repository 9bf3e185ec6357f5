"""Everything non-tensor about one flow: :class:`FlowSpec`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .objective import Objective
from .scope import StepScope, Watched
from .step_maps.base import AbstractStepMap

__all__ = ["FlowSpec"]


@dataclass(frozen=True)
class FlowSpec:
    """One flow's objective, step map and length (made per call; never mutated).

    Attributes:
        objective: The support objective (one task, or a batch of tasks).
        step_map: The inner step: a Runge-Kutta tableau or an inner optimiser.
        n_steps: ``N``.
        n_tasks: ``B`` of a batched flow, ``None`` for one task.
        n_data, n_hyper: How many support data tensors and hyperparameter tensors the
            reads hold (:meth:`~amaml.flow.reads.Reads.tensors`' layout).
        random: The loss draws random numbers (each step's state is recorded and replayed).
        compile: The ``torch.compile`` mode of the compiled kernel, ``None`` for none.
        scope: The context every evaluation of the steps runs in, forward and backward
            (module flags and attention kernel as when the loop ran; :mod:`.scope`).
        watched: Tensors the steps read outside the reads, checked unchanged before a
            backward pass evaluates the steps again.
    """

    objective: Objective
    step_map: AbstractStepMap
    n_steps: int
    n_tasks: int | None = None
    n_data: int = 0
    n_hyper: int = 0
    random: bool = False
    compile: str | None = None
    scope: StepScope = field(default_factory=StepScope, compare=False, hash=False, repr=False)
    watched: Watched = field(default_factory=Watched, compare=False, hash=False, repr=False)

    def diverged(self) -> str:
        """The detail of a divergence message: which step map."""
        return f" ({self.step_map.kind} {self.step_map.name})"
