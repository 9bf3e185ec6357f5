"""``torch.optim.SGD`` as a step map: momentum, dampening, Nesterov, L2 weight decay."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..reads import Hyper
from .base import AbstractInnerOptimizer, Update, UpdateVJP, is_zero, lr_cotangent

__all__ = ["SGD"]


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
        if self.nesterov and (is_zero(self.momentum) or not is_zero(self.dampening)):
            raise ValueError("SGD(nesterov=True) needs momentum > 0 and dampening = 0 (as "
                             "torch.optim.SGD).")

    @property
    def n_buffers(self) -> int:
        return 0 if is_zero(self.momentum) else 1

    def update(self, k: int | Tensor, u: Tensor, bufs: list[Tensor], g: Tensor, lr: Tensor,
               h: Mapping[str, Hyper]) -> tuple[Tensor, list[Tensor]]:
        d = g if is_zero(h["weight_decay"]) else g + h["weight_decay"] * u
        if not bufs:
            return u - lr * d, []
        mom, damp = h["momentum"], h["dampening"]
        if isinstance(k, Tensor):  # compiled steps: the first step selected, no branch
            buf = torch.where(k == 0, d, mom * bufs[0] + (1 - damp) * d)
        elif k == 0:
            buf = d
        else:
            buf = mom * bufs[0] + (d if is_zero(damp) else (1 - damp) * d)
        d = d + mom * buf if self.nesterov else buf
        return u - lr * d, [buf]

    def update_vjp(self, k: int, x: Update, lam_u: Tensor, lam_bufs: list[Tensor],
                   need_lr: bool) -> UpdateVJP | None:
        u, bufs, g, lr, h = x.u, x.bufs, x.g, x.lr, x.h
        wd, mom, damp = h["weight_decay"], h["momentum"], h["dampening"]
        d = g if is_zero(wd) else g + wd * u
        bar_dir = -lr * lam_u
        if not bufs:
            lr_bar = lr_cotangent(lr, -(lam_u * d)) if need_lr else None
            bar_d = bar_dir
            return (lam_u if is_zero(wd) else lam_u + wd * bar_d), [], bar_d, lr_bar
        if k == 0:
            buf = d
        else:
            buf = mom * bufs[0] + (d if is_zero(damp) else (1 - damp) * d)
        direction = d + mom * buf if self.nesterov else buf
        lr_bar = lr_cotangent(lr, -(lam_u * direction)) if need_lr else None
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
            bar_d = bar_d + (bar_buf if is_zero(damp) else (1 - damp) * bar_buf)
            bar_prev = mom * bar_buf
        return (lam_u if is_zero(wd) else lam_u + wd * bar_d), [bar_prev], bar_d, lr_bar
