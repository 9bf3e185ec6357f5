"""A general step map's step and VJP as compiled pure functions (``compile=True`` with an
inner optimiser, a per-step learning-rate schedule or mini-batches).

The same maths as the eager kernels of :mod:`amaml.flow.steps`, written with
:mod:`torch.func` (the gradient by ``grad`` of the loss, the VJP by ``vjp`` of the whole
step) so that :func:`torch.compile` turns one step, or its VJP, into a few fused kernels.
One compiled function serves every step: the step index enters as a 0-d tensor (bias
corrections, SGD's first step), the step's learning rate and mini-batch as inputs. Data and
the support data that need a gradient (dataset distillation) are differentiated too;
captured tensors that need one are not: :func:`~amaml.flow.kernels.select_kernel` then
picks an eager kernel. Where compilation
fails, a warning is issued once and the eager kernels are used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._types import FlatLoss
from .compiled import CompiledCalls
from .solvers import AbstractSolver
from .steps import InnerLoop

__all__ = ["MapFunctions", "map_functions"]

#: ``(theta, lr, mu, *hyperparameter tensors, *data tensors)``: which need a cotangent.
MapNeed = tuple[bool, ...]


class MapFunctions:
    """One step ``z_k -> Phi_k(z_k)`` of a general step map and its VJP, compiled.

    Args:
        loss: ``loss(u, *data) -> scalar`` for one task (flat ``u``).
        inner: The step map (its optimiser, or ``None`` for the solver).
        solver: The flow's solver (used when ``inner.optimizer`` is ``None``).
        batched: ``z`` is ``(B, rows, P)`` and the data carry a leading task dimension.
        has_mu: Whether the proximal term ``mu (u - theta)`` is present.
        mode: The ``torch.compile`` mode.
    """

    def __init__(self, loss: FlatLoss, inner: InnerLoop, solver: AbstractSolver,
                 batched: bool, has_mu: bool, mode: str = "default") -> None:
        grad_fn: Callable[..., Tensor] = torch.func.grad(loss)
        if batched:
            grad_fn = torch.func.vmap(grad_fn)
        opt, rows = inner.optimizer, inner.rows
        static = dict(inner.hyper)
        names = inner.hyper_tensors

        def phi(z: Tensor, theta: Tensor, lr: Tensor, mu: Tensor | None, k: Tensor,
                hyper: tuple[Tensor, ...], data: tuple[Tensor, ...]) -> Tensor:
            def gradient(v: Tensor) -> Tensor:
                g = grad_fn(v, *data)
                return g if mu is None else g + mu * (v - theta)

            u = z[..., 0, :]
            if opt is None:
                return solver.step(lambda v: -lr * gradient(v), u).unsqueeze(-2)
            h: dict[str, Any] = {**static, **dict(zip(names, hyper))}
            bufs = [z[..., i, :] for i in range(1, rows)]
            u_next, new = opt.update(k, u, bufs, gradient(u), lr, h)
            return torch.stack([u_next, *new], dim=-2)

        self._phi = phi
        self._calls = CompiledCalls(mode)
        self._steps: dict[Any, Callable[..., Tensor]] = self._calls.table()
        self._vjps: dict[Any, Callable[..., tuple[Tensor, ...]]] = self._calls.table()
        self.has_mu = has_mu
        self.n_hyper = len(names)

    @property
    def failed(self) -> bool:
        """Whether compilation failed (the eager kernels are used from then on)."""
        return self._calls.failed

    def _slots(self, need: MapNeed) -> list[int]:
        # theta enters a step only through the proximal term
        return [i for i, n in enumerate(need) if n and (i != 0 or self.has_mu)
                and (i != 2 or self.has_mu)]

    def _make_vjp(self, need: MapNeed) -> Callable[..., tuple[Tensor, ...]]:
        phi, slots = self._phi, self._slots(need)

        n_hyper = self.n_hyper

        def step_vjp(z: Tensor, lam: Tensor, theta: Tensor, lr: Tensor, mu: Tensor | None,
                     k: Tensor, hyper: tuple[Tensor, ...],
                     data: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            fixed: list[Any] = [theta, lr, mu, *hyper, *data]

            def f(zz: Tensor, *ps: Tensor) -> Tensor:
                args = list(fixed)
                for i, p in zip(slots, ps):
                    args[i] = p
                return phi(zz, args[0], args[1], args[2], k, tuple(args[3:3 + n_hyper]),
                           tuple(args[3 + n_hyper:]))

            pull = torch.func.vjp(f, z, *(fixed[i] for i in slots))[1]
            return tuple(pull(lam))

        return step_vjp

    def step(self, k: int, z: Tensor, theta: Tensor, lr: Tensor, mu: Tensor | None,
             hyper: Sequence[Tensor], data: Sequence[Tensor]) -> Tensor | None:
        """``Phi_k(z)`` without a graph; ``None`` if compilation failed."""
        if self.failed:
            return None
        device = z.device.type
        kt = torch.tensor(float(k), dtype=z.dtype, device=z.device)
        out: Tensor | None = self._calls.call(self._steps, device, lambda: self._phi, device,
                                              (z, theta, lr, mu, kt, tuple(hyper), tuple(data)))
        if out is None:
            return None
        return out.clone() if self._calls.copy else out

    def vjp(self, k: int, z: Tensor, lam: Tensor, theta: Tensor, lr: Tensor,
            mu: Tensor | None, hyper: Sequence[Tensor], data: Sequence[Tensor],
            need: MapNeed) -> tuple[Tensor, dict[int, Tensor]] | None:
        """``((dPhi_k/dz)^T lam, {slot: cotangent})`` for the needed slots of ``(theta, lr,
        mu, *hyper, *data)``, or ``None`` if compilation failed."""
        if self.failed:
            return None
        device = z.device.type
        kt = torch.tensor(float(k), dtype=z.dtype, device=z.device)
        out = self._calls.call(self._vjps, (device, need), lambda: self._make_vjp(need),
                               device, (z, lam, theta, lr, mu, kt, tuple(hyper), tuple(data)))
        if out is None:
            return None
        if self._calls.copy:
            out = tuple(t.clone() for t in out)
        return out[0], dict(zip(self._slots(need), out[1:], strict=True))


def map_functions(loss: FlatLoss, inner: InnerLoop, solver: AbstractSolver, batched: bool,
                  has_mu: bool, mode: str = "default") -> MapFunctions:
    """The :class:`MapFunctions` of a flow; shared between calls when the loss describes
    itself by a ``cache_key()`` (the fused MLP) and the step map is the same."""
    describe = getattr(loss, "cache_key", None)
    key = None
    if describe is not None and inner.batches is None:
        key = (describe(), inner.optimizer, inner.hyper, inner.hyper_tensors, inner.per_step,
               solver, batched, has_mu, mode)
        try:
            hash(key)
        except TypeError:
            key = None
    if key is None:
        return MapFunctions(loss, inner, solver, batched, has_mu, mode)
    fns = _CACHE.pop(key, None) or MapFunctions(loss, inner, solver, batched, has_mu, mode)
    _CACHE[key] = fns  # most recently used last
    while len(_CACHE) > 16:
        _CACHE.pop(next(iter(_CACHE)))
    return fns


_CACHE: dict[tuple[Any, ...], MapFunctions] = {}
