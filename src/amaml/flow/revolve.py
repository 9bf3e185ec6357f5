"""Binomial checkpointing: :class:`Revolve`, at most ``snapshots + 1`` states whatever ``N``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor

from ..allocator import huge_pages
from .loop import FlowContext
from .memory import AbstractMemory

__all__ = ["Revolve"]


@dataclass(frozen=True)
class Revolve(AbstractMemory):
    """Binomial checkpointing: at most ``snapshots + 1`` states, whatever ``N``.

    The schedule of Griewank's *revolve*: with ``s`` snapshots, ``N`` steps are reversed
    with each step recomputed at most ``t`` times, where ``t`` is the smallest integer with
    ``C(s + t, s) >= N`` (20 snapshots: ``t = 2`` for 100 steps, 3 for 1000, 4 for 10000).
    Memory stays constant as ``N`` grows; time grows by the recomputations. Exact.

    The forward pass already places the schedule's first snapshots (the states the sweep's
    first descent would recompute; at most ``snapshots`` of them), so the sweep starts
    without re-running the forward pass: 0.79 N recomputed steps instead of 1.77 N at
    N = 100, 1.73 N instead of 2.72 N at N = 1000, 2.77 N at N = 10,000 (20 snapshots).
    Each split takes the fewest steps the snapshots allow (tested against the exhaustive
    minimum); until 2026-12-01 the split used one checkpoint too few in its binomial rule
    and took 1.84 N at N = 1000.

    Args:
        snapshots: States held besides the one being differentiated, >= 1.
        snapshots_in_forward: Keep the first snapshots from the forward pass (default).
            ``False`` holds only ``u_0`` between the forward and the backward pass (one
            state per task instead of up to ``snapshots + 1``, e.g. when many tasks' graphs
            wait for one ``backward``) at the price of about ``N`` more recomputed steps.
    """

    snapshots: int = 20
    snapshots_in_forward: bool = True
    name: str = field(default="revolve", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.snapshots, int) or isinstance(self.snapshots, bool) \
                or self.snapshots < 1:
            raise ValueError(f"Revolve(snapshots=...) must be an int >= 1; got "
                             f"{self.snapshots!r}.")
        if not isinstance(self.snapshots_in_forward, bool):
            raise TypeError(f"Revolve(snapshots_in_forward=...) must be a bool; got "
                            f"{self.snapshots_in_forward!r}.")

    @staticmethod
    def repetitions(snapshots: int, n_steps: int) -> int:
        """The smallest ``t`` with ``C(snapshots + t, snapshots) >= n_steps``."""
        t = 0
        while math.comb(snapshots + t, snapshots) < n_steps:
            t += 1
        return t

    @staticmethod
    def _split(a: int, b: int, free: int) -> int:
        """Where the schedule reversing steps ``a .. b-1`` with ``free`` snapshots places
        its next one (``b - a >= 2``, ``free >= 1``): a split that takes the fewest steps
        (Griewank's binomial rule with ``c = free + 1`` checkpoints, ``u_a`` counted: with
        ``beta(c, t) = C(c + t, c)`` and ``t`` the least with ``beta(c, t) >= l``, the
        optimal first segments are ``max(beta(c, t-2), l - beta(c-1, t)) .. min(beta(c,
        t-1), l - beta(c-1, t-1))`` steps long; checked against the exhaustive minimum)."""
        n, c = b - a, free + 1
        t = Revolve.repetitions(c, n)

        def beta(cc: int, tt: int) -> int:
            return math.comb(cc + tt, cc) if tt >= 0 else 0

        far = min(beta(c, t - 1), n - beta(c - 1, t - 1))
        return a + max(1, min(n - 1, far))

    def first_snapshots(self, n_steps: int) -> list[int]:
        """The steps whose states the schedule's first descent holds: what the forward pass
        keeps besides ``u_0`` (empty if ``snapshots_in_forward`` is false)."""
        if not self.snapshots_in_forward:
            return []
        where, a, free = [], 0, self.snapshots
        while n_steps - a > 1 and free > 0:
            a = self._split(a, n_steps, free)
            where.append(a)
            free -= 1
        return where

    def peak_states(self, n_steps: int) -> int:
        """The most states the sweep holds at once for ``n_steps`` steps (``u_0``, the
        snapshots not yet used, one per open recursion level, and a state recomputed where
        no snapshot is left): what :func:`amaml.explain`'s memory model counts. The schedule
        is walked without taking a step."""
        ready = len(self.first_snapshots(n_steps))
        peak = [1 + ready]

        def reverse(a: int, b: int, free: int, depth: int) -> None:
            nonlocal ready
            if b - a > 1 and free == 0:
                peak[0] = max(peak[0], 1 + depth + ready + 1)
                return
            if b - a == 1:
                return
            m = self._split(a, b, free)
            ready = max(0, ready - 1)  # the first descent takes the forward's snapshots
            peak[0] = max(peak[0], 1 + depth + 1 + ready)
            reverse(m, b, free - 1, depth + 1)
            reverse(a, m, free, depth)

        reverse(0, n_steps, self.snapshots, 0)
        return peak[0]

    def forward(self, flow: FlowContext) -> tuple[Tensor, Tensor]:
        where = self.first_snapshots(flow.n_steps)
        u0 = flow.initial_state()
        kept = u0.new_empty((1, *u0.shape))
        kept[0].copy_(u0)
        # The snapshots live in fixed slots, allocated once: each state the schedule holds
        # is copied into a free slot, and its slot is freed when the recursion level that
        # uses it returns. States allocated one by one as the schedule goes would leave
        # holes of a state's size in the heap that the next, differently sized
        # allocations only partly refill: the process grew to 1.5x the states the
        # schedule holds (the million-parameter MLP, N = 1000; issue 25).
        slots = _Slots(u0, min(self.snapshots, max(flow.n_steps - 1, 1)))
        ready: dict[int, int] = {}
        u, k = kept[0], 0
        for m in where:
            u, _ = flow.integrate(u, k, m)
            ready[m] = slots.take(u)
            u, k = slots.rows[ready[m]], m
        u_end, _ = flow.integrate(u, k, flow.n_steps)
        flow.carry["revolve_ready"] = (slots, ready)
        return u_end, kept

    def sweep(self, flow: FlowContext, kept: Tensor, lam: Tensor) -> Tensor:
        stats = flow.stats
        # The snapshots the forward pass placed, by step: used (once) by the first descent.
        # A second backward pass through the same result finds none and recomputes them.
        slots, ready = flow.carry.pop("revolve_ready", (None, {}))
        if slots is None:
            slots = _Slots(kept[0], min(self.snapshots, max(flow.n_steps - 1, 1)))
        held = [1]  # states alive now: u0 (the caller's), then one per open recursion level
        # The cotangent lives in one box, not in the recursion's frames: a frame that passed
        # ``lam`` down would otherwise keep that stale vector alive until it returns.
        box = [lam]

        def recompute(u: Tensor, start: int, stop: int) -> Tensor:
            if stop == start:
                return u
            stats.recomputed_steps += stop - start
            u_stop, _ = flow.integrate(u, start, stop)
            return u_stop

        def vjp(u: Tensor, k: int) -> None:
            box[0] = flow.vjp(u, box[0], k=k)

        def reverse(a: int, u_a: Tensor, b: int, free: int) -> None:
            # Reverse steps a .. b-1 holding u_a, with ``free`` more states allowed.
            while b - a > 1 and free == 0:  # no room: recompute each state from u_a
                held[0] += 1
                stats.peak_states = max(stats.peak_states, held[0])
                vjp(recompute(u_a, a, b - 1), b - 1)
                held[0] -= 1
                b -= 1
            if b - a == 1:
                vjp(u_a, a)
                return
            m = self._split(a, b, free)
            held[0] += 1
            stats.peak_states = max(stats.peak_states, held[0])
            slot = ready.pop(m) if m in ready else slots.take(recompute(u_a, a, m))
            reverse(m, slots.rows[slot], b, free - 1)
            slots.release(slot)  # u_m's slot is free again
            held[0] -= 1
            reverse(a, u_a, m, free)

        stats.peak_states = max(stats.peak_states, 1 + len(ready))
        del lam
        reverse(0, kept[0], flow.n_steps, self.snapshots)
        return box[0]


class _Slots:
    """``n`` states' room, allocated at once; :meth:`take` copies a state into a free slot
    and returns its index, :meth:`release` frees it."""

    def __init__(self, like: Tensor, n: int) -> None:
        # One tensor a slot, all allocated here: side by side in glibc's heap, and freed
        # together they leave one hole that the next call's slots fill. As one block they
        # passed glibc's mmap threshold (1 GiB) on large models and were mapped afresh,
        # and faulted in again, at every call (ResNet-18, N = 10: 17% to 25% system time).
        self.rows = [huge_pages(like.new_empty(like.shape)) for _ in range(n)]
        self.free = list(range(n - 1, -1, -1))

    def take(self, u: Tensor) -> int:
        i = self.free.pop()
        self.rows[i].copy_(u)
        return i

    def release(self, i: int) -> None:
        self.free.append(i)
