"""What a kernel is, and which one transposes a flow's steps: the one place that decides.

A kernel takes a step (without a graph) and computes one step's vector-Jacobian product
``(dPhi_k/dz)^T lam`` with the cotangents of what the step reads (:class:`~amaml.flow.reads.
Reads`). Three are tried in this order; each says what it supports, or why not:

    ``"compiled"``  the step and its VJP as functions compiled by :func:`torch.compile`
                    (:mod:`~amaml.flow.kernels.compiled`);
    ``"fused"``     the loss's own gradient and Hessian-vector product (a plain MLP,
                    :class:`~amaml.flow.fused.AbstractFusedLoss`) and the step map's own
                    transpose: no autograd graph through the model
                    (:mod:`~amaml.flow.kernels.fused`);
    ``"autograd"``  double backward through one step: every loss, step map and read
                    (:mod:`~amaml.flow.kernels.autograd`).

:func:`select_kernel` is called once per flow, with the real needs (which reads require
grad); the memory strategies then talk to the chosen kernel only. :func:`amaml.explain`
prints its choice and why the faster ones were declined.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..reads import Reads
from ..spec import FlowSpec

__all__ = ["AbstractKernel", "Cotangents", "KernelChoice"]

#: A step VJP's cotangents of the reads: ``(index in Reads.tensors(), cotangent)``.
Cotangents = list[tuple[int, Tensor | None]]


class AbstractKernel(abc.ABC):
    """Takes steps and transposes them for one flow (see the module)."""

    name: ClassVar[str]

    def __init__(self, spec: FlowSpec) -> None:
        self.spec = spec

    @classmethod
    @abc.abstractmethod
    def supports(cls, spec: FlowSpec, need: Sequence[bool]) -> str | None:
        """``None`` if this kernel transposes the flow's steps with these needs, else why
        not, in words."""

    @abc.abstractmethod
    def step(self, k: int, z: Tensor, reads: Reads, record: list[Any] | None = None) -> Tensor:
        """``z_{k+1}`` without a graph. ``record``: a list to which the kernel appends what
        it computed that its :meth:`vjp` of this step can reuse (``[]`` if nothing)."""

    @abc.abstractmethod
    def vjp(self, k: int, z: Tensor, lam: Tensor, reads: Reads, need: Sequence[bool],
            tape: Any = None) -> tuple[Tensor, Cotangents]:
        """``((dPhi_k/dz (z))^T lam, cotangents of the needed reads)``. ``tape``: what
        :meth:`step` recorded when it took this step from ``z`` (the same result)."""

    def active(self) -> tuple[AbstractKernel, str | None]:
        """The kernel doing the work now and, if not this one, why (a compiled kernel whose
        compilation failed hands its work to an eager one)."""
        return self, None

    def tape_numel(self, reads: Reads) -> int:
        """Numbers one step's record holds (0: this kernel records nothing)."""
        return 0

    def tape_flops(self, reads: Reads) -> int:
        """Floating-point operations one step's record saves its VJP (0: not known)."""
        return 0


@dataclass(frozen=True)
class KernelChoice:
    """The chosen kernel and why each faster one was not taken.

    Attributes:
        kernel: The kernel (built for the flow).
        declined: ``(kernel name, reason)`` for each faster kernel, in order.
    """

    kernel: AbstractKernel
    declined: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        """The working kernel's name: ``"compiled"``, ``"fused"`` or ``"autograd"``."""
        return self.kernel.active()[0].name

    def describe(self) -> str:
        """One line: the kernel, then why not the faster ones."""
        active, why_not = self.kernel.active()
        declined = self.declined + ((self.kernel.name, why_not),) if why_not else self.declined
        why = "; ".join(f"not {k}: {r}" for k, r in declined)
        return active.name + (f" ({why})" if why else "")
