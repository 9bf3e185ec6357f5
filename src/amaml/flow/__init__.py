"""The core: inner loops as step maps, their adjoints and memory strategies. Knows nothing
of tasks or models.

Names: the flow ``du/dt = -grad L(u) - mu (u - theta)``, ``u(0) = theta``, is integrated
with ``n_steps`` steps of size ``dt`` up to ``t1 = n_steps * dt``; ``mu`` is the proximal
weight. The same quantities are ``steps``, ``lr`` and ``proximal`` in :func:`amaml.adapt` /
:func:`amaml.adapt_batch`, and ``n_steps``, ``inner_lr`` and ``proximal`` in
:mod:`amaml.algorithms`.

One step's seam, one idea a module:
    :mod:`~amaml.flow.reads` (:class:`Reads`: everything a step reads besides its state),
    :mod:`~amaml.flow.step_maps` (the step: Runge-Kutta tableaus and inner optimisers),
    :mod:`~amaml.flow.objective` (the support loss, its gradient, CG),
    :mod:`~amaml.flow.kernels` (what takes a step and transposes it: autograd, fused,
    compiled; chosen once per flow), :mod:`~amaml.flow.loop` (:class:`FlowContext`: the
    forward loop and one step back, what memory strategies receive),
    :mod:`~amaml.flow.memory`, :mod:`~amaml.flow.budget`, :mod:`~amaml.flow.auto` (which
    states the discrete adjoint keeps and how it gets them back),
    :mod:`~amaml.flow.adjoint` (the adjoints and the one autograd Function),
    :mod:`~amaml.flow.integrate` (:func:`gradient_flow`, the entry point),
    :mod:`~amaml.flow.capture`, :mod:`~amaml.flow.scope` (what the loss reads besides its
    arguments, and the context its steps run in), :mod:`~amaml.flow.fused` (losses with
    their own derivatives: the MLP), :mod:`~amaml.flow.errors`.
"""

from .adjoint import (
    AbstractAdjoint,
    AbstractSweepAdjoint,
    DiscreteAdjoint,
    FirstOrder,
    Implicit,
    Unrolled,
    adjoint_sweep,
    forward_kept,
)
from .auto import Auto
from .budget import Budget
from .errors import BacksolveError, DivergenceError
from .integrate import FlowOptions, flow_context, gradient_flow
from .loop import FlowContext, SweepStats
from .memory import AbstractMemory, Backsolve, Checkpoint, Store
from .objective import Objective, conjugate_gradient
from .reads import Reads
from .revolve import Revolve
from .spec import FlowSpec
from .step_maps import (
    RK4,
    SOLVERS,
    AbstractInnerOptimizer,
    AbstractSolver,
    AbstractStepMap,
    Euler,
    Heun,
)

#: Registered memory strategy names.
MEMORIES: dict[str, type[AbstractMemory]] = {
    "store": Store,
    "checkpoint": Checkpoint,
    "revolve": Revolve,
    "backsolve": Backsolve,
    "budget": Budget,
    "auto": Auto,
}

__all__ = [
    "AbstractAdjoint", "AbstractInnerOptimizer", "AbstractMemory", "AbstractSolver",
    "AbstractStepMap", "AbstractSweepAdjoint", "Auto", "Backsolve", "BacksolveError", "Budget",
    "Checkpoint", "DiscreteAdjoint", "DivergenceError", "Euler", "FirstOrder", "FlowContext",
    "FlowOptions", "FlowSpec", "Heun", "Implicit", "MEMORIES", "Objective", "RK4", "Reads",
    "Revolve", "SOLVERS", "Store", "SweepStats", "Unrolled", "adjoint_sweep",
    "conjugate_gradient", "flow_context", "forward_kept", "gradient_flow",
]
