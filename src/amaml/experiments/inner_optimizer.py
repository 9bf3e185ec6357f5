"""The inner optimiser of a run (``--inner-optimizer`` and its ``--inner-*`` options).

``gd`` is the gradient flow integrated by the config's ``solver`` (with Euler, plain
gradient descent), as every run before these options; the other names are the
:mod:`amaml.optim` optimisers, stepped at the config's ``inner_lr``. Which optimisers take
an option, and what it sets, come from the optimisers' own dataclass fields
(:data:`INNER_OPTIONS`), so a new optimiser field needs one entry here and one config field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ..algorithms import algorithm_options
from ..optim import OPTIMIZERS, AbstractInnerOptimizer
from ._checks import check_choice, check_number, flag

__all__ = ["INNER_OPTIMIZERS", "INNER_OPTIONS", "check_inner_optimizer", "check_methods",
           "describe_inner", "inner_option_users", "make_inner_optimizer"]

#: ``--inner-optimizer`` names: ``gd`` (the gradient flow of ``solver``), then
#: :data:`amaml.optim.OPTIMIZERS`.
INNER_OPTIMIZERS: tuple[str, ...] = ("gd", *OPTIMIZERS)

#: Config field -> the :mod:`amaml.optim` field it sets (``inner_weight_decay=None``: the
#: optimiser's own default, 0, or 0.01 for ``adamw``).
INNER_OPTIONS: dict[str, str] = {
    "inner_momentum": "momentum", "inner_nesterov": "nesterov", "inner_betas": "betas",
    "inner_eps": "eps", "inner_weight_decay": "weight_decay", "inner_alpha": "alpha"}


def inner_option_users(option: str) -> list[str]:
    """The ``--inner-optimizer`` names that take config field ``option``
    (a key of :data:`INNER_OPTIONS`), from the optimisers' dataclass fields."""
    target = INNER_OPTIONS[option]
    return [name for name, cls in OPTIMIZERS.items()
            if target in {f.name for f in dataclasses.fields(cls)}]  # type: ignore[arg-type]


def make_inner_optimizer(name: str, options: Mapping[str, Any]
                         ) -> AbstractInnerOptimizer | None:
    """The :mod:`amaml.optim` instance of ``name`` with the ``options`` it takes (config
    field -> value, as :data:`INNER_OPTIONS`; ``None`` values left at the optimiser's
    default), or ``None`` for ``gd``.

    Raises:
        ValueError: Unknown name, or values the optimiser refuses (its message, with the
            flag to change).
    """
    check_choice("inner_optimizer", name, list(INNER_OPTIMIZERS))
    if name == "gd":
        return None
    kwargs: dict[str, Any] = {}
    for option, target in INNER_OPTIONS.items():
        value = options.get(option)
        if value is not None and name in inner_option_users(option):
            kwargs[target] = tuple(value) if option == "inner_betas" else value
    try:
        return OPTIMIZERS[name](**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--inner-optimizer {name}: {err} Change it with the --inner-* "
                         "flags.") from None


def check_inner_optimizer(name: str, options: Mapping[str, Any],
                          defaults: Mapping[str, Any], solver: str, memory: str) -> None:
    """Refuse a bad ``--inner-optimizer`` setting, naming the flag and why.

    Args:
        name: ``inner_optimizer``.
        options: The config's values of :data:`INNER_OPTIONS`.
        defaults: Their defaults: an option the optimiser does not take must keep it.
        solver: The config's solver; an optimiser needs ``euler``.
        memory: The config's memory strategy; an optimiser cannot use ``backsolve``.

    Raises:
        ValueError: An unknown name, a value out of range, an option given to an
            optimiser that does not take it, or an optimiser with a solver other than
            Euler or with ``backsolve``.
    """
    check_choice("inner_optimizer", name, list(INNER_OPTIMIZERS))
    betas = options["inner_betas"]
    if (not isinstance(betas, tuple) or len(betas) != 2 or any(
            isinstance(b, bool) or not isinstance(b, (int, float)) for b in betas)):
        raise ValueError(f"{flag('inner_betas')} must be two numbers B1 B2; got {betas!r}.")
    if not isinstance(options["inner_nesterov"], bool):
        raise ValueError(f"{flag('inner_nesterov')} must be a bool; got "
                         f"{options['inner_nesterov']!r}.")
    check_number("inner_momentum", options["inner_momentum"], allow_zero=True)
    check_number("inner_eps", options["inner_eps"])
    check_number("inner_alpha", options["inner_alpha"], allow_zero=True)
    if options["inner_weight_decay"] is not None:
        check_number("inner_weight_decay", options["inner_weight_decay"], allow_zero=True)
    for option, value in (("inner_alpha", options["inner_alpha"]),
                          ("inner_betas", betas[0]), ("inner_betas", betas[1])):
        if not 0 <= value < 1:
            raise ValueError(f"{flag(option)} must lie in [0, 1); got {value!r}.")
    for option in INNER_OPTIONS:
        users = inner_option_users(option)
        if options[option] != defaults[option] and name not in users:
            raise ValueError(
                f"{flag(option)} is an option of --inner-optimizer {' or '.join(users)}; "
                f"--inner-optimizer {name} does not take it (got {options[option]!r}). Drop "
                "it, or choose an optimiser that takes it.")
    if options["inner_nesterov"] and options["inner_momentum"] == 0:
        raise ValueError(f"{flag('inner_nesterov')} needs {flag('inner_momentum')} > 0 (as "
                         "torch.optim.SGD).")
    if name != "gd" and memory == "backsolve":
        raise ValueError(f"--inner-optimizer {name} cannot be combined with --memory backsolve, "
                         "which integrates the gradient flow backward in time: an optimiser "
                         "step has no backward version. Use --memory checkpoint or revolve "
                         "(exact).")
    if name != "gd" and solver != "euler":
        raise ValueError(
            f"--inner-optimizer {name} needs --solver euler (got --solver {solver}): "
            "an optimiser step is a discrete map, not a solver of the gradient flow, so it "
            "has no Heun or Runge-Kutta version. Pass --solver euler, or --inner-optimizer "
            f"gd to integrate the gradient flow with {solver}.")
    make_inner_optimizer(name, options)  # what the optimiser itself refuses


def check_methods(name: str, methods: Sequence[str]) -> None:
    """Refuse ``--inner-optimizer name`` (other than ``gd``) for methods that take no inner
    optimiser (:func:`amaml.algorithms.algorithm_options`): iMAML, whose implicit gradient
    is that of the gradient flow's fixed point.

    Raises:
        ValueError: Naming the methods and the fix.
    """
    if name == "gd":
        return
    refused = [m for m in methods if "optimizer" not in algorithm_options(m)]
    if refused:
        kept = [m for m in methods if m not in refused]
        fix = f"--methods {','.join(kept)}" if kept else "another method"
        raise ValueError(
            f"--inner-optimizer {name} does not apply to {', '.join(refused)}: its implicit "
            "gradient is that of the fixed point of the gradient flow, whatever reaches it. "
            f"Use {fix}, or --inner-optimizer gd.")


def describe_inner(name: str, options: Mapping[str, Any], solver: str) -> str:
    """How a run adapts, for tables: the solver's name (``euler``) under ``gd``, else
    ``inner optimiser: adam(betas=(0.9, 0.999), ...)``."""
    optimizer = make_inner_optimizer(name, options)
    return solver if optimizer is None else f"inner optimiser: {optimizer.describe()}"
