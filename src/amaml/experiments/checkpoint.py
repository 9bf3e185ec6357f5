"""Resumable training checkpoints and saved initialisations, written atomically.

Two kinds of file, each a ``torch.save`` dict with a ``format`` tag and a ``version``:

* ``checkpoint.pt`` (:data:`CHECKPOINT_FORMAT`): everything needed to continue a run
  bit for bit: the model, Adam's state, the meta-batch generator, the iteration, the
  metrics so far and the config.
* ``init.pt`` (:data:`INIT_FORMAT`): the learned initialisation and its config, read by
  ``amaml eval --checkpoint``. A ``checkpoint.pt`` is accepted there too.

Files are read with ``torch.load(weights_only=True)``: a foreign pickle cannot run code.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "CheckpointError", "INIT_FORMAT",
    "atomic_write", "atomic_write_json", "atomic_write_text", "jsonable", "load_checkpoint",
    "load_state_file", "save_checkpoint",
]

CHECKPOINT_FORMAT = "amaml-train-checkpoint"
INIT_FORMAT = "amaml-init"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, foreign, of another version, or does not match."""


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it.

    A reader (or a killed writer) never sees a half-written ``path``: ``os.replace`` is
    atomic on POSIX and Windows within one filesystem.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + target.suffix,
                               dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as ``None`` (strict JSON) and tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write strict JSON (indented) atomically."""
    atomic_write_text(path, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any], *,
                    kind: str = CHECKPOINT_FORMAT) -> None:
    """Save ``state`` with its format tag and version, atomically."""
    payload = {"format": kind, "version": CHECKPOINT_VERSION, **state}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_state_file(path: str | os.PathLike[str], *,
                    kinds: tuple[str, ...] = (CHECKPOINT_FORMAT, INIT_FORMAT)
                    ) -> dict[str, Any]:
    """Load and check an amaml checkpoint or initialisation file.

    Args:
        path: The file.
        kinds: Accepted format tags.

    Returns:
        The saved dict (with ``format``, ``version``, ``config``, ``model`` ...).

    Raises:
        CheckpointError: Missing, unreadable (corrupted, truncated), foreign (no or another
            format tag), or written by another format version.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"Checkpoint {str(p)!r} does not exist or is not a file.")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(
            f"Checkpoint {str(p)!r} is corrupted or not a torch file "
            f"({type(err).__name__}); delete it or use another --out to start afresh."
        ) from err
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt not in kinds:
        raise CheckpointError(f"{str(p)!r} is not an amaml checkpoint (format tag {fmt!r}, "
                              f"expected one of {list(kinds)}); refusing to use it.")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"Checkpoint {str(p)!r} has format version "
                              f"{state.get('version')!r}; this amaml reads version "
                              f"{CHECKPOINT_VERSION}.")
    needed = ["config", "model"] + (
        ["optimizer", "generator", "iteration", "history", "finished"]
        if fmt == CHECKPOINT_FORMAT else [])
    missing = [k for k in needed if k not in state]
    if missing or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"Checkpoint {str(p)!r} lacks {missing or ['a config dict']}; "
                              "it is damaged or from another program.")
    return state


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a resumable training checkpoint (see :func:`load_state_file`)."""
    return load_state_file(path, kinds=(CHECKPOINT_FORMAT,))
