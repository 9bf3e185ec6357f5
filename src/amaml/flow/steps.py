"""Any inner step map ``z_{k+1} = Phi_k(z_k; theta, phi)`` and its vector-Jacobian product.

The state is ``z = (u, s)``: the parameters and the inner optimiser's buffers, stacked as
one tensor ``(1 + n_buffers, P)`` (``(B, 1 + n_buffers, P)`` for a batch of tasks), so that
the memory strategies keep and recompute it as they keep ``u`` (``3 P`` numbers a state for
Adam). Step ``k`` reads the gradient ``g = grad_u L(u_k; batch_k, phi) (+ mu (u_k -
theta))``, then applies an inner optimiser (:mod:`amaml.flow.optimizers`) or a Runge-Kutta
solver on ``-lr g``; ``phi`` holds everything else a step reads: the support data of step
``k`` (a fixed set or a mini-batch schedule ``k -> batch``), the step's learning rate (a
per-step schedule), the optimiser's hyperparameters, and the tensors the loss captures.

The VJP of a step (section 6 of the design notes): the cotangent ``lam = (lam_u, lam_s)``
of ``z_{k+1}`` is pulled through the optimiser's elementwise update, giving cotangents for
``u``, ``s``, the hyperparameters and ``g``; the last, ``w``, costs one Hessian-vector product
``H(u_k) w`` (and the mixed product ``d/dphi (g . w)`` for data and captured tensors).

Two kernels evaluate it here, as :func:`amaml.flow.kernels.select_kernel` (the one place
that decides) chose: ``"fused"``, the loss's own gradient and Hessian-vector product
(:class:`~amaml.flow.fused.AbstractFusedLoss`, the plain-MLP path) and the optimiser's own
transpose of its update (:meth:`~amaml.flow.optimizers.AbstractInnerOptimizer.update_vjp`,
else autograd on the elementwise update only); ``"autograd"``, one step differentiated by
double backward, for every loss, solver and meta-parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .capture import replay_rng, rng_states
from .errors import DivergenceError
from .hvp import Objective
from .optimizers import AbstractInnerOptimizer, Hyper
from .solvers import AbstractSolver

__all__ = ["InnerLoop", "Leaves", "RngLog", "add_cotangents", "initial_state", "integrate_steps",
           "params_of", "step_vjp", "tape_step"]

#: Mini-batch schedule: ``k -> data tensors of step k`` (deterministic).
Batches = Callable[[int], Sequence[Tensor]]
#: Each step's random states, recorded when the step is first taken (random losses).
RngLog = dict[int, list[Tensor]]


def _random_step(rng: RngLog | None, k: int, device: torch.device) -> AbstractContextManager[None]:
    """Step ``k``'s random state: recorded the first time (the forward pass draws as a
    plain loop would), replayed afterwards (recomputations and VJPs draw the same masks)."""
    if rng is None:
        return nullcontext()
    if k in rng:
        return replay_rng(device, rng[k])
    rng[k] = rng_states(device)
    return nullcontext()

@dataclass(frozen=True)
class InnerLoop:
    """What makes a flow a general step map (beyond :class:`~amaml.flow.trajectory.FlowSpec`).

    Attributes:
        optimizer: The inner optimiser, or ``None`` for the flow's Runge-Kutta solver on
            ``-lr g`` (state ``(1, P)``).
        per_step: ``dt`` has a leading dimension ``n_steps``: step ``k`` uses ``dt[k]``.
        batches: ``k -> data of step k``; ``None``: every step reads the flow's data.
        n_tasks: ``B`` of a batched flow (``None`` for one task).
        hyper: The optimiser's hyperparameters by name; those listed in ``hyper_tensors``
            are taken from the flow's extra tensors instead (they may need a gradient).
        hyper_tensors: Names of the hyperparameters passed as extra tensors, in order.
        random: The loss draws random numbers (dropout in training mode): each step's
            random state is recorded the first time the step is taken and replayed
            wherever it is evaluated again (:func:`amaml.flow.capture.replay_rng`).
    """

    optimizer: AbstractInnerOptimizer | None
    per_step: bool = False
    batches: Batches | None = None
    n_tasks: int | None = None
    hyper: tuple[tuple[str, Hyper], ...] = ()
    hyper_tensors: tuple[str, ...] = ()
    random: bool = False

    @property
    def rows(self) -> int:
        """``1 + n_buffers``: the rows of one task's state."""
        return 1 + (0 if self.optimizer is None else self.optimizer.n_buffers)


class CompiledMap(Protocol):
    """What a compiled kernel of a step map offers (:class:`amaml.flow.compiled_maps.
    MapFunctions`); each returns ``None`` once compilation has failed."""

    @property
    def failed(self) -> bool: ...

    def step(self, k: int, z: Tensor, theta: Tensor, lr: Tensor, mu: Tensor | None,
             hyper: Sequence[Tensor], data: Sequence[Tensor]) -> Tensor | None: ...

    def vjp(self, k: int, z: Tensor, lam: Tensor, theta: Tensor, lr: Tensor,
            mu: Tensor | None, hyper: Sequence[Tensor], data: Sequence[Tensor],
            need: tuple[bool, ...]) -> tuple[Tensor, dict[int, Tensor]] | None: ...


@dataclass
class Leaves:
    """The tensors one step reads besides its state, as the step uses them."""

    theta: Tensor
    lr: Tensor
    mu: Tensor | None
    data: Sequence[Tensor]
    hyper: dict[str, Hyper]


def params_of(z: Tensor) -> Tensor:
    """The parameters ``u``: row 0 of the state ``(..., rows, P)``."""
    return z[..., 0, :]


def initial_state(inner: InnerLoop, theta: Tensor) -> Tensor:
    """``z_0 = (theta, 0, ..., 0)``: ``(rows, P)``, or ``(B, rows, P)`` batched."""
    z = theta.new_zeros((inner.rows, theta.shape[-1]))
    z[0] = theta
    if inner.n_tasks is not None:
        z = z.expand(inner.n_tasks, *z.shape).contiguous()
    return z


def _data_at(inner: InnerLoop, data: Sequence[Tensor], k: int) -> Sequence[Tensor]:
    return data if inner.batches is None else inner.batches(k)


def _lr_at(inner: InnerLoop, dt: Tensor, k: int) -> Tensor:
    return dt[k] if inner.per_step else dt


def _hyper(inner: InnerLoop, extras: Sequence[Tensor]) -> dict[str, Hyper]:
    h = dict(inner.hyper)
    for name, t in zip(inner.hyper_tensors, extras):
        h[name] = t
    return h


def _phi(inner: InnerLoop, objective: Objective, solver: AbstractSolver, k: int, z: Tensor,
         leaves: Leaves, create_graph: bool) -> Tensor:
    """One step ``z_k -> z_{k+1}`` (with the autograd graph when ``create_graph``)."""
    data, mu, theta, lr = leaves.data, leaves.mu, leaves.theta, leaves.lr

    def gradient(v: Tensor) -> Tensor:
        g = objective.grad(v, data, create_graph=create_graph)
        return g if mu is None else g + mu * (v - theta)

    u = params_of(z)
    opt = inner.optimizer
    if opt is None:
        u_next = solver.step(lambda v: -lr * gradient(v), u)
        return u_next.unsqueeze(-2)
    bufs = [z[..., i, :] for i in range(1, inner.rows)]
    u_next, new = opt.update(k, u, bufs, gradient(u), lr, leaves.hyper)
    return torch.stack([u_next, *new], dim=-2)


def integrate_steps(
    inner: InnerLoop, objective: Objective, solver: AbstractSolver, n_steps: int,
    theta: Tensor, dt: Tensor, mu: Tensor | None, data: Sequence[Tensor],
    extras: Sequence[Tensor], z0: Tensor, start: int, stop: int, *,
    keep_every: int | None, out: Tensor | None, create_graph: bool, check_every: int,
    compiled: CompiledMap | None = None, rng: RngLog | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Steps ``start .. stop-1`` from ``z0``; see :func:`amaml.flow.trajectory.integrate`.
    ``compiled``: take the steps with the compiled kernel where it works. ``rng``: the
    random states of a random loss (recorded, or replayed for steps taken before)."""
    hyper = _hyper(inner, extras)
    fast = None if create_graph or rng is not None else compiled
    hyper_t = [t.detach() for t in extras[:len(inner.hyper_tensors)]]
    if not create_graph:
        theta, dt = theta.detach(), dt.detach()
        mu = None if mu is None else mu.detach()
        hyper = {n: v.detach() if isinstance(v, Tensor) else v for n, v in hyper.items()}
    z = z0
    kept: list[Tensor] = []
    for k in range(start, stop):
        if keep_every is not None and (k - start) % keep_every == 0:
            if out is not None:
                row = out[len(kept)]
                row.copy_(z)
                z = row
            kept.append(z)
        leaves = Leaves(theta, _lr_at(inner, dt, k), mu, _data_at(inner, data, k), hyper)
        z_next = None
        if fast is not None:
            z_next = fast.step(k, z, leaves.theta, leaves.lr, mu, hyper_t,
                               [d.detach() for d in leaves.data])
            fast = None if z_next is None else fast
        if z_next is None:
            with _random_step(rng, k, z.device):
                z_next = _phi(inner, objective, solver, k, z, leaves, create_graph)
        z = z_next
        if ((k + 1 - start) % check_every == 0 or k + 1 == stop) \
                and not bool(torch.isfinite(z).all()):
            raise DivergenceError(k + 1, n_steps, " (inner optimiser "
                                  f"{inner.optimizer.name})" if inner.optimizer else "")
    return z, kept


# ----------------------------------------------------------------------------- the VJP


def _add(bars: dict[str, Tensor], name: str, g: Tensor | None, index: int | None = None,
         like: Tensor | None = None) -> None:
    if g is None:
        return
    if index is not None:
        if name not in bars:
            assert like is not None
            bars[name] = torch.zeros_like(like)
        bars[name][index] += g
        return
    bars[name] = g if name not in bars else bars[name] + g


def step_vjp(
    inner: InnerLoop, objective: Objective, solver: AbstractSolver, k: int, z: Tensor,
    lam: Tensor, theta: Tensor, dt: Tensor, mu: Tensor | None, data: Sequence[Tensor],
    extras: Sequence[Tensor], need: tuple[bool, bool, bool], need_data: Sequence[bool],
    need_extras: Sequence[bool], bars: dict[str, Tensor], kernel: str = "autograd",
    compiled: CompiledMap | None = None, rng: RngLog | None = None,
) -> Tensor:
    """``(dPhi_k/dz (z))^T lam``; adds ``(dPhi_k/dp)^T lam`` to ``bars`` for every needed
    ``p``: ``"theta"``, ``"dt"`` (per step: row ``k``), ``"mu"``, ``"data{i}"``,
    ``"extra{j}"`` (hyperparameter tensors first, then captured tensors). ``kernel``:
    ``"compiled"`` (with ``compiled``), ``"fused"`` or ``"autograd"``, as
    :func:`amaml.flow.kernels.select_kernel` chose (the compiled kernel falls back to
    ``"autograd"`` if its compilation fails)."""
    if kernel == "compiled" and compiled is not None:
        done = _compiled_vjp(inner, compiled, k, z, lam, theta, dt, mu, data, extras, need,
                             need_data, need_extras, bars)
        if done is not None:
            return done
        kernel = "fused" if objective.fused is not None and inner.optimizer is not None \
            else "autograd"
    with torch.enable_grad(), _random_step(rng, k, z.device):
        leaves, wanted = _leaves(inner, k, theta, dt, mu, data, extras, need, need_data,
                                 need_extras)
        if kernel == "fused":
            lam_z, grads = _fused_vjp(inner, objective, k, z, lam, leaves, wanted)
        else:
            zl = z.detach().requires_grad_(True)
            z_next = _phi(inner, objective, solver, k, zl, leaves, create_graph=True)
            res = torch.autograd.grad(z_next, [zl, *(t for _, t in wanted)], lam,
                                      allow_unused=True)
            lam_z = res[0] if res[0] is not None else torch.zeros_like(z)
            grads = list(res[1:])
    add_cotangents(inner, bars, k, dt, [n for n, _ in wanted], grads)
    return lam_z


def add_cotangents(inner: InnerLoop, bars: dict[str, Tensor], k: int, dt: Tensor,
                   names: Sequence[str], grads: Sequence[Tensor | None]) -> None:
    """Add step ``k``'s parameter cotangents by name (a per-step rate's into row ``k``)."""
    for name, g in zip(names, grads):
        if name == "dt" and inner.per_step:
            _add(bars, "dt", g, index=k, like=dt)
        else:
            _add(bars, name, g)


def _leaves(inner: InnerLoop, k: int, theta: Tensor, dt: Tensor, mu: Tensor | None,
            data: Sequence[Tensor], extras: Sequence[Tensor], need: Sequence[bool],
            need_data: Sequence[bool], need_extras: Sequence[bool]
            ) -> tuple[Leaves, list[tuple[str, Tensor]]]:
    """Step ``k``'s leaves (detached copies requiring grad where needed; captured tensors
    as they are) and the named ones whose cotangent is wanted. Call with grad enabled."""
    n_hyper = len(inner.hyper_tensors)
    th = theta.detach().requires_grad_(need[0] and mu is not None)
    lr = _lr_at(inner, dt, k).detach().requires_grad_(need[1])
    m = None if mu is None else mu.detach().requires_grad_(need[2])
    hyp = [t.detach().requires_grad_(n) for t, n in zip(extras[:n_hyper], need_extras)]
    if inner.batches is None:
        dk = [d.detach().requires_grad_(n) for d, n in zip(data, need_data)]
    else:  # called again: the schedule's own graph to captured tensors is rebuilt
        dk = list(inner.batches(k))
    leaves = Leaves(th, lr, m, dk, _hyper(inner, hyp))
    named: list[tuple[str, Tensor | None]] = [("theta", th), ("dt", lr), ("mu", m)]
    named += [(f"extra{j}", t) for j, t in enumerate(hyp)]
    if inner.batches is None:
        named += [(f"data{i}", d) for i, d in enumerate(dk)]
    named += [(f"extra{n_hyper + j}", t) for j, t in enumerate(extras[n_hyper:])
              if need_extras[n_hyper + j]]
    return leaves, [(n, t) for n, t in named if t is not None and t.requires_grad]


def tape_step(
    inner: InnerLoop, objective: Objective, solver: AbstractSolver, k: int, z: Tensor,
    theta: Tensor, dt: Tensor, mu: Tensor | None, data: Sequence[Tensor],
    extras: Sequence[Tensor], rng: RngLog | None = None,
) -> tuple[Tensor, Tensor, list[tuple[str, Tensor]]]:
    """Step ``k`` from ``z`` with its autograd graph kept: ``(z_{k+1}, z leaf, named
    leaves)``; every tensor that requires grad now is a leaf of the graph."""
    with torch.enable_grad(), _random_step(rng, k, z.device):
        need = (theta.requires_grad, dt.requires_grad, mu is not None and mu.requires_grad)
        leaves, wanted = _leaves(inner, k, theta, dt, mu, data, extras, need,
                                 [d.requires_grad for d in data],
                                 [t.requires_grad for t in extras])
        zl = z.detach().requires_grad_(True)
        return _phi(inner, objective, solver, k, zl, leaves, create_graph=True), zl, wanted


def _compiled_vjp(inner: InnerLoop, compiled: CompiledMap, k: int, z: Tensor, lam: Tensor,
                  theta: Tensor, dt: Tensor, mu: Tensor | None, data: Sequence[Tensor],
                  extras: Sequence[Tensor], need: tuple[bool, bool, bool],
                  need_data: Sequence[bool], need_extras: Sequence[bool],
                  bars: dict[str, Tensor]) -> Tensor | None:
    n_hyper = len(inner.hyper_tensors)
    data_need = tuple(need_data) if inner.batches is None else ()
    slot_need = (need[0] and mu is not None, need[1], need[2] and mu is not None,
                 *need_extras[:n_hyper], *data_need)
    if inner.batches is None and len(data_need) != len(data):
        slot_need = slot_need + (False,) * (len(data) - len(data_need))
    lr = _lr_at(inner, dt, k).detach()
    data_k = [d.detach() for d in _data_at(inner, data, k)]
    res = compiled.vjp(k, z.detach(), lam, theta.detach(), lr,
                       None if mu is None else mu.detach(),
                       [t.detach() for t in extras[:n_hyper]], data_k, slot_need)
    if res is None:
        return None
    lam_z, grads = res
    for slot, g in grads.items():
        if slot == 1:
            if inner.per_step:
                _add(bars, "dt", g, index=k, like=dt)
            else:
                _add(bars, "dt", g)
        elif slot < 3:
            _add(bars, ("theta", "dt", "mu")[slot], g)
        elif slot < 3 + n_hyper:
            _add(bars, f"extra{slot - 3}", g)
        else:
            _add(bars, f"data{slot - 3 - n_hyper}", g)
    return lam_z


def _fused_vjp(inner: InnerLoop, objective: Objective, k: int, z: Tensor, lam: Tensor,
               leaves: Leaves, wanted: list[tuple[str, Tensor]]
               ) -> tuple[Tensor, list[Tensor | None]]:
    """The optimiser's update transposed (by its own :meth:`update_vjp`, else autograd on
    the elementwise update), the gradient's cotangent ``w`` by the fused loss's
    ``H(u) w``: no graph through the model."""
    fused, opt = objective.fused, inner.optimizer
    assert fused is not None and opt is not None
    u = params_of(z).detach()
    bufs = [z[..., i, :].detach() for i in range(1, inner.rows)]
    lam_u, lam_bufs = lam[..., 0, :], [lam[..., i, :] for i in range(1, inner.rows)]
    data = [d.detach() for d in leaves.data]
    tape: list[object] = []
    g = fused.grad(u, data, tape=tape)
    mu, theta = leaves.mu, leaves.theta
    names = [n for n, _ in wanted]
    want_x = "data0" in names
    hand = None
    if all(n in ("theta", "dt", "mu", "data0") for n in names):
        g_eff = g if mu is None else g + mu.detach() * (u - theta.detach())
        h = {n: v.detach() if isinstance(v, Tensor) else v for n, v in leaves.hyper.items()}
        hand = opt.update_vjp(k, u, bufs, g_eff, leaves.lr.detach(), h, lam_u, lam_bufs,
                              "dt" in names)
    if hand is not None:
        bar_u, bar_bufs, w, lr_bar = hand
        grads: list[Tensor | None] = []
        for n in names:
            if n == "data0":
                grads.append(None)  # filled below, from the mixed derivative
            elif n == "dt":
                grads.append(lr_bar)
            elif n == "mu":
                grads.append((w * (u - theta.detach())).sum())
            else:  # theta, through the proximal term
                assert mu is not None
                gt = -mu.detach() * w
                grads.append(gt.sum(0) if gt.ndim > 1 else gt)
        if mu is not None:
            bar_u = bar_u + mu.detach() * w
    else:
        ul = u.clone().requires_grad_(True)
        bl = [b.clone().requires_grad_(True) for b in bufs]
        gl = g.detach().requires_grad_(True)
        g_eff = gl if mu is None else gl + mu * (ul - theta)
        u_next, new = opt.update(k, ul, bl, g_eff, leaves.lr, leaves.hyper)
        pairs = [(o, c) for o, c in zip([u_next, *new], [lam_u, *lam_bufs]) if o.requires_grad]
        others = [(n, t) for n, t in wanted if n != "data0"]
        res = torch.autograd.grad([o for o, _ in pairs], [ul, *bl, gl, *(t for _, t in others)],
                                  [c for _, c in pairs], allow_unused=True)
        bar_u = res[0] if res[0] is not None else torch.zeros_like(u)
        bar_bufs = [r if r is not None else torch.zeros_like(u) for r in res[1:1 + len(bl)]]
        w = res[1 + len(bl)]
        by_name = dict(zip((n for n, _ in others), res[2 + len(bl):]))
        grads = [by_name.get(n) for n in names]
    if w is not None:
        t0 = tape[0] if tape else None
        if want_x:
            hw, x_bar = fused.hvp_input(u, w, data, tape=t0)
            grads[names.index("data0")] = x_bar
        else:
            _, hw = fused.grad_hvp(u, w, data, with_grad=False, tape=t0)
        bar_u = bar_u + hw
    return torch.stack([bar_u, *bar_bufs], dim=-2), grads
