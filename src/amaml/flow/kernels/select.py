""":func:`select_kernel`: the one place that picks a flow's kernel (see :mod:`.base`)."""

from __future__ import annotations

from collections.abc import Sequence

from ..reads import Reads
from ..spec import FlowSpec
from .autograd import AutogradKernel
from .base import AbstractKernel, KernelChoice
from .compiled import CompiledKernel
from .fused import FusedKernel

__all__ = ["select_kernel"]


def select_kernel(spec: FlowSpec, reads: Reads, need: Sequence[bool]) -> KernelChoice:
    """The fastest kernel that transposes this flow's steps with these needs (which of
    :meth:`Reads.tensors` require a gradient), with the reasons the faster ones did not."""
    declined: list[tuple[str, str]] = []
    fused_why = FusedKernel.supports(spec, need)
    eager: AbstractKernel = FusedKernel(spec) if fused_why is None else AutogradKernel(spec)
    compiled_why = CompiledKernel.supports(spec, need)
    if compiled_why is None:
        return KernelChoice(CompiledKernel(spec, reads, eager))
    declined.append(("compiled", compiled_why))
    if fused_why is not None:
        declined.append(("fused", fused_why))
    return KernelChoice(eager, tuple(declined))
