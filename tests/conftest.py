"""Shared fixtures: float64, one thread, seeded."""

from __future__ import annotations

import pytest
import torch

# One thread: on these shared 2-core machines two threads can be far slower, and
# results are then independent of the thread count.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
