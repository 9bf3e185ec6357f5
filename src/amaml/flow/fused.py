"""Losses that compute their own derivatives: :class:`AbstractFusedLoss`.

On the small models of meta-learning every autograd op is dispatch-bound: a Hessian-vector
product by double backward through ``torch.func.functional_call`` costs about three
gradients, mostly in graph construction, module traversal and tiny view ops (profiles in
``benchmarks/README.md``). A loss that knows its own structure can do without: an
:class:`AbstractFusedLoss` gives the gradient ``g(u)`` and the Hessian-vector product
``H(u) v`` directly, and the fused kernel (:mod:`amaml.flow.kernels.fused`) then takes each
step, and transposes it, without autograd. :class:`amaml.mlp.MLPLoss`, the multilayer
perceptron that :func:`amaml.adapt` recognises by itself, is one.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

__all__ = ["AbstractFusedLoss"]


class AbstractFusedLoss(abc.ABC):
    """A flat loss ``loss(u, *data) -> scalar`` that also gives its exact derivatives.

    Calling it is the loss of one task (``u`` of shape ``(P,)``), differentiable by autograd
    as any :data:`~amaml._types.FlatLoss`: the unrolled, backsolve, implicit and compiled
    paths use that. :meth:`grad` and :meth:`grad_hvp` work without autograd graphs on one
    task (``u`` ``(P,)``) or a batch (``u`` ``(B, P)``, data with a leading ``B``), where the
    loss of a batch is the sum of its tasks' losses.
    """

    @abc.abstractmethod
    def __call__(self, u: Tensor, *data: Tensor) -> Tensor:
        """The loss of one task at flat parameters ``u`` ``(P,)``."""

    @abc.abstractmethod
    def grad(self, u: Tensor, data: Sequence[Tensor], tape: list[Any] | None = None) -> Tensor:
        """``g(u)``, the gradient (per task when batched), without a graph.

        With ``tape`` (a list), also appends what a later :meth:`grad_hvp` at the same
        ``u`` and data can reuse instead of recomputing it (a loss may append ``None``).
        """

    @abc.abstractmethod
    def grad_hvp(self, u: Tensor, v: Tensor, data: Sequence[Tensor],
                 with_grad: bool = True, tape: Any = None) -> tuple[Tensor | None, Tensor]:
        """``(g(u), H(u) v)`` (per task when batched), without a graph; ``g`` is ``None``
        unless ``with_grad``. ``tape``: what :meth:`grad` appended at this ``u`` (or
        ``None``); the result is the same, bit for bit, with or without it."""

    def tape_numel(self, data: Sequence[Tensor]) -> int:
        """Numbers one tape entry of :meth:`grad` holds besides ``g`` (0: tapes unused)."""
        return 0

    def grad_flops(self, data: Sequence[Tensor]) -> int:
        """Floating-point operations of one :meth:`grad`, per task (``data`` as :meth:`grad`
        gets it, with a leading task dimension when batched): what a tape saves a step VJP
        from doing again. 0: not known (``memory="auto"`` then keeps tapes only while they
        are few)."""
        return 0

    def hvp_input(self, u: Tensor, v: Tensor, data: Sequence[Tensor],
                  tape: Any = None) -> tuple[Tensor, Tensor]:
        """``(H(u) v, d/dx (g(u; x) . v))`` for the first data tensor ``x``; losses that
        cannot give the mixed derivative raise ``NotImplementedError`` (the flow then
        differentiates with autograd: :attr:`input_grad` says which)."""
        raise NotImplementedError

    #: Whether :meth:`hvp_input` is implemented.
    input_grad: bool = False

    #: Whether the loss reads no tensor besides ``u`` and the data and draws no random
    #: numbers (then nothing is searched for captured meta-parameters or watched).
    reads_only_data: bool = False

    def cache_key(self) -> Any:
        """A hashable key of everything the loss computes besides its tensors (compiled
        kernels are shared between losses with equal keys), or ``None``."""
        return None

    def head(self, u: Tensor, data: Sequence[Tensor]
             ) -> tuple[Tensor, Callable[[Tensor, Sequence[Tensor]], Tensor]] | None:
        """``(prediction, f)`` with ``f(prediction, data[1:])`` the summed support loss, when
        the loss is a fixed network followed by ``f`` (so that what it reads besides ``u``
        and the data is what ``f`` reads); ``None`` otherwise."""
        return None
