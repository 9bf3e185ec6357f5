"""tune_cpu_allocator: set on Linux/glibc, skipped when asked, never an error."""

from __future__ import annotations

import platform
import sys

import pytest

import amaml


def test_skipped_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMAML_MALLOC", "system")
    assert amaml.tune_cpu_allocator() is None


@pytest.mark.skipif(not sys.platform.startswith("linux")
                    or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_sets_glibc_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AMAML_MALLOC", raising=False)
    said = amaml.tune_cpu_allocator()
    assert said is not None and "mmap threshold 1024 MiB" in said and "never trimmed" in said


def test_adapt_tunes_the_allocator_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from amaml import allocator

    calls: list[int] = []
    monkeypatch.setattr(allocator, "_TUNED", [])
    monkeypatch.setattr(allocator, "tune_cpu_allocator", lambda: calls.append(1) or "set")
    net = torch.nn.Linear(2, 1)
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    for _ in range(2):
        amaml.adapt(net, torch.nn.functional.mse_loss, (x, y), steps=2, lr=0.1)
    assert calls == [1]


def _thp_flag(addr: int) -> bool | None:
    """Whether the mapping holding ``addr`` is advised for huge pages (``hg`` in its
    VmFlags), from /proc/self/smaps; ``None`` if not found."""
    current = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                current = lo <= addr < hi
            elif current and line.startswith("VmFlags:"):
                return "hg" in line.split()
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux madvise")
def test_huge_pages_advises_mapped_buffers_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from amaml import allocator

    monkeypatch.delenv("AMAML_MALLOC", raising=False)
    allocator._madvise.cache_clear()
    big = torch.empty((1 << 30) + (8 << 20), dtype=torch.uint8)  # 1 GiB and 8 MiB
    assert allocator.huge_pages(big) is big
    inside = -(-big.data_ptr() // (2 << 20)) * (2 << 20) + (4 << 20)
    if _thp_flag(inside) is None:
        pytest.skip("no smaps entry")
    assert _thp_flag(inside) is True
    big[::1 << 20].fill_(7)  # the memory is usable as before (a byte a MiB touched)
    assert int(big[::1 << 20].sum()) == 7 * 1032
    small = torch.ones(1000)
    assert allocator.huge_pages(small) is small
    heap = torch.empty(80 << 20, dtype=torch.uint8)  # below glibc's mmap threshold: no advice
    allocator.huge_pages(heap)
    assert not _thp_flag(-(-heap.data_ptr() // (2 << 20)) * (2 << 20) + (4 << 20))
    monkeypatch.setenv("AMAML_MALLOC", "system")
    allocator._madvise.cache_clear()
    other = torch.empty((1 << 30) + (8 << 20), dtype=torch.uint8)
    allocator.huge_pages(other)
    assert not _thp_flag(-(-other.data_ptr() // (2 << 20)) * (2 << 20) + (4 << 20))
    allocator._madvise.cache_clear()


_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _GLIBC, reason="glibc's heap")
def test_heap_is_kept_and_released_on_demand() -> None:
    """After tune_cpu_allocator, 1.2 GB of freed heap tensors stay in the process (the next
    meta-gradient reuses them without faulting; a 1 GiB trim threshold gave them back);
    release_free_memory gives them back. In a fresh process: the setting is process-wide."""
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import torch, amaml
        from amaml.allocator import _mallinfo2, release_free_memory
        assert amaml.tune_cpu_allocator() is not None
        def rss():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) << 10 for l in f if l.startswith("VmRSS"))
        blocks = [torch.ones(50 << 20, dtype=torch.uint8) for _ in range(24)]  # 1.2 GB
        del blocks
        kept = _mallinfo2()().fordblks
        assert kept >= (1150 << 20), kept  # free in the heap, still resident
        before = rss()
        assert before >= (1150 << 20), before
        assert release_free_memory()
        assert rss() < before - (1000 << 20), (before, rss())  # given back to the kernel
        print("ok")
    """)
    env = {k: v for k, v in __import__("os").environ.items() if k != "AMAML_MALLOC"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
