"""The support objective on flat parameters: gradients, Hessian-vector products, CG.

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

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._types import FlatLoss
from .fused import AbstractFusedLoss

__all__ = ["Objective", "make_field", "conjugate_gradient"]


class Objective:
    """A support loss on flat parameters, for one task or a batch of tasks.

    Args:
        loss: ``loss(u, *data) -> scalar`` for one task, ``u`` of shape ``(P,)``. An
            :class:`~amaml.flow.fused.AbstractFusedLoss` also gives its own gradient and
            Hessian-vector products: :meth:`grad` (without a graph) then uses them, and so
            do the step VJPs (:mod:`amaml.flow.trajectory`).
        batched: If true, ``u`` has shape ``(B, P)`` and every data tensor a
            leading task dimension ``B``; ``total`` is the sum of task losses.
    """

    def __init__(self, loss: FlatLoss, batched: bool = False) -> None:
        self.loss = loss
        self.batched = batched
        # randomness='different': each task draws its own masks (dropout), from the global
        # generator, so that a step's draws can be replayed from its recorded state.
        # A loss with its own batched form (amaml.folded: tasks folded into channels) uses it.
        own = getattr(loss, "per_task_batched", None)
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

    def hvp(self, u: Tensor, vs: Sequence[Tensor], data: Sequence[Tensor]) -> list[Tensor]:
        """Hessian-vector products ``H(u) v`` for several ``v``, one graph built."""
        with torch.enable_grad():
            u = u.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.total(u, data), u, create_graph=True)
            out = []
            for i, v in enumerate(vs):
                (hv,) = torch.autograd.grad(g, u, v, retain_graph=i < len(vs) - 1)
                out.append(hv)
        return out


def make_field(
    objective: Objective,
    data: Sequence[Tensor],
    theta: Tensor,
    dt: Tensor,
    mu: Tensor | None,
    create_graph: bool,
    record: list[tuple[Tensor, Any]] | None = None,
) -> Callable[[Tensor], Tensor]:
    """The vector field ``F(u) = -dt * (grad L(u) + mu (u - theta))`` of a unit step.

    ``mu`` is ``None`` when the proximal term is absent (skipped, not multiplied by 0).
    With ``record`` (a list; the objective must be fused, without ``create_graph``), each
    evaluation appends ``(u, tape)``, the loss's tape of its gradient at ``u``
    (:meth:`~amaml.flow.fused.AbstractFusedLoss.grad`).
    """

    neg_dt = -dt  # once, not at every evaluation
    fused = objective.fused if record is not None and not create_graph else None

    def field(u: Tensor) -> Tensor:
        if fused is not None and record is not None:
            tape: list[Any] = []
            g = fused.grad(u.detach(), data, tape=tape)
            record.append((u, tape[0] if tape else None))
        else:
            g = objective.grad(u, data, create_graph=create_graph)
        if mu is not None:
            g = g + mu * (u - theta)
        return neg_dt * g

    return field


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
