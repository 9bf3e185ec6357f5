"""The optional ``amaml[experiments]`` dependencies, imported only where they are used.

The library (``amaml.adapt`` and everything under it) needs only ``torch`` and ``numpy``.
The experiments and the command line also draw figures (matplotlib), show progress bars
(tqdm), fit the oracle reference (scipy), read Jester's ``.xls`` (xlrd) and images
(Pillow): those come with ``pip install 'amaml[experiments]'``. This module is a leaf
(standard library only), so any part of the package may import it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from types import ModuleType

__all__ = ["EXPERIMENTS", "INSTALL", "MissingExtraError", "extra_message", "import_extra",
           "missing", "require"]

#: Import names of the ``experiments`` extra, in the order a message names them.
EXPERIMENTS = ("matplotlib", "tqdm", "scipy", "xlrd", "PIL")
#: The command that installs them.
INSTALL = "pip install 'amaml[experiments]'"
# Distribution names where they differ from the import name.
_DISTRIBUTION = {"PIL": "pillow"}


class MissingExtraError(ImportError):
    """An optional dependency of the ``experiments`` extra is not installed."""


def _top(module: str) -> str:
    return module.partition(".")[0]


def extra_message(module: str, what: str) -> str:
    """``"<what> needs <package>: pip install 'amaml[experiments]'"``."""
    top = _top(module)
    return f"{what} needs {_DISTRIBUTION.get(top, top)}: {INSTALL}"


def missing(modules: Iterable[str] = EXPERIMENTS) -> str | None:
    """The first of ``modules`` that cannot be imported, or ``None`` if all can.

    Looks the modules up without importing them (``importlib.util.find_spec``); a name
    set to ``None`` in ``sys.modules`` counts as missing, as ``import`` treats it.
    """
    for module in modules:
        try:
            if importlib.util.find_spec(_top(module)) is None:
                return module
        except (ImportError, ValueError):
            return module
    return None


def require(what: str, modules: Iterable[str] = EXPERIMENTS) -> None:
    """Raise :class:`MissingExtraError` naming the first of ``modules`` not installed.

    Args:
        what: Who needs them, e.g. ``"amaml train"``; starts the message.
        modules: Import names; by default the whole ``experiments`` extra.
    """
    absent = missing(modules)
    if absent is not None:
        raise MissingExtraError(extra_message(absent, what))


def import_extra(module: str, what: str) -> ModuleType:
    """Import ``module`` (e.g. ``"scipy.optimize"``) or say which extra provides it.

    Raises:
        MissingExtraError: ``module``'s package is not installed; the message names it
            and the ``pip install`` command.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if missing([module]) is None:  # installed, but broken: not ours to explain
            raise
        raise MissingExtraError(extra_message(module, what)) from exc
