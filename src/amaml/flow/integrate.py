"""``gradient_flow``: integrate the inner gradient flow with a chosen adjoint."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._types import FlatLoss, Scalar
from .adjoint import AbstractAdjoint, AbstractSweepAdjoint, DiscreteAdjoint, Implicit
from .capture import captured_leaves
from .kernels import compile_mode
from .loop import FlowContext
from .memory import Backsolve
from .objective import Objective
from .reads import Batches, Reads
from .scope import StepScope, Watched, read_tensors
from .spec import FlowSpec
from .step_maps import AbstractSolver, AbstractStepMap, Euler

__all__ = ["FlowOptions", "flow_context", "gradient_flow"]


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
    optimizer: AbstractStepMap | None = None,
    batches: Batches | None = None,
    dt_per_step: bool = False,
    meta_parameters: Sequence[Tensor] = (),
    scope: StepScope | None = None,
) -> Tensor:
    """Integrate ``du/dt = -grad loss(u) - mu (u - theta)``, ``u(0) = theta``, up to ``t1``.

    The flow takes ``n_steps`` solver steps of size ``dt`` (``t1 = n_steps * dt``).
    With :class:`~amaml.flow.step_maps.Euler` this is exactly ``n_steps`` steps of
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
        optimizer: An inner optimiser (:mod:`amaml.flow.step_maps`) instead of the
            solver: step ``k`` is its update with the gradient at ``u_k`` and learning rate
            ``dt`` (needs ``solver=Euler()``).
        batches: A mini-batch schedule ``k -> data of step k`` (deterministic: it is called
            again in the backward pass), instead of ``data``.
        dt_per_step: ``dt`` has a leading dimension ``n_steps`` (a learning-rate schedule:
            ``(n_steps,)`` or ``(n_steps, P)``); step ``k`` uses ``dt[k]``.
        meta_parameters: Tensors the loss reads whose gradient is wanted, besides those
            found by walking the loss's autograd graph (leaves that require grad are found
            by themselves; this argument is for completeness).
        scope: The context every evaluation of the steps runs in, forward and backward
            (:class:`~amaml.flow.scope.StepScope`; :func:`amaml.adapt` fixes the module
            flags and the attention kernel with it).

    The tensors the loss reads that are not inputs of the flow (buffers, constants a
    closure captures) are found by one evaluation of the loss; a backward pass that would
    evaluate the steps again after one of them changed in place raises ``RuntimeError``.

    Every tensor that requires grad and that a step reads gets its exact gradient: theta,
    ``dt``, ``mu``, the data (or the tensors a mini-batch schedule indexes), the
    optimiser's hyperparameters given as tensors, and the leaves the loss captures (a loss
    weight in a closure, a loss module's parameters), found by evaluating the loss once.

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
    options = FlowOptions(dt, n_steps, t1, data, solver, adjoint, mu, batched, optimizer,
                          batches, dt_per_step, meta_parameters, scope)
    return adjoint.solve(flow_context(loss, theta, options))


@dataclass(frozen=True)
class FlowOptions:
    """Everything :func:`gradient_flow` takes besides the loss and ``theta`` (its arguments,
    same names and defaults): what :func:`flow_context` validates."""

    dt: Scalar | Tensor
    n_steps: int | None = None
    t1: float | None = None
    data: Sequence[Tensor] = ()
    solver: AbstractSolver = Euler()
    adjoint: AbstractAdjoint = DiscreteAdjoint()
    mu: Scalar = 0.0
    batched: bool = False
    optimizer: AbstractStepMap | None = None
    batches: Batches | None = None
    dt_per_step: bool = False
    meta_parameters: Sequence[Tensor] = ()
    scope: StepScope | None = None


def _steps_and_rate(theta: Tensor, o: FlowOptions) -> tuple[int, Tensor]:
    dt_t = _as_tensor(o.dt, theta, "dt")
    n_steps = o.n_steps
    if o.dt_per_step:
        if n_steps is None or o.t1 is not None:
            raise ValueError("dt_per_step=True needs n_steps (and no t1).")
        if (dt_t.ndim not in (1, 2) or dt_t.shape[0] != n_steps
                or (dt_t.ndim == 2 and dt_t.shape[1] != theta.shape[0])):
            raise ValueError(f"A per-step dt must have shape ({n_steps},) or ({n_steps}, "
                             f"{theta.shape[0]}); got {tuple(dt_t.shape)}.")
    elif dt_t.ndim not in (0, 1) or (dt_t.ndim == 1 and dt_t.shape[0] != theta.shape[0]):
        raise ValueError(f"dt must be a scalar or have shape ({theta.shape[0]},); got "
                         f"{tuple(dt_t.shape)}.")
    if not bool((dt_t > 0).all()):
        raise ValueError("dt (the inner learning rate) must be > 0 everywhere.")
    if o.t1 is not None:
        if n_steps is not None:
            raise ValueError("Give either n_steps or t1, not both.")
        if dt_t.ndim != 0:
            raise ValueError("t1 needs a scalar dt; give n_steps with a per-parameter dt.")
        ratio = float(o.t1) / float(dt_t)
        n_steps = round(ratio)
        if n_steps < 1 or not math.isclose(ratio, n_steps, rel_tol=1e-9):
            raise ValueError(f"t1 / dt must be a positive whole number; got {o.t1} / "
                             f"{float(dt_t)}.")
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1:
        raise ValueError(f"n_steps must be an int >= 1; got {n_steps!r}.")
    return n_steps, dt_t


def _check_kinds(o: FlowOptions) -> None:
    if not isinstance(o.solver, AbstractSolver):
        raise TypeError(f"solver must be an AbstractSolver instance; got {o.solver!r}.")
    if not isinstance(o.adjoint, AbstractAdjoint):
        raise TypeError(f"adjoint must be an AbstractAdjoint instance; got {o.adjoint!r}.")
    if o.optimizer is not None and not isinstance(o.optimizer, AbstractStepMap):
        raise TypeError(f"optimizer must be an amaml.optim optimiser (or step map) instance "
                        f"or None; got {o.optimizer!r}.")
    if o.batches is not None:
        if o.data:
            raise ValueError("Give either data or batches (a mini-batch schedule), not both.")
        if not callable(o.batches):
            raise TypeError(f"batches must be callable k -> data of step k; got "
                            f"{o.batches!r}.")
    for t in o.meta_parameters:
        if not isinstance(t, Tensor):
            raise TypeError(f"meta_parameters must hold tensors; got {type(t).__name__}.")


def _captured(objective: Objective, theta: Tensor, first: Sequence[Tensor], o: FlowOptions,
              n_tasks: int | None) -> tuple[list[Tensor], bool, Watched]:
    """What the loss reads besides ``u`` and the data: leaves that require grad (loss
    weights, a loss module's parameters, a data set a mini-batch schedule indexes), whether
    it draws random numbers, and the tensors to watch (see :func:`gradient_flow`)."""
    adjoint, scope = o.adjoint, o.scope or StepScope()
    if not isinstance(adjoint, AbstractSweepAdjoint):
        return [], False, Watched()  # autograd's own adjoints see everything themselves
    u_at = theta if n_tasks is None else theta.expand(n_tasks, *theta.shape)
    # A random loss (dropout) is replayed step by step under the discrete adjoint's exact
    # strategies; elsewhere (implicit, backsolve) it is refused.
    replay = isinstance(adjoint, DiscreteAdjoint) and not isinstance(adjoint.memory, Backsolve)
    random_flag: list[bool] = []
    out_flag = random_flag if replay else None
    fused = objective.fused
    if fused is not None and fused.reads_only_data and o.batches is None:
        return list(o.meta_parameters), False, Watched()
    head = None if fused is None or o.batches is not None else fused.head(u_at.detach(), first)
    one = [d[0] for d in first] if n_tasks is not None else list(first)
    if head is not None:  # the fused MLP: only its loss on the prediction reads or captures
        pred, loss_of_pred = head
        single = head if n_tasks is None else fused.head(theta.detach(), one)  # type: ignore[union-attr]
        assert single is not None
        watched = Watched.of(read_tensors(lambda p, *rest: single[1](p, rest), single[0],
                                          one[1:]))
        captured = captured_leaves(loss_of_pred, pred, first[1:], random_out=out_flag)
    else:
        with scope():
            watched = Watched.of(read_tensors(objective.loss, theta, one))
        with scope():  # the loss as the steps evaluate it
            captured = captured_leaves(objective.total, u_at, first if o.batches is None
                                       else lambda: o.batches(0),  # type: ignore[misc]
                                       random_out=out_flag)
    for t in o.meta_parameters:
        if not any(t is c for c in captured):
            captured.append(t)
    return captured, bool(random_flag and random_flag[0]), watched


def flow_context(loss: FlatLoss, theta: Tensor, options: FlowOptions) -> FlowContext:
    """The validated flow of :func:`gradient_flow`, not yet integrated: its spec (the step
    map, found meta-parameters), reads and kernel; ``options.adjoint.solve`` of it is
    :func:`gradient_flow`'s result. :func:`amaml.explain` reads it."""
    o = options
    if not isinstance(theta, Tensor) or theta.ndim != 1 or not theta.is_floating_point():
        raise ValueError("theta must be a flat floating-point tensor of shape (P,); got "
                         f"{getattr(theta, 'shape', type(theta))}.")
    n_steps, dt_t = _steps_and_rate(theta, o)
    mu_t = _as_tensor(o.mu, theta, "mu")
    if mu_t.ndim != 0 or float(mu_t.detach()) < 0:
        raise ValueError(f"mu (proximal weight) must be a scalar >= 0; got {o.mu!r}.")
    has_mu = mu_t.requires_grad or float(mu_t.detach()) != 0.0
    _check_kinds(o)
    first = tuple(o.data) if o.batches is None else tuple(o.batches(0))
    if o.batched and (not first or first[0].ndim < 1):
        raise ValueError("batched=True needs data tensors with a leading task dimension.")
    objective = Objective(loss, o.batched)
    n_tasks = first[0].shape[0] if o.batched else None
    captured, random, watched = _captured(objective, theta, first, o, n_tasks)
    general = (o.optimizer is not None or o.batches is not None or o.dt_per_step
               or bool(captured) or random or any(d.requires_grad for d in o.data))
    if o.optimizer is not None and not isinstance(o.solver, Euler):
        raise ValueError(f"An inner optimizer ({o.optimizer.name}) is a discrete step map "
                         f"with no Runge-Kutta form; solver={o.solver.name!r} cannot be "
                         "combined with it. Leave solver='euler' (the default).")
    if general and isinstance(o.adjoint, DiscreteAdjoint) \
            and isinstance(o.adjoint.memory, Backsolve):
        raise ValueError("memory='backsolve' integrates gradient flow backward in time; it has "
                         "no version for an inner optimizer, a per-step learning rate, "
                         "mini-batches or meta-parameters beyond theta, lr and mu (here: "
                         f"{_why_general(o, captured)}). Use memory='revolve' or "
                         "'checkpoint' (exact).")
    if general and isinstance(o.adjoint, Implicit):
        raise ValueError("The implicit (iMAML) adjoint differentiates the fixed point of "
                         "gradient flow on a fixed support set; it does not apply to an "
                         "inner optimizer, a per-step learning rate, mini-batches or "
                         "meta-parameters beyond theta. Use DiscreteAdjoint().")
    step_map = o.optimizer if o.optimizer is not None else o.solver
    hyper = step_map.hyperparameters()
    tensors = {n: v for n, v in hyper.items() if isinstance(v, Tensor)}
    for n, v in tensors.items():
        if not v.is_floating_point():
            raise TypeError(f"The optimizer's {n} must be a float or a floating-point tensor.")
    reads = Reads(theta, dt_t, mu_t if has_mu else None,
                  tuple(o.data) if o.batches is None else (),
                  tuple(v.to(dtype=theta.dtype, device=theta.device) for v in tensors.values()),
                  tuple(captured), tuple(tensors),
                  tuple((n, v) for n, v in hyper.items() if n not in tensors),
                  o.dt_per_step, o.batches, {} if random else None)
    mode = compile_mode(o.adjoint.compile) if isinstance(o.adjoint, DiscreteAdjoint) else None
    spec = FlowSpec(objective, step_map, n_steps, n_tasks, len(reads.data), len(reads.hyper),
                    random, mode, o.scope or StepScope(), watched)
    return FlowContext(spec, reads)


def _why_general(o: FlowOptions, captured: Sequence[Tensor]) -> str:
    reasons = []
    if o.optimizer is not None:
        reasons.append(f"optimizer {o.optimizer.name}")
    if o.batches is not None:
        reasons.append("mini-batches")
    if o.dt_per_step:
        reasons.append("a per-step learning rate")
    if captured:
        reasons.append(f"{len(captured)} tensor(s) the loss reads that require grad")
    if any(d.requires_grad for d in o.data):
        reasons.append("support data that requires grad")
    return ", ".join(reasons)
