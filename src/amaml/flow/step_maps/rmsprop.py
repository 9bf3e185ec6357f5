"""``torch.optim.RMSprop`` as a step map (centred, momentum, L2 weight decay)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..reads import Hyper
from .base import AbstractInnerOptimizer, is_zero, sqrt0

__all__ = ["RMSprop"]


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
        return 1 + int(self.centered) + int(not is_zero(self.momentum))

    def records_update(self) -> bool:
        return True

    def update(self, k: int | Tensor, u: Tensor, bufs: list[Tensor], g: Tensor, lr: Tensor,
               h: Mapping[str, Hyper]) -> tuple[Tensor, list[Tensor]]:
        if not is_zero(h["weight_decay"]):
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
        if is_zero(self.momentum):
            return u - lr * (g / avg), new
        buf = h["momentum"] * bufs[i] + g / avg
        new.append(buf)
        return u - lr * buf, new
