"""The one step-map base: ``z_{k+1} = step(k, z_k, grad, reads_k)``.

A step map is how one inner step turns the state ``z = (u, s)`` (parameters and buffers,
stacked as ``(rows, P)``, ``(B, rows, P)`` for a batch of tasks) and the gradient oracle
``grad(v) = grad L(v) + mu (v - theta)`` into the next state. The Runge-Kutta tableaus
(:mod:`~amaml.flow.step_maps.runge_kutta`) and the inner optimisers (SGD, Adam, AdamW,
RMSprop) are its instances; so is a user's own (one class: ``rows`` and ``step``).

Every kernel transposes every step map by autograd. The fused kernel (a loss with its own
gradient and Hessian-vector product) asks the map for :meth:`AbstractStepMap.transpose`:
the default differentiates ``step`` with the gradient at ``u`` held as a leaf, which is
exact for maps that read the gradient once, at ``u``; maps that read it elsewhere (a
Runge-Kutta stage) write their own.
"""

from __future__ import annotations

import abc
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from ..reads import Hyper, StepReads

__all__ = ["AbstractInnerOptimizer", "AbstractStepMap", "Gradient", "Oracle", "Transposed",
           "Update", "UpdateVJP", "is_zero", "lr_cotangent", "rows_of", "sqrt0", "stacked"]

#: ``v -> grad L(v) + mu (v - theta)`` at step ``k``'s data.
Gradient = Callable[[Tensor], Tensor]
#: What :meth:`AbstractStepMap.transpose` returns: ``(dPhi/dz)^T lam`` and the cotangents of
#: the step's leaves it differentiated (the learning rate, hyperparameters), keyed by the
#: leaf itself.
Transposed = tuple[Tensor, list[tuple[Tensor, Tensor | None]]]


class Oracle(Protocol):
    """The gradient and its transpose at step ``k``, without an autograd graph (the fused
    kernel's). ``stage`` numbers the points of one step where the gradient is read, so that
    what the forward pass recorded at a point is reused there."""

    def grad(self, u: Tensor, stage: int) -> Tensor:
        """``G(u) = grad L(u) + mu (u - theta)``."""

    def pull(self, u: Tensor, w: Tensor, stage: int, with_grad: bool
             ) -> tuple[Tensor | None, Tensor]:
        """``(G(u) or None, J_G(u)^T w)``; adds the cotangents of ``theta``, ``mu`` and the
        data that ``w`` gives to the oracle's own account."""


def lr_cotangent(lr: Tensor, prod: Tensor) -> Tensor:
    """The cotangent of ``lr`` from ``prod = d(step)/d(lr) * cotangent`` elementwise: summed
    over everything ``lr`` was broadcast over (tasks, and parameters if it is a scalar)."""
    if lr.ndim == 0:
        return prod.sum()
    return prod.reshape(-1, lr.shape[-1]).sum(0)


class AbstractStepMap(abc.ABC):
    """One inner step: its state's rows, its initial state, the step (see the module)."""

    name: ClassVar[str]
    #: What the map is, in words, for messages ("solver", "inner optimiser").
    kind: ClassVar[str] = "step map"
    #: Points of one step where the gradient is read (a tableau's stages).
    stages: ClassVar[int] = 1
    #: The step reads the gradient once, at the parameters (row 0), as an optimiser does:
    #: the default :meth:`transpose` is then exact, and the fused kernel may use it.
    gradient_at_u: ClassVar[bool] = False

    @property
    def rows(self) -> int:
        """``1 + buffers``: the rows of one task's state."""
        return 1

    def hyperparameters(self) -> dict[str, float | Tensor]:
        """Hyperparameters by name; those given as tensors may need a gradient."""
        return {}

    def params(self, z: Tensor) -> Tensor:
        """The parameters ``u`` of a state: row 0."""
        return z[..., 0, :]

    def init(self, theta: Tensor, n_tasks: int | None) -> Tensor:
        """``z_0 = (theta, 0, ..., 0)``: ``(rows, P)``, or ``(B, rows, P)`` for ``B`` tasks. A
        map that overrides it gets the meta-gradient of ``theta`` through ``z_0`` by
        autograd."""
        z = theta.new_zeros((self.rows, theta.shape[-1]))
        z[0] = theta
        if n_tasks is not None:
            z = z.expand(n_tasks, *z.shape).contiguous()
        return z

    @abc.abstractmethod
    def step(self, k: int | Tensor, z: Tensor, grad: Gradient, r: StepReads) -> Tensor:
        """``z_{k+1}`` from ``z_k`` (out of place: autograd differentiates it).

        Args:
            k: The step index (a 0-d tensor in compiled steps: no Python branch on it).
            z: The state ``(..., rows, P)``; row 0 holds the parameters.
            grad: The gradient oracle at this step's data.
            r: What the step reads (learning rate, hyperparameters, ...).
        """

    def transpose(self, k: int, z: Tensor, lam: Tensor, oracle: Oracle,
                  r: StepReads) -> Transposed:
        """``(dPhi_k/dz)^T lam`` by the oracle's ``J_G^T`` (the fused kernel), and the
        cotangents of ``r``'s leaves that require grad. The default reads the gradient once,
        at ``u = z[..., 0, :]``, holds it as a leaf and differentiates the rest of the step
        by autograd (elementwise, cheap)."""
        return transpose_at_u(self, k, z, lam, oracle, r)

    def describe(self) -> str:
        """A short name, for logs and messages."""
        return self.name


def transpose_at_u(step_map: AbstractStepMap, k: int, z: Tensor, lam: Tensor,
                   oracle: Oracle, r: StepReads) -> Transposed:
    """:meth:`AbstractStepMap.transpose`'s default (see there)."""
    u = z[..., 0, :]
    g = oracle.grad(u, 0)
    leaves = [t for t in (r.lr, *r.hyper.values()) if isinstance(t, Tensor) and t.requires_grad]
    with torch.enable_grad(), _autograd_records():
        zl = z.detach().requires_grad_(True)
        gl = g.detach().requires_grad_(True)
        out = step_map.step(k, zl, lambda v: gl, r)
        res = torch.autograd.grad(out, [zl, gl, *leaves], lam, allow_unused=True)
    lam_z = res[0] if res[0] is not None else torch.zeros_like(z)
    if res[1] is not None:
        _, back = oracle.pull(u, res[1], 0, False)
        lam_z = lam_z.clone()
        lam_z[..., 0, :] += back
    return lam_z, list(zip(leaves, res[2:]))


def rows_of(z: Tensor, rows: int) -> tuple[Tensor, list[Tensor]]:
    """``(u, [buffers])``: the rows of a state ``(..., rows, P)``."""
    return z[..., 0, :], [z[..., i, :] for i in range(1, rows)]


def stacked(u: Tensor, bufs: Sequence[Tensor]) -> Tensor:
    """The state ``(..., rows, P)`` from its rows."""
    return torch.stack([u, *bufs], dim=-2)


# ----------------------------------------------------------------------------- optimisers


@dataclass(frozen=True)
class Update:
    """The inputs of one optimiser update: parameters, buffers, gradient, rate, hyperparameters."""

    u: Tensor
    bufs: list[Tensor]
    g: Tensor
    lr: Tensor
    h: Mapping[str, Hyper]


#: What :meth:`AbstractInnerOptimizer.update_vjp` returns: cotangents of ``u``, of each
#: buffer, of ``g``, and of ``lr`` (or ``None``).
UpdateVJP = tuple[Tensor, list[Tensor], Tensor, Tensor | None]


def sqrt0(v: Tensor) -> Tensor:
    """``sqrt(v)`` for ``v >= 0``, with derivative 0 (not infinity) where ``v == 0``.

    The same values as :func:`torch.sqrt`. Under autograd the zero entries are routed
    around the square root (a ``where`` on both sides), so that no ``0 * inf`` arises.

    **The square root at zero.** Adam and RMSprop divide by ``sqrt(v) + eps``. Where a
    coordinate's gradient has been exactly zero so far (an input feature that is always 0, a
    dead ReLU unit), ``v = 0`` and ``sqrt`` has no derivative there: autograd multiplies
    ``0`` (``dv/dg = 2 (1 - beta2) g``) by infinity and returns NaN, which is what
    differentiable Adam elsewhere returns. The update as a function of ``g`` is smooth there
    all the same: ``sqrt(v')`` grows like ``|g|``, so it changes the update at second order
    only, and ``du'/dg = -lr (1 - beta1) / ((1 - beta1^t) eps)``. :func:`sqrt0` gives ``sqrt``
    the derivative 0 at 0, which is that limit exactly: every path through ``sqrt(v')`` at
    ``v' = 0`` is multiplied by ``m' = 0`` (or ``g = 0`` in RMSprop), since ``v = 0`` means every
    gradient so far was 0.
    """
    if not (torch.is_grad_enabled() and v.requires_grad):
        return v.sqrt()
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, 1.0).sqrt(), 0.0)


def is_zero(x: Hyper) -> bool:
    """A hyperparameter given as the float 0 (a tensor is never skipped: it may need a
    gradient)."""
    return not isinstance(x, Tensor) and float(x) == 0.0


class AbstractInnerOptimizer(AbstractStepMap):
    """An inner optimiser: its buffers and its elementwise update, torch.optim's rule on a
    flat parameter vector (:mod:`amaml.optim`).

    Subclasses are frozen dataclasses whose fields are the hyperparameters; a field given
    as a tensor that requires grad is a meta-parameter (see :meth:`hyperparameters`).
    """

    #: Names of the fields that are hyperparameters (floats or tensors).
    hyper_fields: ClassVar[tuple[str, ...]]
    kind: ClassVar[str] = "inner optimiser"
    gradient_at_u: ClassVar[bool] = True

    @property
    @abc.abstractmethod
    def n_buffers(self) -> int:
        """How many ``(P,)`` buffers the state holds besides the parameters."""

    @property
    def rows(self) -> int:
        return 1 + self.n_buffers

    @abc.abstractmethod
    def update(self, k: int | Tensor, u: Tensor, bufs: list[Tensor], g: Tensor, lr: Tensor,
               h: Mapping[str, Hyper]) -> tuple[Tensor, list[Tensor]]:
        """Step ``k`` (0-based): from ``(u_k, s_k)`` and the gradient ``g`` at ``u_k`` to
        ``(u_{k+1}, s_{k+1})``. Out of place (autograd differentiates it).

        Args:
            k: The step index; bias corrections use ``t = k + 1``. A 0-d tensor in compiled
                steps (one compiled function serves every step), so no Python branch on it.
            u: Parameters, ``(..., P)``.
            bufs: The ``n_buffers`` buffers, each shaped like ``u`` (zeros at ``k = 0``).
            g: The gradient of the support loss at ``u`` (proximal term included).
            lr: The learning rate of this step: 0-d or ``(P,)``.
            h: The hyperparameters by field name (:meth:`hyperparameters`, possibly
                replaced by leaves that require grad).
        """

    def update_vjp(self, k: int, x: Update, lam_u: Tensor, lam_bufs: list[Tensor],
                   need_lr: bool) -> UpdateVJP | None:
        """The transpose of :meth:`update`'s Jacobian at ``x``, written out (no autograd):
        from the cotangents of ``(u_{k+1}, s_{k+1})`` to those of ``(u, s, g)`` and ``lr``
        (``None`` unless ``need_lr``). ``None`` where not written for this configuration
        (autograd then differentiates :meth:`update`; the same numbers to round-off).
        Hyperparameters are not differentiated here."""
        return None

    def records_update(self) -> bool:
        """Whether a step taken with its autograd graph records the update as one node
        rather than autograd's record of each elementwise operation. The node saves only
        the state it starts from and the gradient, where autograd saves the update's own
        intermediates (Adam: the new first moment, the square root, its mask and the
        denominator, four parameter vectors a step); its backward pass is
        :meth:`update_vjp` where written, else autograd through the update taken again
        from what it saved (elementwise, cheap). ``False`` by default (SGD's update saves
        nothing of that size)."""
        return False

    def step(self, k: int | Tensor, z: Tensor, grad: Gradient, r: StepReads) -> Tensor:
        u, bufs = rows_of(z, self.rows)
        g = grad(u)
        if _record_by_hand(self, k, z, g, r):
            return _RecordedUpdate.apply(self, k, r.hyper, z, g, r.lr)
        u_next, new = self.update(k, u, bufs, g, r.lr, r.hyper)
        return stacked(u_next, new)

    def transpose(self, k: int, z: Tensor, lam: Tensor, oracle: Oracle,
                  r: StepReads) -> Transposed:
        """By :meth:`update_vjp` where written (no hyperparameter needs a gradient), else
        by the default (autograd on the elementwise update)."""
        if any(isinstance(v, Tensor) and v.requires_grad for v in r.hyper.values()):
            return transpose_at_u(self, k, z, lam, oracle, r)
        u, bufs = rows_of(z, self.rows)
        g = oracle.grad(u, 0)
        h = {n: v.detach() if isinstance(v, Tensor) else v for n, v in r.hyper.items()}
        hand = self.update_vjp(k, Update(u, bufs, g, r.lr.detach(), h), lam[..., 0, :],
                               [lam[..., i, :] for i in range(1, self.rows)],
                               r.lr.requires_grad)
        if hand is None:
            return transpose_at_u(self, k, z, lam, oracle, r)
        bar_u, bar_bufs, w, lr_bar = hand
        _, back = oracle.pull(u, w, 0, False)
        return stacked(bar_u + back, bar_bufs), ([(r.lr, lr_bar)] if r.lr.requires_grad
                                                  else [])

    def hyperparameters(self) -> dict[str, Hyper]:
        """The hyperparameters by field name, as given (floats or tensors); a pair such as
        ``betas`` as ``betas0``, ``betas1``."""
        out: dict[str, Hyper] = {}
        for name in self.hyper_fields:
            value = getattr(self, name)
            if isinstance(value, tuple):
                for i, v in enumerate(value):
                    out[f"{name}{i}"] = v
            else:
                out[name] = value
        return out

    def _check(self, name: str, value: Any, low: float, high: float | None = None,
               low_open: bool = False) -> None:
        v = float(value.detach()) if isinstance(value, Tensor) else value
        if isinstance(value, Tensor) and value.ndim != 0:
            raise ValueError(f"{type(self).__name__}({name}=...) must be a scalar; got a "
                             f"tensor of shape {tuple(value.shape)}.")
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TypeError(f"{type(self).__name__}({name}=...) must be a float or a 0-d "
                            f"tensor; got {value!r}.")
        bad = v <= low if low_open else v < low
        if high is not None:
            bad = bad or v >= high
        if bad or not math.isfinite(v):
            rng = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'})"
            raise ValueError(f"{type(self).__name__}({name}={value!r}) must lie in {rng}.")

    def describe(self) -> str:
        """A short name with the hyperparameters, for logs and tables."""
        parts = []
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = tuple(float(t.detach()) if isinstance(t, Tensor) else t for t in v)
            elif isinstance(v, Tensor):
                v = float(v.detach())
            parts.append(f"{f.name}={v}")
        return f"{self.name}({', '.join(parts)})"


_RECORDS = threading.local()


@contextmanager
def _autograd_records() -> Iterator[None]:
    """Steps taken inside have autograd record their update (a step differentiated at once,
    where the node of :meth:`AbstractInnerOptimizer.records_update` would only take the
    update a second time)."""
    before = getattr(_RECORDS, "autograd", False)
    _RECORDS.autograd = True
    try:
        yield
    finally:
        _RECORDS.autograd = before


def _transformed() -> bool:
    """Inside a ``torch.func`` transform (vmap, grad) or a compiled graph, where a custom
    autograd node is not used."""
    if torch.compiler.is_compiling():
        return True
    functorch = getattr(torch._C, "_functorch", None)
    peek = getattr(functorch, "peek_interpreter_stack", None)
    return peek is None or peek() is not None


def _record_by_hand(opt: AbstractInnerOptimizer, k: int | Tensor, z: Tensor, g: Tensor,
                    r: StepReads) -> bool:
    return (isinstance(k, int) and torch.is_grad_enabled()
            and not getattr(_RECORDS, "autograd", False) and opt.records_update()
            and (z.requires_grad or g.requires_grad or r.lr.requires_grad)
            and not any(isinstance(v, Tensor) and v.requires_grad for v in r.hyper.values())
            and not _transformed())


class _RecordedUpdate(torch.autograd.Function):
    """An optimiser's update as one autograd node (:meth:`AbstractInnerOptimizer.
    records_update`): the forward pass runs :meth:`~AbstractInnerOptimizer.update` without a
    graph and saves ``z`` and ``g``; the backward pass is
    :meth:`~AbstractInnerOptimizer.update_vjp` where written, else autograd through the
    update taken again; both in differentiable operations (a backward pass with
    ``create_graph`` differentiates it again)."""

    @staticmethod
    def forward(ctx: Any, opt: AbstractInnerOptimizer, k: int, h: Mapping[str, Hyper],
                z: Tensor, g: Tensor, lr: Tensor) -> Tensor:
        # The output is allocated before the update's temporaries, so that these, freed
        # together, leave one hole that the next step's fills (glibc's heap; stacked
        # after them, the kept states and the holes alternate and the heap grows).
        out = torch.empty_like(z)
        u, bufs = rows_of(z, opt.rows)
        u_next, new = opt.update(k, u, bufs, g, lr, h)
        for i, row in enumerate((u_next, *new)):
            out[..., i, :].copy_(row)
        ctx.save_for_backward(z, g, lr)
        ctx.opt, ctx.k, ctx.h = opt, k, h
        return out

    @staticmethod
    def backward(ctx: Any, lam: Tensor) -> tuple[Tensor | None, ...]:
        z, g, lr = ctx.saved_tensors
        opt: AbstractInnerOptimizer = ctx.opt
        u, bufs = rows_of(z, opt.rows)
        hand = opt.update_vjp(ctx.k, Update(u, bufs, g, lr, ctx.h), lam[..., 0, :],
                              [lam[..., i, :] for i in range(1, opt.rows)],
                              ctx.needs_input_grad[5])
        if hand is not None:
            bar_u, bar_bufs, bar_g, lr_bar = hand
            return None, None, None, stacked(bar_u, bar_bufs), bar_g, lr_bar
        return (None, None, None, *_retaken_vjp(ctx, opt, z, g, lr, lam))


def _retaken_vjp(ctx: Any, opt: AbstractInnerOptimizer, z: Tensor, g: Tensor, lr: Tensor,
                 lam: Tensor) -> list[Tensor | None]:
    """``lam``'s cotangents of ``(z, g, lr)`` by autograd through the update taken again.
    With ``create_graph`` (grad mode on in a backward pass) through views of the saved
    tensors, so that the result is differentiable again (a view, not the tensor: ``g``
    depends on ``z``, and only the update's own partial derivatives are wanted here); else
    through detached leaves."""
    create = torch.is_grad_enabled()
    need = ctx.needs_input_grad[3:6]
    with torch.enable_grad():
        ins = [t.view_as(t) if create else t.detach().requires_grad_(n)
               for t, n in zip((z, g, lr), need)]
        u, bufs = rows_of(ins[0], opt.rows)
        u_next, new = opt.update(ctx.k, u, bufs, ins[1], ins[2], ctx.h)
        wanted = [t for t, n in zip(ins, need) if n]
        res = iter(torch.autograd.grad(stacked(u_next, new), wanted, lam, create_graph=create,
                                       allow_unused=True))
    out = [next(res) if n else None for n in need]
    return [torch.zeros_like(t) if n and o is None else o
            for t, n, o in zip((z, g, lr), need, out)]
