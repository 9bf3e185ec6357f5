"""What a step reads besides its tensors, fixed when the inner loop runs.

The backward pass of the discrete adjoint evaluates the steps again (the sweep, the
recomputed segments of checkpoint and revolve, Budget's tapes), after the caller has had
the chance to change the world: switch a module to eval mode for the query, update a
buffer, scale a loss weight in place. The meta-gradient must stay that of the inner loop
that ran, or be refused. Two objects hold that promise:

- :class:`StepScope`: a context every evaluation of the steps runs in, forward and
  backward. :mod:`amaml.api` makes one that puts every submodule's ``training`` flag back
  as it was when ``adapt`` ran and evaluates attention with a kernel that has a double
  backward (torch's fused scaled-dot-product kernels have none).
- :class:`Watched`: the tensors the steps read that are neither differentiated nor passed
  to the autograd Function (buffers, constants a loss closure captures), with their
  version counters when the inner loop ran. The backward pass refuses to run when one has
  changed in place, as autograd refuses for the tensors it saves.

:func:`read_tensors` finds the tensors one evaluation of the loss reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["StepScope", "Watched", "read_tensors"]


def _no_scope() -> AbstractContextManager[None]:
    return nullcontext()


@dataclass(frozen=True)
class StepScope:
    """A context every evaluation of the inner steps runs in, and names for messages.

    Attributes:
        enter: Makes the context (called once per forward pass and once per backward
            pass, not per step).
        names: A name for a tensor the steps may read, by the address of its storage
            (e.g. ``"buffer 'bn.running_mean'"``), used when a change is refused.
        notes: Lines :func:`amaml.explain` prints about the scope.
    """

    enter: Callable[[], AbstractContextManager[None]] = _no_scope
    names: Mapping[int, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __call__(self) -> AbstractContextManager[None]:
        return self.enter()

    def name(self, t: Tensor) -> str:
        """What to call ``t`` in a message."""
        known = self.names.get(_address(t))
        return known or f"a tensor of shape {tuple(t.shape)} that the loss reads"


def _address(t: Tensor) -> int:
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # no storage (a functorch wrapper, meta)
        return id(t)


def _fingerprint(t: Tensor) -> tuple[float, float]:
    """Two sums of ``t``'s values, plain and weighted by position, in float64: a change
    that leaves both equal is not met by chance. (Some in-place writes leave the version
    counter as it was: BatchNorm's update of its running statistics does.)"""
    with torch.no_grad():
        flat = t.detach().reshape(-1).to(torch.float64)
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        return float(flat.sum()), float((flat * weights.reciprocal_()).sum())


@dataclass(frozen=True)
class Watched:
    """Tensors the steps read, with their version counters and values when the loop ran."""

    tensors: tuple[Tensor, ...] = ()
    versions: tuple[int, ...] = ()
    prints: tuple[tuple[float, float], ...] = ()

    @staticmethod
    def of(tensors: Sequence[Tensor]) -> Watched:
        return Watched(tuple(tensors), tuple(t._version for t in tensors),
                       tuple(_fingerprint(t) for t in tensors))

    def check(self, scope: StepScope) -> None:
        """Refuse a backward pass after one of the tensors changed in place.

        Raises:
            RuntimeError: Naming the tensor.
        """
        for t, v, fp in zip(self.tensors, self.versions, self.prints):
            if t._version != v or _fingerprint(t) != fp:
                raise RuntimeError(
                    f"{scope.name(t)} was modified in place after the inner loop ran (version "
                    f"{v} then, {t._version} now): the meta-gradient needs the values the "
                    "inner loop read, as autograd does for the tensors it saves. Change it "
                    "before adapt, or out of place (w = w * 3), or call adapt again.")


class _Reads(TorchFunctionMode):
    """Records the tensors the operations read that no earlier operation made.

    A torch-function mode (not a dispatch mode, whose first use imports torch._dynamo: 1.5
    s on a CPU): every torch function and tensor method a loss calls passes through it."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__()
        self.made: set[int] = set()
        self.skip = skip
        self.read: dict[int, Tensor] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for t in _tensors((args, kwargs)):
            a = _address(t)
            if a not in self.made and a not in self.skip and a != 0:
                self.read.setdefault(a, t)
        out = func(*args, **kwargs)
        for t in _tensors(out):
            a = _address(t)
            if a not in self.read:
                self.made.add(a)
        return out


def _tensors(tree: Any) -> Iterator[Tensor]:
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for x in tree:
            yield from _tensors(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _tensors(x)


def read_tensors(fn: Callable[..., Any], u: Tensor, data: Sequence[Tensor]) -> list[Tensor]:
    """The tensors one call ``fn(u, *data)`` reads besides ``u`` and ``data``: those an
    operation takes as input that no earlier operation of the call made (buffers, frozen
    parameters, constants a closure captures). Views of ``u`` and ``data`` are skipped by
    storage. The call builds no graph (what a loss saves for its backward would outlive
    it in the caches of some losses), and its random state is put back afterwards."""
    skip = {_address(u), *(_address(d) for d in data)}
    mode = _Reads(skip)
    with torch.random.fork_rng(devices=[u.device] if u.device.type == "cuda" else []), \
            torch.no_grad(), mode:
        fn(u.detach(), *(d.detach() for d in data))
    return [t for t in mode.read.values() if t.numel() > 0]
