"""amaml: gradient-based meta-learning with adjoint methods (A-MAML, arXiv 2110.08432).

The inner loop of MAML is gradient flow; its meta-gradient comes from the exact
discrete adjoint of the solver, so memory no longer grows with the number of
inner steps. Start with :func:`adapt` and :func:`adapt_batch`.
"""

from . import optim
from .allocator import tune_cpu_allocator
from .api import (
    BATCH_NORM_MODES,
    adapt,
    adapt_batch,
    explain,
    functional_call,
    functional_call_batch,
)
from .flow import (
    RK4,
    Auto,
    Backsolve,
    BacksolveError,
    Budget,
    Checkpoint,
    DiscreteAdjoint,
    DivergenceError,
    Euler,
    FirstOrder,
    Heun,
    Implicit,
    Revolve,
    Store,
    Unrolled,
    gradient_flow,
)
from .support import MiniBatches

__version__ = "0.1.0"

__all__ = [
    "BATCH_NORM_MODES", "Auto", "Backsolve", "BacksolveError", "Budget", "Checkpoint",
    "DiscreteAdjoint",
    "DivergenceError", "Euler", "FirstOrder", "Heun", "Implicit", "MiniBatches", "RK4", "Revolve",
    "Store",
    "Unrolled", "__version__", "adapt", "adapt_batch", "explain", "functional_call",
    "functional_call_batch", "gradient_flow", "optim", "tune_cpu_allocator",
]
