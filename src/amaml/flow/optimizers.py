"""Inner optimisers as step maps: torch.optim's update rules on a flat parameter vector.

An inner optimiser turns the gradient ``g`` of step ``k`` into the next parameters and
buffers: ``(u_{k+1}, s_{k+1}) = update(k, u_k, s_k, g, lr_k)``, where the state ``s``
holds the optimiser's buffers (momentum ``buf``; Adam's ``m`` and ``v``) and the step count
is data, not state. Each rule is written with elementwise torch operations, in the order
:mod:`torch.optim` uses (``torch.optim.SGD``, ``Adam``, ``AdamW``, ``RMSprop``, single-tensor
implementations of torch 2.13, ``maximize=False``), so that ``amaml.adapt(...,
optimizer=...)`` follows the same trajectory as ``torch.optim`` to round-off.

The discrete adjoint of such a step (:mod:`amaml.flow.steps`) differentiates ``update``
with autograd, elementwise, and multiplies the gradient's cotangent by the Hessian of the
support loss (one Hessian-vector product per step): no graph outlives a step.

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

Hyperparameters (``momentum``, ``betas``, ``eps``, ``weight_decay``, ``alpha``, ...) may be
floats or tensors; a tensor that requires grad receives its meta-gradient from the same
sweep. The learning rate is not a field: it is ``adapt``'s ``lr=`` (scalar, per parameter,
per step).

A new optimiser is one :class:`AbstractInnerOptimizer` subclass (its buffers, its update)
and one entry in :data:`OPTIMIZERS`.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["OPTIMIZERS", "SGD", "AbstractInnerOptimizer", "Adam", "AdamW", "RMSprop", "sqrt0",
           "resolve_optimizer"]

Hyper = float | Tensor
#: What :meth:`AbstractInnerOptimizer.update_vjp` returns: cotangents of ``u``, of each
#: buffer, of ``g``, and of ``lr`` (or ``None``).
_UpdateVJP = tuple[Tensor, list[Tensor], Tensor, Tensor | None]


def _lr_bar(lr: Tensor, prod: Tensor) -> Tensor:
    """The cotangent of ``lr`` from ``prod = d(update)/d(lr) * cotangent`` elementwise:
    summed over everything ``lr`` was broadcast over (tasks, and parameters if scalar)."""
    if lr.ndim == 0:
        return prod.sum()
    return prod.reshape(-1, lr.shape[-1]).sum(0)


def sqrt0(v: Tensor) -> Tensor:
    """``sqrt(v)`` for ``v >= 0``, with derivative 0 (not infinity) where ``v == 0``.

    The same values as :func:`torch.sqrt`. Under autograd the zero entries are routed
    around the square root (a ``where`` on both sides), so that no ``0 * inf`` arises.
    """
    if not (torch.is_grad_enabled() and v.requires_grad):
        return v.sqrt()
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, 1.0).sqrt(), 0.0)


def _pow(base: Hyper, t: int | Tensor) -> Hyper:
    if isinstance(base, Tensor) or isinstance(t, Tensor):
        return base ** t
    return float(base) ** t


def _sqrt_scalar(x: Hyper) -> Hyper:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def _is_zero(x: Hyper) -> bool:
    return not isinstance(x, Tensor) and float(x) == 0.0


class AbstractInnerOptimizer(abc.ABC):
    """An inner optimiser: its buffers and its elementwise update.

    Subclasses are frozen dataclasses whose fields are the hyperparameters; a field given
    as a tensor that requires grad is a meta-parameter (see :meth:`hyperparameters`).
    """

    name: ClassVar[str]
    #: Names of the fields that are hyperparameters (floats or tensors).
    hyper_fields: ClassVar[tuple[str, ...]]

    @property
    @abc.abstractmethod
    def n_buffers(self) -> int:
        """How many ``(P,)`` buffers the state holds besides the parameters."""

    @abc.abstractmethod
    def update(self, k: int | Tensor, u: Tensor, bufs: list[Tensor], g: Tensor, lr: Tensor,
               h: dict[str, Hyper]) -> tuple[Tensor, list[Tensor]]:
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

    def update_vjp(self, k: int, u: Tensor, bufs: list[Tensor], g: Tensor, lr: Tensor,
                   h: dict[str, Hyper], lam_u: Tensor, lam_bufs: list[Tensor],
                   need_lr: bool) -> _UpdateVJP | None:
        """The transpose of :meth:`update`'s Jacobian, written out (no autograd): from the
        cotangents of ``(u_{k+1}, s_{k+1})`` to those of ``(u, s, g)`` and ``lr`` (``None``
        unless ``need_lr``). ``None`` where not written for this configuration (the sweep
        then differentiates :meth:`update` with autograd; the same numbers to round-off).
        Hyperparameters in ``h`` are not differentiated here."""
        return None

    def hyperparameters(self) -> dict[str, Hyper]:
        """The hyperparameters by field name, as given (floats or tensors)."""
        out: dict[str, Hyper] = {}
        for name in self.hyper_fields:
            value = getattr(self, name)
            if isinstance(value, tuple):  # betas
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


@dataclass(frozen=True)
class SGD(AbstractInnerOptimizer):
    """``torch.optim.SGD``: gradient descent with momentum, dampening, Nesterov, L2 decay.

    ``d = g + wd u``; with momentum ``buf' = d`` at the first step, else
    ``buf' = momentum buf + (1 - dampening) d``; ``d = d + momentum buf'`` (Nesterov) or
    ``d = buf'``; ``u' = u - lr d``. ``SGD()`` is exactly gradient descent (Euler).
    """

    momentum: Hyper = 0.0
    dampening: Hyper = 0.0
    nesterov: bool = False
    weight_decay: Hyper = 0.0
    name: ClassVar[str] = "sgd"
    hyper_fields: ClassVar[tuple[str, ...]] = ("momentum", "dampening", "weight_decay")

    def __post_init__(self) -> None:
        self._check("momentum", self.momentum, 0.0)
        self._check("dampening", self.dampening, 0.0)
        self._check("weight_decay", self.weight_decay, 0.0)
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"SGD(nesterov=...) must be a bool; got {self.nesterov!r}.")
        if self.nesterov and (_is_zero(self.momentum) or not _is_zero(self.dampening)):
            raise ValueError("SGD(nesterov=True) needs momentum > 0 and dampening = 0 (as "
                             "torch.optim.SGD).")

    @property
    def n_buffers(self) -> int:
        return 0 if _is_zero(self.momentum) else 1

    def update(self, k: int | Tensor, u: Tensor, bufs: list[Tensor], g: Tensor, lr: Tensor,
               h: dict[str, Hyper]) -> tuple[Tensor, list[Tensor]]:
        d = g if _is_zero(h["weight_decay"]) else g + h["weight_decay"] * u
        if not bufs:
            return u - lr * d, []
        mom, damp = h["momentum"], h["dampening"]
        if isinstance(k, Tensor):  # compiled steps: the first step selected, no branch
            buf = torch.where(k == 0, d, mom * bufs[0] + (1 - damp) * d)
        elif k == 0:
            buf = d
        else:
            buf = mom * bufs[0] + (d if _is_zero(damp) else (1 - damp) * d)
        d = d + mom * buf if self.nesterov else buf
        return u - lr * d, [buf]

    def update_vjp(self, k: int, u: Tensor, bufs: list[Tensor], g: Tensor, lr: Tensor,
                   h: dict[str, Hyper], lam_u: Tensor, lam_bufs: list[Tensor],
                   need_lr: bool) -> _UpdateVJP | None:
        wd, mom, damp = h["weight_decay"], h["momentum"], h["dampening"]
        d = g if _is_zero(wd) else g + wd * u
        bar_dir = -lr * lam_u
        if not bufs:
            lr_bar = _lr_bar(lr, -(lam_u * d)) if need_lr else None
            bar_d = bar_dir
            return (lam_u if _is_zero(wd) else lam_u + wd * bar_d), [], bar_d, lr_bar
        if k == 0:
            buf = d
        else:
            buf = mom * bufs[0] + (d if _is_zero(damp) else (1 - damp) * d)
        direction = d + mom * buf if self.nesterov else buf
        lr_bar = _lr_bar(lr, -(lam_u * direction)) if need_lr else None
        if self.nesterov:
            bar_buf = lam_bufs[0] + mom * bar_dir
            bar_d = bar_dir
        else:
            bar_buf = lam_bufs[0] + bar_dir
            bar_d = torch.zeros_like(u)
        if k == 0:
            bar_d = bar_d + bar_buf
            bar_prev = torch.zeros_like(u)
        else:
            bar_d = bar_d + (bar_buf if _is_zero(damp) else (1 - damp) * bar_buf)
            bar_prev = mom * bar_buf
        return (lam_u if _is_zero(wd) else lam_u + wd * bar_d), [bar_prev], bar_d, lr_bar


def _check_betas(opt: AbstractInnerOptimizer, betas: Any) -> None:
    if not isinstance(betas, tuple) or len(betas) != 2:
        raise TypeError(f"{type(opt).__name__}(betas=...) must be a pair (beta1, beta2); got "
                        f"{betas!r}.")
    opt._check("betas[0]", betas[0], 0.0, 1.0)
    opt._check("betas[1]", betas[1], 0.0, 1.0)


def _adam_direction(k: int | Tensor, bufs: list[Tensor], g: Tensor, h: dict[str, Hyper],
                    amsgrad: bool) -> tuple[Tensor, list[Tensor], Hyper]:
    """Adam's moments and ``m_hat-free`` direction ``m' / (sqrt(v')/sqrt(bc2) + eps)``, and
    ``1 / bc1`` (torch.optim's order: ``step_size = lr / bc1`` multiplies last)."""
    b1, b2, eps = h["betas0"], h["betas1"], h["eps"]
    t = k + 1
    m = bufs[0] + (1 - b1) * (g - bufs[0])  # torch.optim: exp_avg.lerp_(grad, 1 - beta1)
    v = b2 * bufs[1] + (1 - b2) * (g * g)
    bc1 = 1 - _pow(b1, t)
    bc2_sqrt = _sqrt_scalar(1 - _pow(b2, t))
    new = [m, v]
    vv = v
    if amsgrad:
        # max(v_max, v'); at a tie the derivative goes to v' (the new value).
        vv = torch.where(v >= bufs[2], v, bufs[2])
        new.append(vv)
    denom = sqrt0(vv) / bc2_sqrt + eps
    return m / denom, new, bc1


def _adam_vjp(k: int, bufs: list[Tensor], g: Tensor, lr: Tensor, h: dict[str, Hyper],
              lam_u: Tensor, lam_bufs: list[Tensor], need_lr: bool
              ) -> tuple[Tensor, list[Tensor], Tensor, Tensor | None]:
    """The transpose of Adam's direction step (without weight decay, not AMSGrad): from
    the cotangents of ``u' = u - lr / bc1 * m' / (sqrt0(v') / c2 + eps)``, ``m'``, ``v'``
    to those of ``m``, ``v``, ``g`` and ``lr`` (``u``'s is ``lam_u`` itself). Where
    ``v' = 0`` the square root passes no cotangent (the limit; see :func:`sqrt0`)."""
    b1, b2, eps = h["betas0"], h["betas1"], h["eps"]
    t = k + 1
    m = bufs[0] + (1 - b1) * (g - bufs[0])
    v = b2 * bufs[1] + (1 - b2) * (g * g)
    bc1 = 1 - _pow(b1, t)
    c2 = _sqrt_scalar(1 - _pow(b2, t))
    s = v.sqrt()
    denom = s / c2 + eps
    direction = m / denom
    step = lr / bc1
    lr_bar = _lr_bar(lr, -(lam_u * direction) / bc1) if need_lr else None
    bar_dir = -step * lam_u
    bar_m = lam_bufs[0] + bar_dir / denom
    bar_s = -(bar_dir * direction / denom) / c2
    pos = s > 0
    bar_v = lam_bufs[1] + torch.where(pos, bar_s / (2 * torch.where(pos, s, 1.0)), 0.0)
    bar_g = (1 - b1) * bar_m + (2 * (1 - b2)) * g * bar_v
    return lam_u, [b1 * bar_m, b2 * bar_v], bar_g, lr_bar


def _adam_update(k: int | Tensor, u: Tensor, bufs: list[Tensor], g: Tensor, lr: Tensor,
                 h: dict[str, Hyper], amsgrad: bool, decoupled: bool
                 ) -> tuple[Tensor, list[Tensor]]:
    """Adam's update with its weight decay: L2 (``g + wd u``, Adam) or decoupled
    (``u (1 - lr wd)`` first, AdamW); torch.optim's order of operations."""
    wd = h["weight_decay"]
    if not _is_zero(wd):
        if decoupled:
            u = u * (1 - lr * wd)
        else:
            g = g + wd * u
    direction, new, bc1 = _adam_direction(k, bufs, g, h, amsgrad)
    return u - (lr / bc1) * direction, new


def _adam_update_vjp(k: int, u: Tensor, bufs: list[Tensor], g: Tensor, lr: Tensor,
                     h: dict[str, Hyper], lam_u: Tensor, lam_bufs: list[Tensor], need_lr: bool,
                     decoupled: bool) -> _UpdateVJP:
    """The transpose of Adam's update with its weight decay: L2 (``g + wd u``, Adam) or
    decoupled (``u (1 - lr wd)`` first, AdamW)."""
    wd = h["weight_decay"]
    g_eff = g if decoupled or _is_zero(wd) else g + wd * u
    bar_u, bar_bufs, bar_g, lr_bar = _adam_vjp(k, bufs, g_eff, lr, h, lam_u, lam_bufs, need_lr)
    if _is_zero(wd):
        return bar_u, bar_bufs, bar_g, lr_bar
    if not decoupled:
        return bar_u + wd * bar_g, bar_bufs, bar_g, lr_bar
    if need_lr:
        decay = _lr_bar(lr, -(lam_u * u) * wd)
        lr_bar = decay if lr_bar is None else lr_bar + decay
    return bar_u * (1 - lr * wd), bar_bufs, bar_g, lr_bar


@dataclass(frozen=True)
class Adam(AbstractInnerOptimizer):
    """``torch.optim.Adam`` with bias correction; ``weight_decay`` is L2 (added to ``g``).

    ``m' = b1 m + (1 - b1) g``, ``v' = b2 v + (1 - b2) g^2`` (``t = k + 1``),
    ``u' = u - lr / (1 - b1^t) * m' / (sqrt(v') / sqrt(1 - b2^t) + eps)``; ``amsgrad``
    uses ``max(v_max, v')`` in place of ``v'``. Finite and exact where ``v' = 0`` (see the
    module's note on :func:`sqrt0`).
    """

    betas: tuple[Hyper, Hyper] = (0.9, 0.999)
    eps: Hyper = 1e-8
    weight_decay: Hyper = 0.0
    amsgrad: bool = False
    name: ClassVar[str] = "adam"
    hyper_fields: ClassVar[tuple[str, ...]] = ("betas", "eps", "weight_decay")

    def __post_init__(self) -> None:
        _check_betas(self, self.betas)
        self._check("eps", self.eps, 0.0, low_open=True)
        self._check("weight_decay", self.weight_decay, 0.0)
        if not isinstance(self.amsgrad, bool):
            raise TypeError(f"{type(self).__name__}(amsgrad=...) must be a bool; got "
                            f"{self.amsgrad!r}.")

    @property
    def n_buffers(self) -> int:
        return 3 if self.amsgrad else 2

    def update(self, k: int | Tensor, u: Tensor, bufs: list[Tensor], g: Tensor, lr: Tensor,
               h: dict[str, Hyper]) -> tuple[Tensor, list[Tensor]]:
        return _adam_update(k, u, bufs, g, lr, h, self.amsgrad, decoupled=False)

    def update_vjp(self, k: int, u: Tensor, bufs: list[Tensor], g: Tensor, lr: Tensor,
                   h: dict[str, Hyper], lam_u: Tensor, lam_bufs: list[Tensor],
                   need_lr: bool) -> _UpdateVJP | None:
        if self.amsgrad:
            return None
        return _adam_update_vjp(k, u, bufs, g, lr, h, lam_u, lam_bufs, need_lr, decoupled=False)


@dataclass(frozen=True)
class AdamW(AbstractInnerOptimizer):
    """``torch.optim.AdamW``: Adam with decoupled weight decay (default 0.01).

    ``u <- u (1 - lr wd)``, then Adam's step without L2 term.
    """

    betas: tuple[Hyper, Hyper] = (0.9, 0.999)
    eps: Hyper = 1e-8
    weight_decay: Hyper = 0.01
    amsgrad: bool = False
    name: ClassVar[str] = "adamw"
    hyper_fields: ClassVar[tuple[str, ...]] = ("betas", "eps", "weight_decay")

    def __post_init__(self) -> None:
        Adam.__post_init__(self)  # type: ignore[arg-type]  # same fields, same checks

    @property
    def n_buffers(self) -> int:
        return 3 if self.amsgrad else 2

    def update(self, k: int | Tensor, u: Tensor, bufs: list[Tensor], g: Tensor, lr: Tensor,
               h: dict[str, Hyper]) -> tuple[Tensor, list[Tensor]]:
        return _adam_update(k, u, bufs, g, lr, h, self.amsgrad, decoupled=True)

    def update_vjp(self, k: int, u: Tensor, bufs: list[Tensor], g: Tensor, lr: Tensor,
                   h: dict[str, Hyper], lam_u: Tensor, lam_bufs: list[Tensor],
                   need_lr: bool) -> _UpdateVJP | None:
        if self.amsgrad:
            return None
        return _adam_update_vjp(k, u, bufs, g, lr, h, lam_u, lam_bufs, need_lr, decoupled=True)


@dataclass(frozen=True)
class RMSprop(AbstractInnerOptimizer):
    """``torch.optim.RMSprop``: ``sq' = alpha sq + (1 - alpha) g^2``; ``centered`` also keeps
    ``ga' = alpha ga + (1 - alpha) g`` and uses ``sq' - ga'^2``;
    ``a = sqrt(.) + eps``; ``buf' = momentum buf + g / a`` and ``u' = u - lr buf'`` with
    momentum, else ``u' = u - lr g / a``. ``weight_decay`` is L2. Finite and exact where
    the average is 0 (:func:`sqrt0`).
    """

    alpha: Hyper = 0.99
    eps: Hyper = 1e-8
    weight_decay: Hyper = 0.0
    momentum: Hyper = 0.0
    centered: bool = False
    name: ClassVar[str] = "rmsprop"
    hyper_fields: ClassVar[tuple[str, ...]] = ("alpha", "eps", "weight_decay", "momentum")

    def __post_init__(self) -> None:
        self._check("alpha", self.alpha, 0.0, 1.0)
        self._check("eps", self.eps, 0.0, low_open=True)
        self._check("weight_decay", self.weight_decay, 0.0)
        self._check("momentum", self.momentum, 0.0)
        if not isinstance(self.centered, bool):
            raise TypeError(f"RMSprop(centered=...) must be a bool; got {self.centered!r}.")

    @property
    def n_buffers(self) -> int:
        return 1 + int(self.centered) + int(not _is_zero(self.momentum))

    def update(self, k: int | Tensor, u: Tensor, bufs: list[Tensor], g: Tensor, lr: Tensor,
               h: dict[str, Hyper]) -> tuple[Tensor, list[Tensor]]:
        if not _is_zero(h["weight_decay"]):
            g = g + h["weight_decay"] * u
        alpha = h["alpha"]
        sq = alpha * bufs[0] + (1 - alpha) * (g * g)
        new = [sq]
        i = 1
        if self.centered:
            ga = bufs[i] + (1 - alpha) * (g - bufs[i])  # torch.optim: grad_avg.lerp_
            new.append(ga)
            i += 1
            avg = sqrt0(sq - ga * ga) + h["eps"]
        else:
            avg = sqrt0(sq) + h["eps"]
        if _is_zero(self.momentum):
            return u - lr * (g / avg), new
        buf = h["momentum"] * bufs[i] + g / avg
        new.append(buf)
        return u - lr * buf, new


#: Registered inner optimiser names, for ``optimizer="adam"`` and the CLI.
OPTIMIZERS: dict[str, type[AbstractInnerOptimizer]] = {
    "sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop,
}


def resolve_optimizer(optimizer: str | AbstractInnerOptimizer | None
                      ) -> AbstractInnerOptimizer | None:
    """An optimiser instance from a registered name (``"sgd"``, ``"adam"``, ``"adamw"``,
    ``"rmsprop"``; defaults as torch.optim), an instance as it is, or ``None``."""
    if optimizer is None or isinstance(optimizer, AbstractInnerOptimizer):
        return optimizer
    if isinstance(optimizer, str) and optimizer.lower() in OPTIMIZERS:
        return OPTIMIZERS[optimizer.lower()]()
    raise ValueError(f"Unknown inner optimizer {optimizer!r}; expected one of "
                     f"{sorted(OPTIMIZERS)}, an amaml.optim optimiser instance, or None "
                     "(gradient flow with solver=).")
