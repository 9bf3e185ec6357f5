"""The support set as :func:`amaml.adapt` reads it: ``(inputs, y)`` pairs and mini-batches.

``inputs`` is a tensor (``model(x)``), a tuple (``model(*inputs)``) or a dict
(``model(**inputs)``), as transformer models take them. A dict alone is a support set
whose targets are among the model's own inputs (HuggingFace's ``labels``): the model is
called as ``model(**support)`` and the loss as ``loss_fn(output)``. The support may also be a
mini-batch schedule: a callable ``k -> (inputs_k, y_k)`` giving step ``k``'s batch, called
again (deterministically) in the backward pass; :class:`MiniBatches` draws seeded
mini-batches of a larger set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._types import LearningRate, Scalar

__all__ = ["Inputs", "MiniBatches", "Packed", "call_args", "check_steps_lr", "check_support",
           "schedule"]

#: A model's inputs: a tensor, a tuple of tensors or a dict of tensors.
Inputs = Tensor | tuple[Tensor, ...] | Mapping[str, Tensor]


def call_args(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` with which the model is called on ``inputs``."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


@dataclass(frozen=True)
class Packed:
    """How ``(inputs, y)`` is laid out as the flat data tensors of the flow."""

    kind: str  # "tensor", "tuple" or "dict"
    keys: tuple[str, ...] = ()
    n: int = 1
    #: Whether a target tensor follows the inputs (a dict alone carries its own targets).
    targets: bool = True

    def flatten(self, inputs: Any, y: Tensor | None) -> tuple[Tensor, ...]:
        tail = (y,) if self.targets and y is not None else ()
        if self.kind == "dict":
            return (*(inputs[k] for k in self.keys), *tail)
        if self.kind == "tuple":
            return (*inputs, *tail)
        return (inputs, *tail)

    def unflatten(self, data: Sequence[Tensor]) -> tuple[Any, Tensor | None]:
        if not self.targets:
            return dict(zip(self.keys, data)), None
        xs, y = data[:-1], data[-1]
        if self.kind == "dict":
            return dict(zip(self.keys, xs)), y
        if self.kind == "tuple":
            return tuple(xs), y
        return xs[0], y


def _pack(inputs: Any, name: str) -> tuple[Packed, list[Tensor]]:
    if isinstance(inputs, Tensor):
        return Packed("tensor"), [inputs]
    if isinstance(inputs, Mapping):
        keys = tuple(inputs)
        values = [inputs[k] for k in keys]
        kind = Packed("dict", tuple(str(k) for k in keys), len(keys))
    elif isinstance(inputs, (tuple, list)):
        values = list(inputs)
        kind = Packed("tuple", (), len(values))
    else:
        raise TypeError(f"The support inputs {name} must be a tensor, a tuple or a dict of "
                        f"tensors; got {type(inputs).__name__}.")
    if not values or not all(isinstance(v, Tensor) for v in values):
        raise TypeError(f"The support inputs {name} must hold tensors (at least one); got "
                        f"{[type(v).__name__ for v in values]}.")
    return kind, values


def check_support(data: Any, batched: bool) -> tuple[Packed, tuple[Tensor, ...]]:
    """Validate ``(inputs, y)``; return its layout and its flat tensors ``(*inputs, y)``.

    Raises:
        TypeError: Not a pair, or not tensors.
        ValueError: Too few dimensions, mismatched task or example counts, an empty set, or
            NaN / infinite values.
    """
    name = "(xs, ys)" if batched else "(x, y)"
    if isinstance(data, Mapping):
        return _check_dict(data, batched)
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"The support set must be a pair {name} of tensors, a dict of the "
                        "model's keyword inputs holding the targets (e.g. HuggingFace's "
                        "'labels'), or a callable k -> either, a mini-batch schedule; got "
                        f"{type(data).__name__}.")
    inputs, y = data
    if not isinstance(y, Tensor):
        raise TypeError(f"The support set {name} must hold tensors; got "
                        f"{type(inputs).__name__}, {type(y).__name__}.")
    packed, xs = _pack(inputs, name)
    need = 2 if batched else 1
    for x in xs:
        if x.ndim < need or y.ndim < need:
            raise ValueError(f"Support tensors need at least {need} dimension(s)"
                             f"{' [B, n, ...]' if batched else ' [n, ...]'}; got x "
                             f"{tuple(x.shape)}, y {tuple(y.shape)}.")
        if batched and x.shape[0] != y.shape[0]:
            raise ValueError(f"xs and ys must have the same number of tasks; got xs "
                             f"{tuple(x.shape)} and ys {tuple(y.shape)}.")
        axis = 1 if batched else 0
        if x.shape[axis] != y.shape[axis]:
            raise ValueError(f"x and y must have the same number of examples; got x "
                             f"{tuple(x.shape)} and y {tuple(y.shape)}.")
        if x.shape[axis] == 0:
            raise ValueError("The support set is empty.")
    for nm, t in [*(("x", x) for x in xs), ("y", y)]:
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"The support {nm} contains NaN or infinite values.")
    return packed, packed.flatten(inputs if packed.kind != "tensor" else xs[0], y)


def _check_dict(data: Mapping[str, Any], batched: bool) -> tuple[Packed, tuple[Tensor, ...]]:
    """A support set given as the model's keyword inputs, targets among them."""
    packed, values = _pack(data, "dict")
    packed = Packed("dict", packed.keys, packed.n, targets=False)
    need = 2 if batched else 1
    axis = 1 if batched else 0
    for k, v in zip(packed.keys, values):
        if v.ndim < need:
            raise ValueError(f"The support entry {k!r} needs at least {need} dimension(s)"
                             f"{' [B, n, ...]' if batched else ' [n, ...]'}; got "
                             f"{tuple(v.shape)}.")
    lead = {k: tuple(v.shape[:axis + 1]) for k, v in zip(packed.keys, values)}
    if len(set(lead.values())) != 1:
        raise ValueError(f"The support entries must share their leading "
                         f"{'task and example' if batched else 'example'} dimensions; got "
                         f"{lead}.")
    if values[0].shape[axis] == 0:
        raise ValueError("The support set is empty.")
    for k, v in zip(packed.keys, values):
        if v.is_floating_point() and not bool(torch.isfinite(v.detach()).all()):
            raise ValueError(f"The support entry {k!r} contains NaN or infinite values.")
    return packed, tuple(values)


@dataclass(frozen=True)
class MiniBatches:
    """Seeded mini-batches of a support set: a schedule ``k -> (x_k, y_k)`` for ``adapt``.

    Step ``k`` reads the ``(k mod m)``-th batch of epoch ``k // m`` (``m = n // batch_size``
    batches an epoch; the last partial batch is dropped), each epoch a fresh permutation
    drawn from ``seed`` and the epoch number, so the schedule is the same every time it is
    asked (the adjoint's backward pass asks again). With ``batched=True`` the examples are
    on dimension 1 (``[B, n, ...]``) and every task uses the same indices.

    ``x`` may require grad (dataset distillation): each batch is an indexing of it, and its
    meta-gradient sums over the steps that read each example.

    Args:
        x: Inputs ``[n, ...]`` (or a tuple / dict of such tensors).
        y: Targets ``[n, ...]``, or ``None`` when ``x`` is a dict that holds the targets
            among the model's inputs (HuggingFace's ``labels``): each batch is then that
            dict, and the loss ``loss_fn(output)``.
        batch_size: Examples a step, ``1 <= batch_size <= n``.
        seed: The schedule's seed.
        batched: Examples on dimension 1, for :func:`amaml.adapt_batch`.

    Example:
        >>> import torch, amaml
        >>> net = torch.nn.Linear(2, 1)
        >>> x, y = torch.randn(64, 2), torch.randn(64, 1)
        >>> p = amaml.adapt(net, torch.nn.functional.mse_loss,
        ...                 amaml.MiniBatches(x, y, batch_size=16, seed=0), steps=10, lr=0.1)
    """

    x: Inputs
    y: Tensor | None
    batch_size: int
    seed: int = 0
    batched: bool = False
    _perms: dict[int, Tensor] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.y is None and not isinstance(self.x, Mapping):
            raise TypeError("MiniBatches(x, None, ...) needs x to be a dict of the model's "
                            "keyword inputs that holds the targets (e.g. 'labels'); give y "
                            "otherwise.")
        packed, flat = check_support(self.x if self.y is None else (self.x, self.y),
                                     self.batched)
        n = flat[-1].shape[1 if self.batched else 0]
        if (not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool)
                or not 1 <= self.batch_size <= n):
            raise ValueError(f"MiniBatches(batch_size=...) must be an int in [1, {n}] (the "
                             f"support set's size); got {self.batch_size!r}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"MiniBatches(seed=...) must be an int; got {self.seed!r}.")

    @property
    def n(self) -> int:
        """Examples in the whole set."""
        ref = self.y if self.y is not None else next(iter(self._dict().values()))
        return int(ref.shape[1 if self.batched else 0])

    def _dict(self) -> Mapping[str, Tensor]:
        assert isinstance(self.x, Mapping)  # checked in __post_init__
        return self.x

    @property
    def per_epoch(self) -> int:
        """Batches an epoch."""
        return self.n // self.batch_size

    def indices(self, k: int) -> Tensor:
        """The example indices of step ``k``."""
        epoch, j = divmod(k, self.per_epoch)
        perm = self._perms.get(epoch)
        if perm is None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=gen)
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = perm
        idx = perm[j * self.batch_size:(j + 1) * self.batch_size]
        ref = self.y if self.y is not None else next(iter(self._dict().values()))
        return idx.to(ref.device)

    def __call__(self, k: int) -> Any:
        idx = self.indices(k)
        dim = 1 if self.batched else 0

        def take(t: Tensor) -> Tensor:
            return t.index_select(dim, idx)

        x = self.x
        if isinstance(x, Mapping):
            xk: Any = {n: take(v) for n, v in x.items()}
        elif isinstance(x, (tuple, list)):
            xk = tuple(take(v) for v in x)
        else:
            xk = take(x)
        return xk if self.y is None else (xk, take(self.y))


def schedule(support: Callable[[int], Any], batched: bool
             ) -> tuple[Packed, tuple[Tensor, ...], Callable[[int], tuple[Tensor, ...]]]:
    """A mini-batch schedule's layout, its first batch's flat tensors, and ``k -> flat
    tensors of step k`` (each batch checked to have the first one's layout)."""
    packed, first = check_support(support(0), batched)

    def batches(k: int) -> tuple[Tensor, ...]:
        # Called at every step, forward and backward: the layout is checked, the values
        # (NaN, shapes) only for the first batch, which the flow's own checks follow.
        data = support(k)
        if not packed.targets:
            if not isinstance(data, Mapping) or tuple(data) != packed.keys:
                raise ValueError(f"The mini-batch of step {k} is not a dict with the first "
                                 f"one's keys {list(packed.keys)}.")
            return tuple(data[key] for key in packed.keys)
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            raise TypeError(f"The mini-batch schedule must return a pair (inputs, y); step "
                            f"{k} gave {type(data).__name__}.")
        p, flat = _pack(data[0], "(x, y)")
        if p != packed or not isinstance(data[1], Tensor):
            raise ValueError(f"The mini-batch of step {k} has another layout ({p.kind}) "
                             f"than the first ({packed.kind}).")
        return (*flat, data[1])

    return packed, first, batches


def check_steps_lr(steps: Any, lr: LearningRate, proximal: Scalar) -> None:
    """The inner loop's length, rates and proximal weight, checked: ``ValueError`` naming
    the argument."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}.")
    values = lr.values() if isinstance(lr, Mapping) else [lr]
    for v in values:
        ok = bool((v > 0).all()) if isinstance(v, Tensor) else float(v) > 0
        if not ok:
            raise ValueError(f"lr must be > 0; got {v!r}.")
    p = float(proximal.detach()) if isinstance(proximal, Tensor) else float(proximal)
    if not p >= 0:
        raise ValueError(f"proximal must be >= 0; got {proximal!r}.")
