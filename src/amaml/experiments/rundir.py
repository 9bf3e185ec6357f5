"""The run directory: one run per directory, checked before writing, locked while in use.

A run directory holds one run (see :mod:`.training` for its files). Before anything is
written, :func:`prepare_run_dir` refuses a directory that already holds a run (unless
resuming) and :func:`check_resumable` refuses to resume with other settings.

:class:`RunDirLock` holds an exclusive ``flock`` on ``DIR/.lock`` for the life of a
``train`` (or of a ``compare`` on its comparison directory); the file names the holder's
pid and host, so a second process on the same ``--out`` is refused with a message naming
them. The operating system drops the lock with its holder, even on SIGKILL: a lock file
left behind by a killed process is stale (:attr:`RunDirLock.stale_holder`) and is taken
over. A released lock removes its file. Locks are advisory and need ``fcntl`` (POSIX);
elsewhere the file is written but not enforced.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from .checkpoint import CheckpointError, load_checkpoint
from .config import RESUME_MUTABLE, TrainConfig

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["CHECKPOINT_FILE", "INIT_FILE", "LOCK_FILE", "RESULT_FILES", "RunDirError",
           "RunDirLock", "check_resumable", "prepare_run_dir", "resume_config"]

CHECKPOINT_FILE = "checkpoint.pt"
INIT_FILE = "init.pt"
LOCK_FILE = ".lock"
#: Files whose presence shows that a directory already holds a run.
RESULT_FILES = (CHECKPOINT_FILE, INIT_FILE, "metrics.json")


class RunDirError(ValueError):
    """The output directory cannot be used as asked (already holds a run, is in use by
    another process, or has nothing to resume)."""


class RunDirLock:
    """An exclusive lock on a run directory, held by this process (a context manager).

    Args:
        directory: The run directory; created (with its parents) if missing, and removed
            on release if this lock created it and it is empty then.
        what: What holds it, for the messages (``"run"``, ``"comparison"``).

    Attributes:
        stale_holder: What the lock file said when it was taken over from a process that
            died holding it (``{"pid", "host", "since", "what"}``), else ``None``.

    Raises:
        RunDirError: On :meth:`acquire`, another process holds the directory, or it
            exists and is not a directory.
    """

    def __init__(self, directory: str | os.PathLike[str], *, what: str = "run") -> None:
        self.directory = Path(directory)
        self.what = what
        self.stale_holder: dict[str, Any] | None = None
        self._fd: int | None = None
        self._created = False

    @property
    def path(self) -> Path:
        """The lock file, ``directory/.lock``."""
        return self.directory / LOCK_FILE

    def acquire(self) -> RunDirLock:
        """Take the lock (without waiting); returns ``self``."""
        if self.directory.exists() and not self.directory.is_dir():
            raise RunDirError(f"--out {str(self.directory)!r} exists and is not a directory; "
                              "choose another --out.")
        if not self.directory.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            self._created = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                self._remove_created_dir()
                raise RunDirError(self._busy_message(holder)) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file between our open and flock: retry
        previous = _read_holder(fd)
        self.stale_holder = previous or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                  "what": self.what}).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op when not held)."""
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None
        self._remove_created_dir()

    def _remove_created_dir(self) -> None:
        # A run that failed before writing anything leaves no empty directory behind.
        if self._created and self.directory.is_dir() and not any(self.directory.iterdir()):
            self.directory.rmdir()

    def _busy_message(self, holder: dict[str, Any]) -> str:
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
               if holder else f"a process that has not written {LOCK_FILE} yet")
        return (f"--out {str(self.directory)!r} is in use by another amaml "
                f"{holder.get('what', self.what)} "
                f"({who}); wait for it to end, or choose another --out.")

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def prepare_run_dir(out: Path, resume: bool) -> dict[str, Any] | None:
    """Check the run directory; returns the checkpoint to resume from, if any.

    Raises:
        RunDirError: ``out`` is not a directory, already holds a run (without
            ``resume``) or has no checkpoint (with ``resume``).
        CheckpointError: The checkpoint is corrupted or foreign.
    """
    ckpt = out / CHECKPOINT_FILE
    if resume:
        if not ckpt.exists():
            raise RunDirError(f"Nothing to resume in {str(out)!r}: it has no {CHECKPOINT_FILE}; "
                              "drop --resume to start a new run there.")
        return load_checkpoint(ckpt)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {str(out)!r} exists and is not a directory; choose another "
                          "--out.")
    taken = [f for f in RESULT_FILES if (out / f).exists()]
    if taken:
        raise RunDirError(f"--out {str(out)!r} already holds a run ({', '.join(taken)}); pass "
                          "--resume to continue it, or choose another --out.")
    return None


def _stored_config(state: dict[str, Any], path: Path) -> TrainConfig:
    try:
        return TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"Checkpoint {str(path)!r} holds an invalid config ({err}).") \
            from err


def check_resumable(config: TrainConfig, state: dict[str, Any], path: Path) -> TrainConfig:
    """``config``, if it may resume the checkpoint ``state`` read from ``path``.

    Raises:
        CheckpointError: The stored config is invalid, or differs from ``config`` in a
            field outside :data:`~amaml.experiments.config.RESUME_MUTABLE`.
    """
    stored = _stored_config(state, path)
    diff = config.differences(stored, ignore=RESUME_MUTABLE)
    if diff:
        desc = ", ".join(f"--{k.replace('_', '-')} {a!r} (checkpoint: {b!r})"
                         for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"The config differs from the checkpoint's in {str(path)!r}: "
                              f"{desc}; resume with the original settings or use another "
                              "--out.")
    return config


def resume_config(out: str | os.PathLike[str], **overrides: Any) -> TrainConfig:
    """The config saved in ``out``'s checkpoint, with some fields replaced.

    Resuming with a changed field is refused later by :func:`~amaml.experiments.train`
    (except for the fields of :data:`~amaml.experiments.config.RESUME_MUTABLE`); this
    lets a command line give only ``--out DIR --resume``.

    Raises:
        RunDirError: ``out`` has no checkpoint.
        CheckpointError: The checkpoint is corrupted, foreign or holds an invalid config.
        ValueError: An override is invalid.
    """
    path = Path(out) / CHECKPOINT_FILE
    if not path.exists():
        raise RunDirError(f"Nothing to resume in {str(out)!r}: it has no {CHECKPOINT_FILE}; "
                          "drop --resume to start a new run there.")
    return _stored_config(load_checkpoint(path), path).replace(**overrides)
