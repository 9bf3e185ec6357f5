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
    assert said is not None and "mmap threshold 1024 MiB" in said


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
