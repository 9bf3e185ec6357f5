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

import gc
import math
import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

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


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    """``malloc_trim(0)`` where glibc provides it: freed heap pages go back to the system.

    Without it a run can reuse memory freed earlier in the process (e.g. by
    ``torch.compile`` during the warm-up) without the resident size growing, and its
    peak reads as zero.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory growth of one region, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated at entry.
    CPU: peak resident set size (``VmHWM``) above the resident size at entry. The
    high-water mark is reset at entry through ``/proc/self/clear_refs`` where Linux
    allows it; otherwise ``ru_maxrss`` is used, which is only right in a fresh
    process whose peak so far is close to its current size (run each measured
    configuration in its own subprocess, after a small warm-up). For RSS to fall
    back when tensors are freed, start the process with a fixed
    ``MALLOC_MMAP_THRESHOLD_`` (the benchmark scripts do).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_bytes = 0
        self.method = ""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            self.method = "cuda.max_memory_allocated"
            return self
        _malloc_trim()  # hand freed heap back, so that reusing it shows as growth
        self._reset = False
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets the VmHWM high-water mark to the current RSS
            self._reset = True
        except OSError:
            pass
        rss = _status_kib("VmRSS")
        self._base = 1024 * rss if rss is not None else 0
        self.method = "VmHWM - VmRSS (clear_refs)" if self._reset else "ru_maxrss - VmRSS"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
            return
        hwm = _status_kib("VmHWM") if self._reset else None
        if hwm is None:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.peak_bytes = max(0, 1024 * hwm - self._base)


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
