"""Shared pieces of the benchmark scripts: the paper's workload, timers, peak memory.

Not part of the package. The scripts in this folder import it as a sibling module
(``python benchmarks/bench_*.py`` puts this folder first on ``sys.path``).

The workload is the paper's synthetic meta-regression: CosMixture tasks on
``[-1, 1]^2``, ``y = -c sum_i cos(w pi x_i + phi) - sum_i x_i^2`` with
``c ~ U[0.1, 1]``, ``phi ~ U[0.5, 2]``, ``w ~ U[3, 6]`` (the authors' code), targets
standardised with pooled statistics, and an MLP 2-32-32-1 with tanh. It is generated
here, seeded, so that timings do not depend on the task package.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from amaml.experiments.memory import PeakMemory as _PeakMemory

__all__ = [
    "Workload",
    "make_workload",
    "make_mlp",
    "PeakMemory",
    "machine_info",
    "sync",
    "timed",
]


def make_mlp(hidden: int = 32, depth: int = 2, in_dim: int = 2) -> nn.Module:
    """The paper's MLP: ``in_dim -> hidden -> ... -> 1`` with tanh (1,185 parameters)."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


@dataclass
class Workload:
    """A meta-batch of tasks: support ``(xs, ys)`` and query ``(xq, yq)``, ``[B, n, .]``."""

    model: nn.Module
    xs: Tensor
    ys: Tensor
    xq: Tensor
    yq: Tensor

    @property
    def n_tasks(self) -> int:
        return self.xs.shape[0]


def _cosmixture(n_tasks: int, n_points: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    c = torch.empty(n_tasks, 1).uniform_(0.1, 1.0, generator=gen)
    phi = torch.empty(n_tasks, 1, 1).uniform_(0.5, 2.0, generator=gen)
    w = torch.empty(n_tasks, 1, 1).uniform_(3.0, 6.0, generator=gen)
    x = torch.rand(n_tasks, n_points, 2, generator=gen, dtype=torch.float64) * 2 - 1
    y = -c * torch.cos(w * math.pi * x + phi).sum(-1) - (x**2).sum(-1)
    return x, y.unsqueeze(-1)


def make_workload(
    n_tasks: int = 5,
    shots: int = 100,
    queries: int = 100,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Workload:
    """``n_tasks`` CosMixture tasks and a freshly initialised MLP, on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    x, y = _cosmixture(n_tasks, shots + queries, gen)
    y = (y - y.mean()) / y.std()  # pooled standardisation, as in the paper
    torch.manual_seed(seed)
    model = make_mlp().to(device=device, dtype=dtype)

    def put(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    return Workload(model, put(x[:, :shots]), put(y[:, :shots]), put(x[:, shots:]),
                    put(y[:, shots:]))


def sync(device: str) -> None:
    """Wait for queued device work, so that wall-clock timing is honest on CUDA."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds taken by one call of ``fn``."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# Peak memory is measured by the package's own helper (``amaml sweep-steps`` uses it too).
PeakMemory = _PeakMemory


def machine_info(device: str) -> dict[str, object]:
    """What the numbers were measured on."""
    info: dict[str, object] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info
