"""A module's trainable parameters as one flat vector, and the learning rates that match it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ._types import LearningRate, Params

__all__ = ["FlatModel"]


class FlatModel:
    """Flat-vector view of a module's trainable parameters."""

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no parameters that require grad: nothing to adapt "
                             "(amaml adapts the parameters that require grad, frozen ones pass "
                             "through). To adapt a network whose own meta-gradient you do not "
                             "need (e.g. dataset distillation), leave requires_grad on and "
                             "ignore or clear its .grad.")
        self.model = model
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise TypeError(f"All trainable parameters must share one dtype; got {dtypes}.")

    def theta(self) -> Tensor:
        return torch.cat([p.reshape(-1) for p in self.params])

    def unflatten(self, u: Tensor) -> Params:
        lead = u.shape[:-1]
        return {n: t.reshape(*lead, *s) for n, t, s in zip(self.names, u.split(self.sizes, -1),
                                                          self.shapes)}

    def flat_lr(self, lr: LearningRate, like: Tensor, steps: int) -> tuple[Tensor, bool]:
        """``lr`` as the flow's ``dt`` and whether it is a per-step schedule.

        A scalar (0-d); a ``(steps,)`` tensor (one rate a step); a dict of per-parameter
        rates broadcastable to each parameter (``(P,)``), where a value with one more
        dimension than its parameter and ``steps`` rows is a per-step rate of that
        parameter (then every value is expanded to ``(steps, P)``).
        """
        if isinstance(lr, Mapping):
            missing = [n for n in self.names if n not in lr]
            extra = [n for n in lr if n not in self.names]
            if missing or extra:
                raise ValueError(f"lr as a dict needs exactly the trainable parameter names; "
                                 f"missing {missing}, unknown {extra}.")
            values = {n: (v if isinstance(v, Tensor) else torch.tensor(float(v), dtype=like.dtype)
                          ).to(like.dtype).to(like.device) for n, v in lr.items()}
            per_step = any(values[n].ndim == len(s) + 1 and values[n].shape[0] == steps
                           for n, s in zip(self.names, self.shapes))
            parts = []
            for n, shape in zip(self.names, self.shapes):
                t = values[n]
                rows = t.ndim == len(shape) + 1 and t.shape[0] == steps
                target = (steps, *shape) if per_step else tuple(shape)
                try:
                    t = t.expand(target) if rows or not per_step else t.expand(*shape).expand(
                        steps, *shape)
                except RuntimeError as err:
                    raise ValueError(f"lr[{n!r}] of shape {tuple(t.shape)} does not broadcast "
                                     f"to the parameter's shape {tuple(shape)}"
                                     f"{f' (or ({steps}, *shape) per step)' if per_step else ''}"
                                     ".") from err
                parts.append(t.reshape(steps, -1) if per_step else t.reshape(-1))
            return torch.cat(parts, dim=-1), per_step
        t = lr if isinstance(lr, Tensor) else torch.tensor(float(lr), dtype=like.dtype)
        if t.ndim == 1 and t.shape[0] == steps:
            return t.to(like.dtype).to(like.device), True
        if t.ndim != 0:
            raise ValueError("lr as a tensor must be a scalar or a per-step schedule of shape "
                             f"({steps},); give a dict of per-parameter tensors for Meta-SGD "
                             f"style rates (got shape {tuple(t.shape)}).")
        return t.to(like.dtype).to(like.device), False

    def check_like(self, data: Sequence[Tensor], keys: Sequence[str] = ()) -> None:
        """Floating-point support tensors in the parameters' dtype and on their device
        (``keys``: the names of a dict support's entries, for messages).

        Raises:
            TypeError: A floating-point tensor of another dtype.
            ValueError: A tensor on another device.
        """
        p = self.params[0]
        names = [repr(k) for k in keys] or [
            *(f"inputs[{i}]" for i in range(len(data) - 1)), "targets"]
        if len(names) != len(data):
            names = [f"tensor {i}" for i in range(len(data))]
        for name, d in zip(names, data):
            if d.device != p.device:
                raise ValueError(f"The support {name} is on {d.device} but the model's "
                                 f"parameters are on {p.device}; move one of them "
                                 "(model.to(device) or x.to(device)).")
            if d.is_floating_point() and d.dtype != p.dtype:
                raise TypeError(f"The support {name} has dtype {d.dtype} but the model's "
                                f"parameters have dtype {p.dtype}; convert one of them "
                                f"(model.to({d.dtype}) or x.to({p.dtype})).")
