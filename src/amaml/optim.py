"""Inner optimisers for :func:`amaml.adapt` and :func:`amaml.adapt_batch` (``optimizer=``).

torch.optim's update rules, names and defaults, as step maps whose exact discrete adjoint
the memory strategies (store, checkpoint, revolve) sweep at flat memory:

    >>> import torch, amaml
    >>> net = torch.nn.Linear(3, 1)
    >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> p = amaml.adapt(net, torch.nn.functional.mse_loss, (x, y), steps=20, lr=0.01,
    ...                 optimizer=amaml.optim.Adam(), memory="revolve")
    >>> torch.nn.functional.mse_loss(torch.func.functional_call(net, p, (x,)), y).backward()

A new rule is one class: an :class:`AbstractInnerOptimizer` (its buffers and its ``update``)
or, for a step that reads the gradient elsewhere than at the parameters, an
:class:`AbstractStepMap` (``rows`` and ``step``); every memory strategy, ``adapt`` and
``adapt_batch`` then give its exact meta-gradient. See :mod:`amaml.flow.step_maps` for the
update equations and the treatment of the square root at zero
(:func:`~amaml.flow.step_maps.base.sqrt0`).
"""

from .flow.step_maps import (
    OPTIMIZERS,
    SGD,
    AbstractInnerOptimizer,
    AbstractStepMap,
    Adam,
    AdamW,
    RMSprop,
    resolve_optimizer,
    sqrt0,
)
from .flow.step_maps.base import Update

__all__ = ["OPTIMIZERS", "SGD", "AbstractInnerOptimizer", "AbstractStepMap", "Adam", "AdamW",
           "RMSprop", "Update", "resolve_optimizer", "sqrt0"]
