"""The core: gradient flow, its solvers and its adjoints. Knows nothing of tasks.

Names: the flow ``du/dt = -grad L(u) - mu (u - theta)``, ``u(0) = theta``, is integrated
with ``n_steps`` solver steps of size ``dt`` up to ``t1 = n_steps * dt``; ``mu`` is the
proximal weight. The same quantities are ``steps``, ``lr`` and ``proximal`` in
:func:`amaml.adapt` / :func:`amaml.adapt_batch`, and ``n_steps``, ``inner_lr`` and
``proximal`` in :mod:`amaml.algorithms`.

Modules, one idea each:
    :mod:`~amaml.flow.solvers` (explicit Runge-Kutta steps),
    :mod:`~amaml.flow.optimizers` (inner optimisers: torch.optim's rules as step maps),
    :mod:`~amaml.flow.hvp` (the support objective, Hessian-vector products, CG),
    :mod:`~amaml.flow.trajectory` (gradient flow's forward loop and one step's VJP),
    :mod:`~amaml.flow.steps` (a general step map: optimiser, schedules, mini-batches,
    meta-parameters; its forward loop and one step's VJP),
    :mod:`~amaml.flow.kernels` (which kernel transposes a step, and why: the one place),
    :mod:`~amaml.flow.context` (:class:`FlowContext`, what adjoints and memory strategies
    receive), :mod:`~amaml.flow.capture` (tensors the loss reads besides its arguments),
    :mod:`~amaml.flow.memory` (which states the discrete adjoint keeps and how it gets
    them back), :mod:`~amaml.flow.adjoint` (the adjoints and the one autograd Function),
    :mod:`~amaml.flow.integrate` (:func:`gradient_flow`, the entry point),
    :mod:`~amaml.flow.fused` (losses with their own derivatives: the MLP),
    :mod:`~amaml.flow.compiled`, :mod:`~amaml.flow.compiled_maps` (compiled steps),
    :mod:`~amaml.flow.errors`.
"""

from .adjoint import (
    AbstractAdjoint,
    AbstractSweepAdjoint,
    DiscreteAdjoint,
    FirstOrder,
    Implicit,
    Unrolled,
    adjoint_sweep,
)
from .auto import Auto
from .budget import Budget
from .context import FlowContext
from .errors import BacksolveError, DivergenceError
from .hvp import Objective, conjugate_gradient
from .integrate import gradient_flow
from .memory import AbstractMemory, Backsolve, Checkpoint, Revolve, Store
from .solvers import RK4, SOLVERS, AbstractSolver, Euler, Heun
from .trajectory import SweepStats

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
    "AbstractAdjoint", "AbstractMemory", "AbstractSolver", "AbstractSweepAdjoint", "Auto",
    "Backsolve",
    "BacksolveError", "Budget", "Checkpoint", "DiscreteAdjoint", "DivergenceError", "Euler",
    "FirstOrder",
    "FlowContext", "Heun", "Implicit", "MEMORIES", "Objective", "RK4", "Revolve", "SOLVERS",
    "Store", "SweepStats", "Unrolled", "adjoint_sweep", "conjugate_gradient", "gradient_flow",
]
