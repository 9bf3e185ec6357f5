"""glibc's allocator, told to keep freed memory: a third of a CPU Conv-4 run's wall time.

On Linux, glibc serves each allocation above a threshold (128 KiB at first, adapting up to
32 MiB) with its own ``mmap`` and gives it back to the kernel on ``free``; the next tensor
of that size is mapped again and every page of it faulted in and zeroed anew. A
meta-gradient allocates and frees the same activation tensors at every inner step, so on a
convolutional network much of its time goes to the kernel: a short ``amaml train --model
conv4`` run (glyphs 5-way 1-shot, 10 steps, 2 meta-iterations of 2 tasks, 10 test
episodes, one thread; three paired whole-process runs) took 29.4 s wall, 11.0 s of it
system time, and 19.0 s (1.1 s system, 0.66x) with freed memory kept for reuse, its peak
resident memory 1.03 -> 1.50 GB.
:func:`tune_cpu_allocator` sets that (``mallopt``: allocations up to 1 GiB from the heap,
freed heap memory never given back); the ``amaml`` command calls it at start, and
:func:`amaml.adapt` / :func:`amaml.adapt_batch` / :func:`amaml.explain` at their first call
on a CPU model, before they measure anything (a
ResNet-18 meta-gradient with Adam, N = 10, one thread: 29.6 s with 61% system time, 14.3 s
with 40%); ``AMAML_MALLOC=system`` leaves the allocator as it is. A program can call it
itself before it allocates, or export ``MALLOC_MMAP_THRESHOLD_=1073741824
MALLOC_TRIM_THRESHOLD_=-1`` before Python starts (the same settings).

The heap is never trimmed: with a trim threshold of 1 GiB (this module's setting until
2026-12), a meta-gradient whose graphs held more than 1 GiB gave it back to the kernel at
its end, and the next one faulted it in again (ResNet-18, Adam, N = 10, fastest of three:
unrolled 5.37 s with 7% system time, every graph kept 6.45 s with 22%, store 9.02 s with
27%; never trimmed: 4.92 s 1%, 4.96 s 1%, 6.67 s 3%). The price, as with torch's CUDA
caching allocator: the process's resident memory stays at its peak, the freed part kept
for the next tensors; ``memory="auto"`` counts it as free, and :func:`release_free_memory`
gives it back (between phases of a program, say).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import Any

import torch
from torch import Tensor

__all__ = ["free_bytes", "huge_pages", "release_free_memory", "tune_cpu_allocator",
           "tune_cpu_allocator_once"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30
_TRIM_THRESHOLD = -1  # never trim (glibc: -1 disables trimming)


def tune_cpu_allocator() -> str | None:
    """Keep freed memory in the process for reuse (glibc only); returns what was set, or
    ``None`` where nothing was (not Linux/glibc, ``AMAML_MALLOC=system``, or ``mallopt``
    refused). Process-wide and not undone: the process's resident memory stays near its
    peak instead of shrinking between steps."""
    if os.environ.get("AMAML_MALLOC", "").lower() == "system" or not sys.platform.startswith(
            "linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and
            mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)):
        return None
    return (f"glibc malloc keeps freed memory (mmap threshold {_MMAP_THRESHOLD >> 20} MiB, "
            "heap never trimmed; AMAML_MALLOC=system to leave it, "
            "amaml.allocator.release_free_memory() to give it back)")


def release_free_memory() -> bool:
    """Give the memory glibc's heap holds free back to the kernel (``malloc_trim(0)``):
    what :func:`tune_cpu_allocator` keeps for the next tensors. Returns whether any was
    given back (``False`` off glibc). For a program that is done with meta-gradients and
    goes on to other work; the next large allocation maps and faults memory in again."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))


_TUNED: list[str | None] = []

_MADV_HUGEPAGE = 14  # Linux madvise advice
_HUGE = 2 << 20  # a transparent huge page on x86-64 and arm64
# Buffers glibc maps afresh (the mmap threshold tune_cpu_allocator sets): smaller ones come
# from the heap, whose pages a process that tuned the allocator reuses without a fault,
# and there the advice cost more than it saved (the kernel compacting memory to find huge
# pages: store at N = 10,000 on the distillation example's MLP, a 740 MB buffer, took 4.5 s
# advised and 3.1 s not, two pairs of runs).
_HUGE_MIN_BYTES = _MMAP_THRESHOLD


def huge_pages(t: Tensor) -> Tensor:
    """Ask Linux to back the fresh CPU tensor ``t`` (at least 1 GiB: memory glibc maps anew
    for it) with transparent huge pages where the kernel allows it (``madvise``): its first
    writes then fault one 2 MiB page at a time instead of 512 small ones. The memory
    strategies call it on the buffers that hold many kept states: store on ResNet-18 at
    N = 100 writes 13 GB of fresh states a meta-gradient, and took 78.0 s (21% of it in the
    kernel) without the advice, 73.0 s (15%) with it. Returns ``t``; does nothing elsewhere
    (CUDA, not Linux, ``AMAML_MALLOC=system``, a kernel without THP)."""
    if t.device.type != "cpu" or t.numel() * t.element_size() < _HUGE_MIN_BYTES:
        return t
    madvise = _madvise()
    if madvise is not None:
        start = -(-t.data_ptr() // _HUGE) * _HUGE
        end = (t.data_ptr() + t.numel() * t.element_size()) // _HUGE * _HUGE
        if end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)  # advice: a failure changes nothing
    return t


@functools.cache
def _madvise() -> Any:
    if os.environ.get("AMAML_MALLOC", "").lower() == "system" or not sys.platform.startswith(
            "linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def tune_cpu_allocator_once() -> str | None:
    """:func:`tune_cpu_allocator` the first time it is called in this process (what
    :func:`amaml.adapt` calls on a CPU model); later calls return what it said then."""
    if not _TUNED:
        _TUNED.append(tune_cpu_allocator())
    return _TUNED[0]


def free_bytes(device: torch.device) -> int | None:
    """Memory free on ``device`` now: CUDA ``mem_get_info`` plus what torch's caching
    allocator holds unused; CPU ``MemAvailable`` of ``/proc/meminfo`` (Linux), else the
    available physical pages, plus what glibc's heap holds free for this process (reused
    by the next tensors; :func:`amaml.tune_cpu_allocator` keeps freed memory there);
    ``None`` where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    if device.type != "cpu":
        return None
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return available + _heap_free()


def _heap_free() -> int:
    """Bytes glibc's heap holds free for this process (``mallinfo2().fordblks``): memory
    ``MemAvailable`` does not count but the next tensors reuse, which is most of it after
    :func:`amaml.tune_cpu_allocator`; 0 where unknown (not glibc >= 2.33)."""
    fn = _mallinfo2()
    return 0 if fn is None else int(fn().fordblks)


@functools.cache
def _mallinfo2() -> Any:
    """glibc's ``mallinfo2``, looked up once (``find_library`` runs a subprocess)."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    return fn


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]
