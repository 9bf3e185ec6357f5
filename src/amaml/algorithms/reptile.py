"""Reptile (Nichol et al., 2018): the meta-direction is ``theta - u_N``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .._types import LossFn
from ..flow import AbstractSolver, Euler
from ..optim import AbstractInnerOptimizer
from .base import AbstractAlgorithm, TaskBatch, check_optimizer, check_steps, query_losses

__all__ = ["Reptile"]


@dataclass(frozen=True)
class Reptile(AbstractAlgorithm):
    """Reptile: adapt on the support set, move ``theta`` toward the adapted parameters.

    The accumulated ``.grad`` is ``scale * sum_tasks (theta - u_N)``, so a plain SGD
    meta-step with learning rate ``epsilon`` is Reptile's interpolation; any torch
    optimiser (Adam in the experiments) may use it as a gradient. The inner loop is
    ``solver``'s gradient flow, or the inner ``optimizer``'s steps when one is given.
    """

    n_steps: int
    inner_lr: float
    solver: AbstractSolver = field(default_factory=Euler)
    name: str = "reptile"
    optimizer: AbstractInnerOptimizer | None = None

    def __post_init__(self) -> None:
        check_steps("n_steps", self.n_steps)
        if not self.inner_lr > 0:
            raise ValueError(f"inner_lr must be > 0; got {self.inner_lr!r}.")
        check_optimizer(self.optimizer)

    def meta_step(self, model: nn.Module, loss_fn: LossFn, batch: TaskBatch, *,
                  scale: float | None = None) -> torch.Tensor:
        xs, ys, xq, yq = batch
        params = self.adapt(model, loss_fn, (xs, ys))
        weight = 1.0 / xs.shape[0] if scale is None else scale
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                direction = (p.unsqueeze(0) - params[name]).sum(0) * weight
                p.grad = direction if p.grad is None else p.grad + direction
            return query_losses(model, loss_fn, params, xq, yq)
