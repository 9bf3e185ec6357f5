"""The registry of task families and :func:`make_family`, the one entry point.

A family is a name and a *builder*: a callable ``builder(name, request) -> TaskFamily``
receiving the validated arguments of :func:`make_family` as a :class:`FamilyRequest`,
and a *kind*, ``"regression"`` or ``"classification"`` (:func:`family_kind`). Add a
family with :func:`register_family`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from .base import KINDS, FamilyRequest, TaskFamily
from .classification import DEFAULT_WAYS
from .collaborative import build_collaborative
from .glyphs import build_glyphs
from .images import build_mini_imagenet, build_omniglot
from .omniglot import MINIMAL_SPLITS, build_omniglot_minimal
from .synthetic import (
    AbstractSyntheticFunction,
    Alpine,
    AlpinePaper,
    CosMixture,
    CosMixturePaper,
    Sinusoid,
    build_synthetic,
)

__all__ = [
    "FamilyBuilder",
    "family_kind",
    "has_fixed_data",
    "list_families",
    "make_family",
    "register_family",
]

FamilyBuilder = Callable[[str, FamilyRequest], TaskFamily]


def _synthetic(fn: AbstractSyntheticFunction) -> FamilyBuilder:
    def build(name: str, request: FamilyRequest) -> TaskFamily:
        return build_synthetic(fn, name, request)

    return build


_FAMILIES: dict[str, FamilyBuilder] = {
    "alpine": _synthetic(Alpine()),
    "alpine-paper": _synthetic(AlpinePaper()),
    "cosmixture": _synthetic(CosMixture()),
    "cosmixture-paper": _synthetic(CosMixturePaper()),
    "sinusoid": _synthetic(Sinusoid()),
    "jester-1": build_collaborative,
    "movielens-100k": build_collaborative,
    "movielens-1m": build_collaborative,
    "glyphs": build_glyphs,
    "omniglot": build_omniglot,
    "mini-imagenet": build_mini_imagenet,
    **{name: build_omniglot_minimal for name in MINIMAL_SPLITS},
}

# The kind of each family not listed is "regression".
_KINDS: dict[str, str] = {
    "glyphs": "classification",
    "omniglot": "classification",
    "mini-imagenet": "classification",
    **{name: "classification" for name in MINIMAL_SPLITS},
}


def list_families() -> list[str]:
    """Names accepted by :func:`make_family`, sorted."""
    return sorted(_FAMILIES)


def has_fixed_data(name: str) -> bool:
    """Whether a registered family reads a fixed data set (collaborative filtering: one
    set of ratings per user), so that episode pools (``pool``) do not apply to it."""
    return _FAMILIES.get(name) is build_collaborative


def family_kind(name: str) -> str:
    """``"regression"`` or ``"classification"``: what the tasks of a registered family are.

    Raises:
        ValueError: ``name`` is not registered.
    """
    if name not in _FAMILIES:
        raise ValueError(f"Unknown task family {name!r}; expected one of {list_families()}.")
    return _KINDS.get(name, "regression")


def register_family(
    name: str, builder: FamilyBuilder, *, overwrite: bool = False, kind: str = "regression"
) -> None:
    """Add a task family to the registry.

    Args:
        name: The family's name, a non-empty string.
        builder: ``builder(name, request) -> TaskFamily``.
        overwrite: Replace an existing family of that name instead of raising.
        kind: ``"regression"`` or ``"classification"``; :func:`make_family` accepts
            ``ways`` for classification families only.

    Raises:
        TypeError: ``name`` is not a string or ``builder`` is not callable.
        ValueError: ``name`` is empty, or taken and ``overwrite`` is False, or ``kind``
            is unknown.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}.")
    if not name:
        raise ValueError("name must be a non-empty string.")
    if not callable(builder):
        raise TypeError(f"builder must be callable, got {type(builder).__name__}.")
    if name in _FAMILIES and not overwrite:
        raise ValueError(
            f"Task family {name!r} is already registered; pass overwrite=True to replace it."
        )
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    _FAMILIES[name] = builder
    _KINDS.pop(name, None)
    if kind != "regression":
        _KINDS[name] = kind


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def make_family(
    name: str,
    *,
    shots: int,
    queries: int,
    n_train: int | None = None,
    n_test: int = 100,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    dtype: torch.dtype = torch.float32,
    pool: int | None = None,
    ways: int | None = None,
) -> TaskFamily:
    """Build the meta-training and meta-test tasks of a registered family.

    Everything is deterministic given ``seed``; no global random state is used or changed.

    Args:
        name: One of :func:`list_families`: ``"alpine"``, ``"cosmixture"`` (the authors'
            code), ``"alpine-paper"``, ``"cosmixture-paper"`` (the paper's printed
            formulas), ``"sinusoid"`` (synthetic) or ``"jester-1"``, ``"movielens-100k"``,
            ``"movielens-1m"`` (collaborative filtering, one task per user), or
            ``"glyphs"``, ``"omniglot"``, ``"omniglot-minimal"``, ``"omniglot-small1"``,
            ``"omniglot-small2"`` (Omniglot's minimal background splits,
            :mod:`amaml.tasks.omniglot`), ``"mini-imagenet"`` (N-way classification,
            :mod:`amaml.tasks.classification`).
        shots: Support points per task, >= 1; per class for classification.
        queries: Query points per task, >= 1; per class for classification.
        n_train: Meta-training tasks, >= 1. ``None``: 100 synthetic functions, every
            eligible user that is not a meta-test user, or fresh classification episodes
            at every meta-iteration (:meth:`TaskFamily.sample_train_batch`).
        n_test: Meta-test tasks (functions, users or fixed episodes), >= 1.
        seed: Non-negative seed of every random choice.
        root: Data folder of collaborative families (the dataset's folder or one holding
            it); ``None`` uses ``$AMAML_DATA`` or ``~/.cache/amaml``. Ignored by synthetic
            families.
        download: Fetch the official archive into ``root`` if the data is absent.
        dtype: Floating dtype of every returned tensor.
        pool: Synthetic families only: each meta-training task holds ``pool`` support and
            ``pool`` query points (uniform on the box) from which every meta-iteration
            draws ``shots`` and ``queries`` of them (:func:`amaml.tasks.draw_episode`),
            the authors' protocol; meta-test tasks keep ``shots`` and ``queries``.
            ``None``: every task holds ``shots`` and ``queries`` points.
        ways: Classification families only: classes per episode, >= 2 and at most the
            classes of either split; ``None``: 5.

    Returns:
        The :class:`TaskFamily`; its ``info`` records the normalisation and counts.

    Raises:
        ValueError: Unknown ``name``, an argument out of range, ``pool`` below ``shots``
            or ``queries``, ``pool`` with a collaborative or classification family,
            ``ways`` with a regression family, ``ways`` below 2 or above the classes of
            a split, or ``shots + queries`` above the images of a class.
        TypeError: An argument of the wrong type.
        DataError: Missing or malformed data files (collaborative families, Omniglot,
            mini-ImageNet).

    Example:
        >>> fam = make_family("sinusoid", shots=5, queries=10, n_train=4, n_test=2)
        >>> [tuple(t.shape) for t in fam.train.batch([0, 3])]
        [(2, 5, 1), (2, 5, 1), (2, 10, 1), (2, 10, 1)]
    """
    if not isinstance(name, str) or name not in _FAMILIES:
        raise ValueError(f"Unknown task family {name!r}; expected one of {list_families()}.")
    shots = _check_int("shots", shots, 1)
    queries = _check_int("queries", queries, 1)
    if n_train is not None:
        n_train = _check_int("n_train", n_train, 1)
    n_test = _check_int("n_test", n_test, 1)
    seed = _check_int("seed", seed, 0)
    if pool is not None:
        pool = _check_int("pool", pool, 1)
        if pool < max(shots, queries):
            raise ValueError(
                f"pool ({pool}, --pool) must be at least shots ({shots}) and queries "
                f"({queries}): each episode draws its support and query points from it."
            )
    if ways is not None:
        if isinstance(ways, bool) or not isinstance(ways, int):
            raise TypeError(f"ways (--ways) must be an int, got {type(ways).__name__} {ways!r}.")
        if family_kind(name) != "classification":
            raise ValueError(
                f"ways={ways} (--ways) is for classification families; {name!r} is a "
                f"{family_kind(name)} family: leave ways unset."
            )
        if ways < 2:
            raise ValueError(
                f"ways ({ways}, --ways) must be >= 2: an episode tells classes apart "
                f"(default {DEFAULT_WAYS})."
            )
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a str, os.PathLike or None, got {type(root).__name__}.")
    if not isinstance(download, bool):
        raise TypeError(f"download must be a bool, got {type(download).__name__}.")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a floating torch.dtype such as torch.float64, got {dtype!r}."
        )
    request = FamilyRequest(
        shots=shots,
        queries=queries,
        n_train=n_train,
        n_test=n_test,
        seed=seed,
        root=None if root is None else Path(os.fspath(root)).expanduser(),
        download=download,
        dtype=dtype,
        pool=pool,
        ways=ways,
    )
    return _FAMILIES[name](name, request)
