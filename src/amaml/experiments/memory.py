"""Peak memory of a region of code: what a meta-gradient costs, measured.

Used by ``amaml sweep-steps`` (is a method within ``--max-memory-mb`` at N inner steps?)
and by the benchmark scripts.
"""

from __future__ import annotations

import gc
import multiprocessing
import resource
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["PeakMemory", "peak_memory_mib"]


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def malloc_trim() -> None:
    """``malloc_trim(0)`` where glibc provides it: freed heap pages go back to the system.

    Without it a region can reuse memory freed earlier in the process (e.g. by
    ``torch.compile``) without the resident size growing, and its peak reads as zero.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory growth of one region, in bytes (a context manager).

    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated at entry.
    CPU: peak resident set size (``VmHWM``) above the resident size at entry. The
    high-water mark is reset at entry through ``/proc/self/clear_refs`` where Linux
    allows it; otherwise ``ru_maxrss`` is used, which is only right in a fresh
    process whose peak so far is close to its current size. For RSS to fall back when
    tensors are freed, start the process with a fixed ``MALLOC_MMAP_THRESHOLD_`` (the
    benchmark scripts do).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_bytes = 0
        self.method = ""
        self._base = 0
        self._reset = False

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            self.method = "cuda.max_memory_allocated"
            return self
        malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")  # resets the VmHWM high-water mark to the current RSS
            self._reset = True
        except OSError:
            self._reset = False
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


def _child(fn: Callable[[], Any], device: str, conn: Any) -> None:
    try:
        fn()  # warm-up: one-off allocations (caches, compiled kernels) are not the region's
        with PeakMemory(device) as peak:
            fn()
        conn.send(("ok", peak.peak_bytes / 2**20))
    except BaseException as err:  # reported to the parent, which raises it
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        conn.close()


def peak_memory_mib(fn: Callable[[], Any], device: str = "cpu", *,
                    isolate: bool = True) -> float:
    """Peak memory growth of ``fn()`` in MiB, after one warm-up call.

    On CPU with ``isolate`` it runs in a forked child process, so that the parent's heap
    history does not hide or inflate the figure; on CUDA, or without ``isolate``, in this
    process.

    Raises:
        RuntimeError: ``fn`` raised (its message is repeated).
    """
    if device.startswith("cuda") or not isolate:
        fn()
        with PeakMemory(device) as peak:
            fn()
        return peak.peak_bytes / 2**20
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, device, child))
    proc.start()
    child.close()
    try:
        status, value = parent.recv()
    except EOFError:
        status, value = "error", f"the measuring process died (exit code {proc.exitcode})"
    proc.join()
    if status != "ok":
        raise RuntimeError(f"Measuring peak memory failed: {value}")
    return float(value)
