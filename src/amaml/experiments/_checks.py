"""Checks of config values whose errors name the field and its flag (``meta_iters`` is
``--meta-iters``), shared by :mod:`.config` and :mod:`.inner_optimizer`."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_choice", "check_int", "check_number", "flag"]


def flag(name: str) -> str:
    """``meta_iters (--meta-iters)``: a field and its flag, for messages."""
    return f"{name} (--{name.replace('_', '-')})"


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{flag(name)} must be an int; got {value!r}.")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{flag(name)} must be {bound}; got {value}.")


def check_number(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{flag(name)} must be a number; got {value!r}.")
    ok = value >= 0 if allow_zero else value > 0
    if not (ok and math.isfinite(value)):
        raise ValueError(f"{flag(name)} must be a finite number {'>= 0' if allow_zero else '> 0'}"
                         f"; got {value!r}.")


def check_choice(name: str, value: Any, allowed: list[str]) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r} for --{name.replace('_', '-')}; "
                         f"expected one of {allowed}.")
