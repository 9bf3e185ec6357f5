"""Which models take the fused MLP path (:mod:`amaml.flow.fused`), and why the others do not."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from ._types import LossFn
from .flow.fused import Layer, MLPLoss

__all__ = ["fused_loss"]


class _Flat(Protocol):
    """The part of ``api._FlatModel`` this module reads."""

    model: nn.Module
    frozen: dict[str, Tensor]
    params: list[Tensor]
    sizes: list[int]


_ACTIVATION_KINDS: dict[type[nn.Module], str] = {nn.Tanh: "tanh", nn.ReLU: "relu",
                                                 nn.Sigmoid: "sigmoid", nn.Identity: "identity"}


def _has_hooks(module: nn.Module) -> bool:
    return any(bool(getattr(module, name, None)) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
        "_state_dict_hooks", "_load_state_dict_pre_hooks"))


def _global_hooks() -> bool:
    from torch.nn.modules import module as _module
    return any(bool(getattr(_module, name, None)) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def fused_loss(flat: _Flat, loss_fn: LossFn, x: Tensor, batched: bool) -> MLPLoss | None:
    """The fused MLP loss (:class:`~amaml.flow.fused.MLPLoss`) when ``flat.model`` is a plain
    perceptron that it computes exactly as the module does; ``None`` otherwise.

    Plain means: exactly ``nn.Sequential`` (not a subclass, which may override ``forward``)
    of distinct ``nn.Linear`` and ``nn.Tanh`` / ``nn.ReLU`` / ``nn.Sigmoid`` /
    ``nn.Identity`` modules (exact types: parametrised or subclassed layers are not), no
    hooks, no buffers, every parameter trainable, inputs ``[n, features]`` (``[B, n,
    features]`` batched) of the parameters' dtype and device. Everything else, BatchNorm
    included, takes the generic path.
    """
    model = flat.model
    if type(model) is not nn.Sequential or flat.frozen or _has_hooks(model) or _global_hooks():
        return None
    children = list(model._modules.values())  # children() would hide a repeated layer
    if (len({id(m) for m in children}) != len(children) or any(m is None for m in children)
            or any(True for _ in model.buffers())):
        return None
    layers: list[Layer] = []
    for m in children:
        if _has_hooks(m):
            return None
        if type(m) is nn.Linear:
            layers.append(Layer("linear", m.in_features, m.out_features, m.bias is not None))
        elif type(m) in _ACTIVATION_KINDS:
            layers.append(Layer(_ACTIVATION_KINDS[type(m)]))
        else:
            return None
    linear = [lay for lay in layers if lay.kind == "linear"]
    p0 = flat.params[0]
    if (not linear or x.ndim != (3 if batched else 2) or x.dtype != p0.dtype
            or x.device != p0.device or x.shape[-1] != linear[0].in_features):
        return None
    fused = MLPLoss(layers, loss_fn)
    return fused if fused.n_params == sum(flat.sizes) else None
