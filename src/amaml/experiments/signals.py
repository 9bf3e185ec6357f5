"""SIGINT/SIGTERM during meta-training: finish the iteration, save, stop.

The first signal sets a :class:`StopFlag`; the loop checks it at the end of every
meta-iteration (on every rank), saves a checkpoint and raises
:class:`TrainingInterrupted`. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

__all__ = ["StopFlag", "TrainingInterrupted", "catch_signals"]


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint.

    Attributes:
        out_dir: The run directory (resume with ``--out out_dir --resume``).
        iteration: Meta-iterations completed and saved.
        signal_name: ``"SIGINT"`` or ``"SIGTERM"``.
    """

    def __init__(self, out_dir: Path | None, iteration: int, signal_name: str, *,
                 resume_hint: str | None = None) -> None:
        self.out_dir = out_dir
        self.iteration = iteration
        self.signal_name = signal_name
        hint = resume_hint or f"amaml train --out {out_dir} --resume"
        where = (f"checkpoint saved; resume with: {hint}" if out_dir is not None
                 else "nothing saved (no --out)")
        super().__init__(f"Interrupted by {signal_name} after meta-iteration {iteration}; "
                         f"{where}")


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop saves and stops at the end of the iteration."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = signal.Signals(signum).name


@contextmanager
def catch_signals(flag: StopFlag, enabled: bool = True) -> Iterator[None]:
    """Route SIGINT and SIGTERM to ``flag`` inside the block (main thread only)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, flag.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
