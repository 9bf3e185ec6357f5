"""Type aliases shared across amaml."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor

__all__ = ["Params", "LossFn", "FlatLoss", "Batch", "LearningRate", "Scalar"]

#: Parameters by name, as returned by ``model.named_parameters()``.
Params = dict[str, Tensor]
#: ``loss_fn(prediction, target) -> scalar tensor``.
LossFn = Callable[[Tensor, Tensor], Tensor]
#: ``loss(u, *data) -> scalar tensor`` on a flat parameter vector ``u`` of shape ``(P,)``.
FlatLoss = Callable[..., Tensor]
#: A support or query set ``(x, y)``.
Batch = tuple[Tensor, Tensor]
#: A scalar learning rate, a tensor (scalar or ``(P,)``), or per-parameter tensors by name.
LearningRate = float | Tensor | Mapping[str, float | Tensor]
#: A float or a 0-d tensor.
Scalar = float | Tensor
