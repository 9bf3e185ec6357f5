"""Inner optimisers for :func:`amaml.adapt` and :func:`amaml.adapt_batch` (``optimizer=``).

torch.optim's update rules, names and defaults, as step maps whose exact discrete adjoint
the memory strategies (store, checkpoint, revolve) sweep at flat memory:

    >>> import torch, amaml
    >>> net = torch.nn.Linear(3, 1)
    >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> p = amaml.adapt(net, torch.nn.functional.mse_loss, (x, y), steps=20, lr=0.01,
    ...                 optimizer=amaml.optim.Adam(), memory="revolve")
    >>> torch.nn.functional.mse_loss(torch.func.functional_call(net, p, (x,)), y).backward()

See :mod:`amaml.flow.optimizers` for the update equations and the treatment of the square
root at zero.
"""

from .flow.optimizers import (
    OPTIMIZERS,
    SGD,
    AbstractInnerOptimizer,
    Adam,
    AdamW,
    RMSprop,
    resolve_optimizer,
)

__all__ = ["OPTIMIZERS", "SGD", "AbstractInnerOptimizer", "Adam", "AdamW", "RMSprop",
           "resolve_optimizer"]
