"""``torch.optim.Adam`` and ``AdamW`` as step maps, with Adam's update transposed by hand.

Each rule is written with elementwise torch operations in the order :mod:`torch.optim` uses
(single-tensor implementations of torch 2.13, ``maximize=False``), so that the trajectory is
torch.optim's to round-off. Adam divides by ``sqrt(v) + eps``; where a coordinate's gradient
has been exactly zero so far, ``v = 0`` and :func:`~amaml.flow.step_maps.base.sqrt0` gives the
square root the derivative 0, which is the exact limit there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..reads import Hyper
from .base import AbstractInnerOptimizer, Update, UpdateVJP, is_zero, lr_cotangent, sqrt0

__all__ = ["Adam", "AdamW"]


def _pow(base: Hyper, t: int | Tensor) -> Hyper:
    if isinstance(base, Tensor) or isinstance(t, Tensor):
        return base ** t
    return float(base) ** t


def _sqrt_scalar(x: Hyper) -> Hyper:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def _check_betas(opt: AbstractInnerOptimizer, betas: Any) -> None:
    if not isinstance(betas, tuple) or len(betas) != 2:
        raise TypeError(f"{type(opt).__name__}(betas=...) must be a pair (beta1, beta2); got "
                        f"{betas!r}.")
    opt._check("betas[0]", betas[0], 0.0, 1.0)
    opt._check("betas[1]", betas[1], 0.0, 1.0)


def _adam_direction(k: int | Tensor, bufs: list[Tensor], g: Tensor, h: Mapping[str, Hyper],
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


def _adam_vjp(k: int, x: Update, lam_u: Tensor, lam_bufs: list[Tensor], need_lr: bool
              ) -> UpdateVJP:
    """The transpose of Adam's direction step (without weight decay, not AMSGrad): from
    the cotangents of ``u' = u - lr / bc1 * m' / (sqrt0(v') / c2 + eps)``, ``m'``, ``v'``
    to those of ``m``, ``v``, ``g`` and ``lr`` (``u``'s is ``lam_u`` itself). Where
    ``v' = 0`` the square root passes no cotangent (the limit; see :func:`sqrt0`)."""
    bufs, g, lr, h = x.bufs, x.g, x.lr, x.h
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
    lr_bar = lr_cotangent(lr, -(lam_u * direction) / bc1) if need_lr else None
    bar_dir = -step * lam_u
    bar_m = lam_bufs[0] + bar_dir / denom
    bar_s = -(bar_dir * direction / denom) / c2
    pos = s > 0
    bar_v = lam_bufs[1] + torch.where(pos, bar_s / (2 * torch.where(pos, s, 1.0)), 0.0)
    bar_g = (1 - b1) * bar_m + (2 * (1 - b2)) * g * bar_v
    return lam_u, [b1 * bar_m, b2 * bar_v], bar_g, lr_bar


def _decayed(u: Tensor, g: Tensor, lr: Tensor, wd: Hyper, decoupled: bool
             ) -> tuple[Tensor, Tensor]:
    """Adam's weight decay, torch.optim's order: L2 (``g + wd u``, Adam) or decoupled
    (``u (1 - lr wd)`` first, AdamW)."""
    if is_zero(wd):
        return u, g
    return (u * (1 - lr * wd), g) if decoupled else (u, g + wd * u)


def _adam_update_vjp(k: int, x: Update, lam_u: Tensor, lam_bufs: list[Tensor], need_lr: bool,
                     decoupled: bool) -> UpdateVJP:
    """The transpose of Adam's update with its weight decay: L2 (``g + wd u``, Adam) or
    decoupled (``u (1 - lr wd)`` first, AdamW)."""
    u, g, lr, wd = x.u, x.g, x.lr, x.h["weight_decay"]
    g_eff = g if decoupled or is_zero(wd) else g + wd * u
    bar_u, bar_bufs, bar_g, lr_bar = _adam_vjp(k, replace(x, g=g_eff), lam_u, lam_bufs, need_lr)
    if is_zero(wd):
        return bar_u, bar_bufs, bar_g, lr_bar
    if not decoupled:
        return bar_u + wd * bar_g, bar_bufs, bar_g, lr_bar
    if need_lr:
        decay = lr_cotangent(lr, -(lam_u * u) * wd)
        lr_bar = decay if lr_bar is None else lr_bar + decay
    return bar_u * (1 - lr * wd), bar_bufs, bar_g, lr_bar


@dataclass(frozen=True)
class _AdamRule(AbstractInnerOptimizer):
    """Adam's fields, checks, update and transpose; :class:`Adam` and :class:`AdamW` differ
    in the weight decay (``decoupled``) and its default."""

    betas: tuple[Hyper, Hyper] = (0.9, 0.999)
    eps: Hyper = 1e-8
    weight_decay: Hyper = 0.0
    amsgrad: bool = False
    hyper_fields: ClassVar[tuple[str, ...]] = ("betas", "eps", "weight_decay")
    decoupled: ClassVar[bool] = False

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
               h: Mapping[str, Hyper]) -> tuple[Tensor, list[Tensor]]:
        u, g = _decayed(u, g, lr, h["weight_decay"], self.decoupled)
        direction, new, bc1 = _adam_direction(k, bufs, g, h, self.amsgrad)
        return u - (lr / bc1) * direction, new

    def records_update(self) -> bool:
        return True

    def update_vjp(self, k: int, x: Update, lam_u: Tensor, lam_bufs: list[Tensor],
                   need_lr: bool) -> UpdateVJP | None:
        if self.amsgrad:
            return None
        return _adam_update_vjp(k, x, lam_u, lam_bufs, need_lr, self.decoupled)


@dataclass(frozen=True)
class Adam(_AdamRule):
    """``torch.optim.Adam`` with bias correction; ``weight_decay`` is L2 (added to ``g``).

    ``m' = b1 m + (1 - b1) g``, ``v' = b2 v + (1 - b2) g^2`` (``t = k + 1``),
    ``u' = u - lr / (1 - b1^t) * m' / (sqrt(v') / sqrt(1 - b2^t) + eps)``; ``amsgrad``
    uses ``max(v_max, v')`` in place of ``v'``. Finite and exact where ``v' = 0`` (see the
    module's note on :func:`sqrt0`).
    """

    name: ClassVar[str] = "adam"


@dataclass(frozen=True)
class AdamW(_AdamRule):
    """``torch.optim.AdamW``: Adam with decoupled weight decay (default 0.01).

    ``u <- u (1 - lr wd)``, then Adam's step without L2 term.
    """

    weight_decay: Hyper = 0.01
    name: ClassVar[str] = "adamw"
    decoupled: ClassVar[bool] = True
