"""What a meta-learning algorithm is: an inner loop and a meta-direction."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .._types import LossFn, Params
from ..api import adapt_batch, functional_call_batch
from ..flow import AbstractAdjoint, AbstractSolver, DiscreteAdjoint, Euler, FirstOrder
from ..optim import AbstractInnerOptimizer

__all__ = ["AbstractAlgorithm", "GradientMetaLearner", "TaskBatch", "check_optimizer",
           "check_steps", "query_losses"]

#: ``(support_x, support_y, query_x, query_y)``, each with a leading task dimension ``B``.
TaskBatch = tuple[Tensor, Tensor, Tensor, Tensor]


def check_steps(name: str, value: object) -> None:
    """Refuse an inner-step count that is not an int >= 1 (``name`` is the argument).

    Raises:
        ValueError: Naming the argument and the value.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}.")


def check_optimizer(optimizer: object) -> None:
    """Refuse an inner ``optimizer`` that is neither ``None`` nor an :mod:`amaml.optim`
    instance (a name is resolved by :func:`~amaml.algorithms.make_algorithm`).

    Raises:
        TypeError: Naming the value.
    """
    if optimizer is not None and not isinstance(optimizer, AbstractInnerOptimizer):
        raise TypeError(f"optimizer must be an amaml.optim optimiser (e.g. amaml.optim.Adam()) "
                        f"or None; got {optimizer!r}.")


def query_losses(model: nn.Module, loss_fn: LossFn, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """Per-task losses ``(B,)`` of the adapted parameters ``params`` on ``(x, y)``."""
    return torch.func.vmap(loss_fn)(functional_call_batch(model, params, x), y)


class AbstractAlgorithm(abc.ABC):
    """A meta-learning algorithm: adapts to tasks and accumulates a meta-direction.

    Attributes:
        name: Registry name.
        n_steps: Inner steps used in meta-training.
        inner_lr: Inner learning rate (solver step size).
        solver: Forward stepper of the inner loop.
        optimizer: Inner optimiser (:mod:`amaml.optim`) stepped at ``inner_lr`` in place
            of the gradient flow of ``solver`` (then Euler); ``None`` (default): the
            gradient flow.
    """

    name: str
    n_steps: int
    inner_lr: float
    solver: AbstractSolver
    optimizer: AbstractInnerOptimizer | None = None

    def adapt(self, model: nn.Module, loss_fn: LossFn, support: tuple[Tensor, Tensor], *,
              n_steps: int | None = None) -> Params:
        """Adapt to a batch of tasks without any meta-gradient (evaluation, fine-tuning)."""
        with torch.no_grad():
            return adapt_batch(model, loss_fn, support, steps=n_steps or self.n_steps,
                               lr=self.inner_lr, solver=self.solver, adjoint=FirstOrder(),
                               optimizer=self.optimizer)

    @abc.abstractmethod
    def meta_step(self, model: nn.Module, loss_fn: LossFn, batch: TaskBatch, *,
                  scale: float | None = None) -> Tensor:
        """Accumulate ``scale *`` (sum over the batch's tasks of the meta-direction) into ``.grad``.

        Args:
            model: The meta-model; its parameters' ``.grad`` receive the meta-direction
                (a gradient to *descend*, ready for any torch optimiser).
            loss_fn: ``loss_fn(prediction, target) -> scalar``.
            batch: ``(support_x, support_y, query_x, query_y)`` with a leading task dim.
            scale: Weight of each task; ``None`` means ``1 / B`` (the mean). Distributed
                training passes ``1 / global_batch`` so that summed shards give the mean.

        Returns:
            Per-task query losses after adaptation, ``(B,)``, detached.
        """


@dataclass(frozen=True)
class GradientMetaLearner(AbstractAlgorithm):
    """MAML-family meta-learner: the meta-gradient of the query loss after adaptation.

    A-MAML, MAML, first-order MAML and iMAML differ only in ``adjoint``. With an inner
    ``optimizer`` (e.g. ``amaml.optim.Adam()``) each adapts by that optimiser's steps, and
    the adjoint differentiates through them (its buffers included).

    With ``proximal_in_query`` the meta-objective of each task is
    ``L_query(u(T)) + proximal / 2 * ||u(T) - theta||^2`` (the authors' A-MAML code), whose
    gradient also has the explicit term ``-proximal * (u(T) - theta)``.
    """

    name: str
    n_steps: int
    inner_lr: float
    solver: AbstractSolver = field(default_factory=Euler)
    adjoint: AbstractAdjoint = field(default_factory=DiscreteAdjoint)
    proximal: float = 0.0
    proximal_in_query: bool = False
    optimizer: AbstractInnerOptimizer | None = None

    def __post_init__(self) -> None:
        check_steps("n_steps", self.n_steps)
        if not self.inner_lr > 0:
            raise ValueError(f"inner_lr must be > 0; got {self.inner_lr!r}.")
        if self.proximal < 0:
            raise ValueError(f"proximal must be >= 0; got {self.proximal!r}.")
        check_optimizer(self.optimizer)

    def adapt(self, model: nn.Module, loss_fn: LossFn, support: tuple[Tensor, Tensor], *,
              n_steps: int | None = None) -> Params:
        with torch.no_grad():
            return adapt_batch(model, loss_fn, support, steps=n_steps or self.n_steps,
                               lr=self.inner_lr, solver=self.solver, adjoint=FirstOrder(),
                               proximal=self.proximal, optimizer=self.optimizer)

    def meta_step(self, model: nn.Module, loss_fn: LossFn, batch: TaskBatch, *,
                  scale: float | None = None) -> Tensor:
        xs, ys, xq, yq = batch
        params = adapt_batch(model, loss_fn, (xs, ys), steps=self.n_steps, lr=self.inner_lr,
                             solver=self.solver, adjoint=self.adjoint, proximal=self.proximal,
                             optimizer=self.optimizer)
        losses = query_losses(model, loss_fn, params, xq, yq)
        if self.proximal_in_query and self.proximal > 0:
            theta = dict(model.named_parameters())
            losses = losses + 0.5 * self.proximal * sum(
                ((u - theta[n]) ** 2).flatten(1).sum(1) for n, u in params.items())
        weight = 1.0 / xs.shape[0] if scale is None else scale
        (losses.sum() * weight).backward()
        return losses.detach()
