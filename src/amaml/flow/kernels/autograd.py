"""The autograd kernel: one step differentiated by double backward. Every loss, step map
and read; a random loss's steps replay the random state they drew."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..reads import Reads
from ..spec import FlowSpec
from .base import AbstractKernel, Cotangents

__all__ = ["AutogradKernel", "eager_step"]


def eager_step(spec: FlowSpec, k: int, z: Tensor, reads: Reads, graph: bool = False) -> Tensor:
    """Step ``k`` from ``z`` by the step map, the gradient by the objective (its own when
    it has one and no graph is wanted; autograd otherwise); with ``graph``, the step's
    autograd graph is built (``z`` and ``reads`` must be part of it)."""
    r = reads.at(k)
    objective, data, mu, theta = spec.objective, r.data, r.mu, r.theta

    def grad(v: Tensor) -> Tensor:
        g = objective.grad(v, data, create_graph=graph)
        return g if mu is None else g + mu * (v - theta)

    return spec.step_map.step(k, z, grad, r)


class AutogradKernel(AbstractKernel):
    """Double backward through one step (see the module)."""

    name = "autograd"

    @classmethod
    def supports(cls, spec: FlowSpec, need: Sequence[bool]) -> str | None:
        return None

    def step(self, k: int, z: Tensor, reads: Reads, record: list[Any] | None = None) -> Tensor:
        with reads.random_step(k, z.device):
            return eager_step(self.spec, k, z, reads)

    def tape(self, k: int, z: Tensor, reads: Reads, need: Sequence[bool]
             ) -> tuple[Tensor, Tensor, list[tuple[int, Tensor]]]:
        """Step ``k`` from ``z`` with its autograd graph: ``(z_{k+1}, z leaf, [(index,
        leaf)])`` for the reads that ``need`` and that the step differentiates."""
        with torch.enable_grad(), reads.random_step(k, z.device):
            leaves = reads.leaves(need, k)
            zl = z.detach().requires_grad_(True)
            out = eager_step(self.spec, k, zl, leaves, graph=True)
        return out, zl, list(leaves.wanted(need))

    def vjp(self, k: int, z: Tensor, lam: Tensor, reads: Reads, need: Sequence[bool],
            tape: Any = None) -> tuple[Tensor, Cotangents]:
        out, zl, wanted = self.tape(k, z, reads, need)
        with torch.enable_grad():
            res = torch.autograd.grad(out, [zl, *(t for _, t in wanted)], lam,
                                      allow_unused=True)
        lam_z = res[0] if res[0] is not None else torch.zeros_like(z)
        return lam_z, [(i, g) for (i, _), g in zip(wanted, res[1:])]
