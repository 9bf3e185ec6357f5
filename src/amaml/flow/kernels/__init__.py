"""Kernels: what takes a step and transposes it (see :mod:`.base`): :mod:`.autograd`,
:mod:`.fused`, :mod:`.compiled`; :func:`select_kernel` picks one per flow."""

from __future__ import annotations

from .autograd import AutogradKernel
from .base import AbstractKernel, KernelChoice
from .compiled import COMPILE_MODES, CompiledKernel, compile_mode
from .fused import FusedKernel
from .select import select_kernel

__all__ = ["COMPILE_MODES", "AbstractKernel", "AutogradKernel", "CompiledKernel", "FusedKernel",
           "KernelChoice", "compile_mode", "select_kernel"]
