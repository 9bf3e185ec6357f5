"""Revolve's schedule takes the fewest steps its snapshots allow: its recomputations equal
the exhaustive minimum, and the forward pass's snapshots save the first descent."""

from __future__ import annotations

import functools

import pytest
import torch

from amaml.flow import Revolve, SweepStats


@functools.cache
def fewest(n: int, free: int) -> int:
    """The fewest steps that reverse ``n`` steps holding their first state and ``free``
    more (each VJP takes the state its step starts from): exhaustive over the splits."""
    if n == 1:
        return 0
    if free == 0:
        return n * (n - 1) // 2
    return min(m + fewest(n - m, free - 1) + fewest(m, free) for m in range(1, n))


class _Counting:
    """The flow interface a strategy uses, counting steps and checking the VJPs' order."""

    def __init__(self, n: int) -> None:
        self.n_steps, self.stats, self.order = n, SweepStats(), []
        self.carry = {}  # where Revolve leaves its snapshots

    def initial_state(self):
        return torch.tensor(0.0)

    def integrate(self, u, start=0, stop=None, **_):
        stop = self.n_steps if stop is None else stop
        assert int(u) == start  # the state of step ``start``
        return torch.tensor(float(stop)), []

    def vjp(self, u, lam, tape=None, k=None):
        assert int(u) == k
        self.order.append(k)
        return lam


@pytest.mark.parametrize("snapshots", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [2, 7, 20, 57, 120])
def test_revolve_recomputes_the_fewest_steps(snapshots: int, n: int) -> None:
    for in_forward in (False, True):
        memory = Revolve(snapshots, snapshots_in_forward=in_forward)
        flow = _Counting(n)
        _, kept = memory.forward(flow)
        memory.sweep(flow, kept, torch.tensor(1.0))
        assert flow.order == list(range(n - 1, -1, -1))
        first_descent = max(memory.first_snapshots(n), default=0)
        expected = fewest(n, snapshots) - (first_descent if in_forward else 0)
        assert flow.stats.recomputed_steps == expected
        # u_0 and the snapshots, and the state being differentiated
        assert flow.stats.peak_states <= snapshots + 2
        # what explain's memory model counts, from the schedule alone
        assert memory.peak_states(n) == flow.stats.peak_states
