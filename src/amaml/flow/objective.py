"""The support objective on flat parameters: its gradient, Hessian-vector products, CG.

Everything here works on a flat parameter vector ``u`` of shape ``(P,)`` for one
task, or ``(B, P)`` for a meta-batch of ``B`` independent tasks. A batched
objective evaluates the loss with :func:`torch.func.vmap` (one batched forward
pass) and differentiates the *sum* of the task losses with plain autograd:
because tasks do not share parameters, the gradient of the sum with respect to
``u`` is the stack of per-task gradients and its Hessian is block diagonal, so
one autograd call serves all tasks.

Hessian-vector products use reverse-over-reverse (double backward), chosen because
it measured fastest against ``torch.func`` forward-over-reverse and reverse-over-reverse
on the paper's MLP, on CPU and GPU; forward-over-reverse (``torch.func.jvp`` of
``torch.func.grad``) also fails on ``F.mse_loss`` in torch 2.13 ("ZeroTensors are
immutable"). ``benchmarks/bench_hvp.py`` measures one ``H v`` each way; the figures are in
``benchmarks/README.md``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._types import FlatLoss
from .fused import AbstractFusedLoss

__all__ = ["BatchedLoss", "Objective", "conjugate_gradient"]


class BatchedLoss(abc.ABC):
    """A flat loss that also evaluates a whole meta-batch itself (tasks folded into channels,
    :mod:`amaml.folded`) instead of by :func:`torch.func.vmap`."""

    @abc.abstractmethod
    def __call__(self, u: Tensor, *data: Tensor) -> Tensor:
        """The loss of one task."""

    @abc.abstractmethod
    def per_task_batched(self, u: Tensor, *data: Tensor) -> Tensor:
        """The loss of each task of a meta-batch: ``u`` ``(B, P)``, result ``(B,)``."""


class Objective:
    """A support loss on flat parameters, for one task or a batch of tasks.

    Args:
        loss: ``loss(u, *data) -> scalar`` for one task, ``u`` of shape ``(P,)``. An
            :class:`~amaml.flow.fused.AbstractFusedLoss` also gives its own gradient and
            Hessian-vector products: :meth:`grad` (without a graph) then uses them, and so
            does the fused kernel (:mod:`amaml.flow.kernels.fused`).
        batched: If true, ``u`` has shape ``(B, P)`` and every data tensor a
            leading task dimension ``B``; ``total`` is the sum of task losses.
    """

    def __init__(self, loss: FlatLoss, batched: bool = False) -> None:
        self.loss = loss
        self.batched = batched
        # randomness='different': each task draws its own masks (dropout), from the global
        # generator, so that a step's draws can be replayed from its recorded state.
        # A loss with its own batched form (amaml.folded: tasks folded into channels) uses it.
        own = loss.per_task_batched if isinstance(loss, BatchedLoss) else None
        self._batched_loss = None if not batched else (
            own if own is not None else torch.func.vmap(loss, randomness="different"))
        #: The loss's own derivatives, or ``None`` (autograd then).
        self.fused = loss if isinstance(loss, AbstractFusedLoss) else None

    def total(self, u: Tensor, data: Sequence[Tensor]) -> Tensor:
        """Sum over tasks of the support loss (a scalar)."""
        if self._batched_loss is not None:
            return self._batched_loss(u, *data).sum()
        return self.loss(u, *data)

    def per_task(self, u: Tensor, data: Sequence[Tensor]) -> Tensor:
        """The loss of each task: shape ``(B,)`` if batched, else ``()``."""
        if self._batched_loss is not None:
            return self._batched_loss(u, *data)
        return self.loss(u, *data)

    def grad(self, u: Tensor, data: Sequence[Tensor], create_graph: bool = False) -> Tensor:
        """Gradient of the support loss at ``u`` (per task when batched).

        With ``create_graph=False`` the result carries no graph; with ``True``,
        ``u`` must be part of a graph and the result is differentiable again.
        """
        if self.fused is not None and not create_graph:
            return self.fused.grad(u.detach(), data)
        with torch.enable_grad():
            if not create_graph:
                u = u.detach().requires_grad_(True)
            total = self.total(u, data)
            if total.ndim != 0:
                raise ValueError(
                    f"The loss must return a scalar tensor; got shape {tuple(total.shape)}."
                )
            (g,) = torch.autograd.grad(total, u, create_graph=create_graph)
        return g

    def hessian(self, u: Tensor, data: Sequence[Tensor]) -> Callable[[Tensor], Tensor]:
        """``v -> H(u) v`` by double backward, the gradient's graph built once and kept while
        the returned function lives (conjugate gradients call it many times)."""
        with torch.enable_grad():
            u = u.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.total(u, data), u, create_graph=True)

        def hvp(v: Tensor) -> Tensor:
            (hv,) = torch.autograd.grad(g, u, v, retain_graph=True)
            return hv

        return hvp


def _dot(a: Tensor, b: Tensor, batched: bool) -> Tensor:
    if batched:
        return (a * b).sum(dim=-1, keepdim=True)
    return (a * b).sum()


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    max_iter: int,
    tol: float,
    batched: bool = False,
) -> Tensor:
    """Solve ``A x = b`` for symmetric positive-definite ``A`` by conjugate gradients.

    Args:
        matvec: ``v -> A v``; block diagonal over the leading dimension when batched.
        b: Right-hand side, ``(P,)`` or ``(B, P)``.
        max_iter: Maximum number of iterations (matrix-vector products).
        tol: Stop when every residual norm is below ``tol * ||b||``.
        batched: Treat the leading dimension as independent systems (own step sizes).

    Returns:
        The approximate solution, same shape as ``b``, starting from ``x = 0``. A system
        that meets a direction of non-positive curvature stops at its current iterate.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = _dot(r, r, batched)
    tiny = torch.finfo(b.dtype).tiny
    stop = (tol * tol) * rs.clamp_min(tiny)
    live = rs > stop  # systems still iterating
    for _ in range(max_iter):
        if not bool(live.any()):
            break
        ap = matvec(p)
        pap = _dot(p, ap, batched)
        # A direction of non-positive curvature (A not positive definite, e.g. a non-convex
        # inner loss with a weak proximal term) ends that system's iteration at the current
        # iterate, as truncated CG does; dividing by pap there would blow up.
        live = live & (pap > 0)
        alpha = torch.where(live, rs / pap.clamp_min(tiny), 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = _dot(r, r, batched)
        beta = torch.where(live, rs_new / rs.clamp_min(tiny), 0.0)
        p = r + beta * p
        rs = torch.where(live, rs_new, rs)
        live = live & (rs > stop)
    return x
