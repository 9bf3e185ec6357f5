"""What step ``k`` reads besides its state: one bundle, :class:`Reads`, and its cotangents.

A step ``z_{k+1} = Phi_k(z_k; reads)`` reads ``theta`` (through the proximal term), the
learning rate (a scalar, per parameter, or per step: a shape, not a flag), the proximal
weight ``mu``, the support data (fixed, or a mini-batch schedule ``k -> batch``), the
optimiser's hyperparameters given as tensors, the tensors the loss captures, and, for a
random loss, each step's random state. :meth:`Reads.at` gives step ``k``'s view.

The tensors are flattened once, in one order, for the autograd Function:
``[theta, lr, mu, *data, *hyper, *captured]`` (:meth:`Reads.tensors`); which of them need a
gradient is a tuple of bools in that order, and the cotangents come back as a list in that
order (``None`` where not needed): no names, no slot arithmetic elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import NamedTuple

import torch
from torch import Tensor

from .capture import replay_rng, rng_states

__all__ = ["Batches", "Hyper", "Reads", "RngLog", "StepReads"]

Hyper = float | Tensor
#: Mini-batch schedule: ``k -> data tensors of step k`` (deterministic).
Batches = Callable[[int], Sequence[Tensor]]
#: Each step's random states, recorded when the step is first taken (random losses).
RngLog = dict[int, list[Tensor]]

THETA, LR, MU, FIRST_DATA = 0, 1, 2, 3


class StepReads(NamedTuple):
    """Step ``k``'s view of :class:`Reads`: what one step's arithmetic uses (a named tuple:
    compiled steps build one)."""

    theta: Tensor
    lr: Tensor
    mu: Tensor | None
    data: Sequence[Tensor]
    hyper: Mapping[str, Hyper]


@dataclass(frozen=True)
class Reads:
    """Everything the steps read besides the state (see the module).

    Attributes:
        theta: Meta-parameters ``(P,)``.
        lr: Learning rate: 0-d, ``(P,)``, or per step ``(N,)`` / ``(N, P)`` (``per_step``).
        mu: Proximal weight (0-d), ``None`` without proximal term.
        data: The support data (empty with a schedule).
        hyper: The optimiser's hyperparameters given as tensors, named by ``hyper_names``.
        captured: Tensors the loss reads that require grad (loss weights, a schedule's data).
        hyper_names: Names of ``hyper``; ``static``: the hyperparameters given as floats.
        per_step: ``lr`` has a leading step dimension.
        batches: ``k -> data of step k``, or ``None`` (every step reads ``data``).
        rng: The random states of a random loss's steps (recorded, then replayed), or
            ``None`` for a deterministic loss.
    """

    theta: Tensor
    lr: Tensor
    mu: Tensor | None
    data: tuple[Tensor, ...] = ()
    hyper: tuple[Tensor, ...] = ()
    captured: tuple[Tensor, ...] = ()
    hyper_names: tuple[str, ...] = ()
    static: tuple[tuple[str, Hyper], ...] = ()
    per_step: bool = False
    batches: Batches | None = None
    rng: RngLog | None = field(default=None, compare=False)
    #: Leaves by need, made once where nothing varies by step (:meth:`leaves`).
    _leaves: dict[tuple[bool, ...], Reads] = field(default_factory=dict, init=False,
                                                   compare=False, repr=False)

    def tensors(self) -> list[Tensor | None]:
        """``[theta, lr, mu, *data, *hyper, *captured]``: the autograd Function's inputs."""
        return [self.theta, self.lr, self.mu, *self.data, *self.hyper, *self.captured]

    def with_tensors(self, tensors: Sequence[Tensor | None]) -> Reads:
        """The same reads with the tensors of :meth:`tensors` replaced, in that order."""
        nd, nh = len(self.data), len(self.hyper)
        t = list(tensors)
        theta, lr = t[THETA], t[LR]
        assert theta is not None and lr is not None
        rest = t[FIRST_DATA:]
        return replace(self, theta=theta, lr=lr, mu=t[MU], data=tuple(rest[:nd]),  # type: ignore[arg-type]
                       hyper=tuple(rest[nd:nd + nh]), captured=tuple(rest[nd + nh:]))  # type: ignore[arg-type]

    def leaves(self, need: Sequence[bool], k: int) -> Reads:
        """Step ``k``'s reads as leaves: detached copies requiring grad where ``need`` says
        (``theta`` only with a proximal term, through which alone it enters a step; a
        per-step rate's row ``k``, so that its cotangent is that row's); captured tensors
        as they are (the loss reads them itself). Made once for all steps where nothing
        varies by step (each step's VJP builds its own graph from the same leaves)."""
        fixed = not self.per_step and self.batches is None
        key = tuple(need)
        if fixed and key in self._leaves:
            return self._leaves[key]
        out: list[Tensor | None] = []
        n_own = FIRST_DATA + len(self.data) + len(self.hyper)
        for i, (t, n) in enumerate(zip(self.tensors(), need)):
            if t is None or i >= n_own:
                out.append(t)
                continue
            if i == LR and self.per_step:
                t = t[k]
            out.append(t.detach().requires_grad_(n and (i != THETA or self.mu is not None)))
        leaves = replace(self.with_tensors(out), per_step=False)
        if fixed:
            self._leaves[key] = leaves
        return leaves

    def detached(self) -> Reads:
        """Detached copies (captured tensors as they are): the reads of a step taken without
        a graph."""
        return self.with_tensors([t if t is None or i >= FIRST_DATA + len(self.data)
                                  + len(self.hyper) else t.detach()
                                  for i, t in enumerate(self.tensors())])

    @cached_property
    def hyperparameters(self) -> dict[str, Hyper]:
        """The optimiser's hyperparameters by name (floats and tensors), made once."""
        h: dict[str, Hyper] = dict(self.static)
        h.update(zip(self.hyper_names, self.hyper))
        return h

    @cached_property
    def _fixed(self) -> StepReads:
        return StepReads(self.theta, self.lr, self.mu, self.data, self.hyperparameters)

    def at(self, k: int) -> StepReads:
        """Step ``k``'s view (the same object at every step when nothing varies by step)."""
        if not self.per_step and self.batches is None:
            return self._fixed
        lr = self.lr[k] if self.per_step else self.lr
        data = self.data if self.batches is None else tuple(self.batches(k))
        return StepReads(self.theta, lr, self.mu, data, self.hyperparameters)

    def wanted(self, need: Sequence[bool]) -> Iterator[tuple[int, Tensor]]:
        """``(index, tensor)`` of the tensors whose cotangent a step VJP computes: needed and
        requiring grad (a leaf of :meth:`leaves`)."""
        for i, (t, n) in enumerate(zip(self.tensors(), need)):
            if n and t is not None and t.requires_grad:
                yield i, t

    def random_step(self, k: int, device: torch.device) -> AbstractContextManager[None]:
        """Step ``k``'s random state: recorded the first time (the forward pass draws as a
        plain loop would), replayed afterwards (recomputations and VJPs draw the same
        masks). Nothing for a deterministic loss."""
        if self.rng is None:
            return nullcontext()
        if k in self.rng:
            return replay_rng(device, self.rng[k])
        self.rng[k] = rng_states(device)
        return nullcontext()
