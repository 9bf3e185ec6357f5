"""``gradient_flow``: integrate the inner gradient flow with a chosen adjoint."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._types import FlatLoss, Scalar
from .adjoint import AbstractAdjoint, DiscreteAdjoint
from .hvp import Objective
from .solvers import AbstractSolver, Euler
from .trajectory import FlowContext, FlowSpec

__all__ = ["gradient_flow"]


def _as_tensor(value: Scalar, like: Tensor, name: str) -> Tensor:
    # Built directly in the target dtype: torch.tensor(0.01) would round it to float32 first.
    t = value if isinstance(value, Tensor) else torch.tensor(float(value), dtype=like.dtype)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a float or a floating-point tensor; got dtype {t.dtype}.")
    return t.to(dtype=like.dtype, device=like.device)


def gradient_flow(
    loss: FlatLoss,
    theta: Tensor,
    *,
    dt: Scalar | Tensor,
    n_steps: int | None = None,
    t1: float | None = None,
    data: Sequence[Tensor] = (),
    solver: AbstractSolver = Euler(),
    adjoint: AbstractAdjoint = DiscreteAdjoint(),
    mu: Scalar = 0.0,
    batched: bool = False,
) -> Tensor:
    """Integrate ``du/dt = -grad loss(u) - mu (u - theta)``, ``u(0) = theta``, up to ``t1``.

    The flow takes ``n_steps`` solver steps of size ``dt`` (``t1 = n_steps * dt``).
    With :class:`~amaml.flow.solvers.Euler` this is exactly ``n_steps`` steps of
    gradient descent with learning rate ``dt``.

    Args:
        loss: ``loss(u, *data) -> scalar`` for one task, ``u`` flat of shape ``(P,)``.
        theta: Meta-parameters, flat ``(P,)``.
        dt: Step size (the inner learning rate): a float, a 0-d tensor, or a ``(P,)``
            tensor of per-parameter rates (a preconditioned flow, Meta-SGD style).
            A tensor that requires grad receives its gradient from the same adjoint pass.
        n_steps: Number of solver steps (give this or ``t1``).
        t1: Horizon ``T``; ``t1 / dt`` must be a whole number (scalar ``dt`` only).
        data: Tensors passed to ``loss`` after ``u`` (e.g. the support set ``x, y``).
        solver: Forward stepper: ``Euler()``, ``Heun()`` or ``RK4()``.
        adjoint: How ``d u(T) / d theta`` is computed: ``DiscreteAdjoint(memory=...)``
            (A-MAML, exact), ``Unrolled()`` (MAML), ``FirstOrder()``, ``Implicit()`` (iMAML).
        mu: Proximal weight ``mu >= 0`` (float or tensor; may require grad).
        batched: ``data`` tensors carry a leading task dimension ``B``; the result is
            ``(B, P)``, one adapted vector per task, all from the same ``theta``.

    Returns:
        ``u(T)``: ``(P,)``, or ``(B, P)`` if batched. Differentiable with respect to
        ``theta``, ``dt`` and ``mu`` as the adjoint provides.

    Raises:
        ValueError: On a bad argument (named in the message).
        DivergenceError: If the trajectory becomes non-finite (names the step).
        BacksolveError: If ``Backsolve`` cannot reconstruct ``theta`` (use ``Checkpoint``).

    Warning:
        ``Backsolve`` re-integrates ``u`` backwards with ``lam``; its gradient is
        approximate, O(dt**order), and may be unstable on long non-convex horizons.
    """
    if not isinstance(theta, Tensor) or theta.ndim != 1 or not theta.is_floating_point():
        raise ValueError("theta must be a flat floating-point tensor of shape (P,); got "
                         f"{getattr(theta, 'shape', type(theta))}.")
    dt_t = _as_tensor(dt, theta, "dt")
    if dt_t.ndim not in (0, 1) or (dt_t.ndim == 1 and dt_t.shape[0] != theta.shape[0]):
        raise ValueError(f"dt must be a scalar or have shape ({theta.shape[0]},); got "
                         f"{tuple(dt_t.shape)}.")
    if not bool((dt_t > 0).all()):
        raise ValueError("dt (the inner learning rate) must be > 0 everywhere.")
    if t1 is not None:
        if n_steps is not None:
            raise ValueError("Give either n_steps or t1, not both.")
        if dt_t.ndim != 0:
            raise ValueError("t1 needs a scalar dt; give n_steps with a per-parameter dt.")
        ratio = float(t1) / float(dt_t)
        n_steps = round(ratio)
        if n_steps < 1 or not math.isclose(ratio, n_steps, rel_tol=1e-9):
            raise ValueError(f"t1 / dt must be a positive whole number; got {t1} / {float(dt_t)}.")
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1:
        raise ValueError(f"n_steps must be an int >= 1; got {n_steps!r}.")
    mu_t = _as_tensor(mu, theta, "mu")
    if mu_t.ndim != 0 or float(mu_t.detach()) < 0:
        raise ValueError(f"mu (proximal weight) must be a scalar >= 0; got {mu!r}.")
    has_mu = mu_t.requires_grad or float(mu_t.detach()) != 0.0
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"solver must be an AbstractSolver instance; got {solver!r}.")
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(f"adjoint must be an AbstractAdjoint instance; got {adjoint!r}.")
    if batched and (not data or data[0].ndim < 1):
        raise ValueError("batched=True needs data tensors with a leading task dimension.")

    spec = FlowSpec(Objective(loss, batched), solver, adjoint, n_steps, has_mu)
    return adjoint.solve(FlowContext(spec, theta, dt_t, mu_t if has_mu else None, data))
