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
