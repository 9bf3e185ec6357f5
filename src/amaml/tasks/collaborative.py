"""Meta collaborative filtering: MovieLens-100K, MovieLens-1M and Jester-1, one task per user.

Ratings are read by :mod:`.ratings` (the official layouts, located under ``root``) and the
item features computed by :mod:`.svd_features`; this module assembles the tasks.

How the tasks are built (:func:`family_from_ratings`):

1. Users with fewer than ``shots + queries + 1`` ratings are skipped (counted in
   ``info["skipped_users"]``). The others are shuffled by ``seed``: the first ``n_test``
   are the meta-test users, the rest (or ``n_train`` of them) the meta-training users.
2. Item features come from the meta-training users ONLY: their ratings, centred by their
   mean, fill a users x items matrix (missing = 0) whose truncated SVD gives
   ``min(100, n_items, n_train_users)`` right singular vectors; each is standardised over
   the items that meta-training users rated. Meta-test ratings never touch the features
   or the normalisation, so changing them changes nothing in the meta-training tasks.
3. Targets are ratings standardised with the meta-training ratings' mean and std.
4. Each user's ratings are shuffled by ``seed`` (per user): ``shots`` support points,
   ``queries`` query points and all remaining ratings as test points.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import DataError, FamilyRequest, Task, TaskFamily, TaskSet
from .download import ARCHIVES, default_root, download_family
from .ratings import Ratings, find_data_files, read_jester, read_movielens_1m, read_movielens_100k
from .svd_features import (  # noqa: F401  (_top_right_singular: imported from here by tests)
    N_COMPONENTS,
    ItemFeatures,
    _top_right_singular,
    item_features,
)

# Re-exported from .ratings and .svd_features: importable from here as before the split.
__all__ = [
    "N_COMPONENTS",
    "ItemFeatures",
    "Ratings",
    "build_collaborative",
    "family_from_ratings",
    "find_data_files",
    "item_features",
    "read_jester",
    "read_movielens_100k",
    "read_movielens_1m",
]

# SeedSequence spawn keys (0 and 1 are synthetic.py's, 4 is svd_features.py's).
_SPLIT_USERS, _PER_USER = 2, 3


def _refuse_pool(name: str, request: FamilyRequest) -> None:
    if request.pool is not None:
        raise ValueError(
            f"pool={request.pool} (--pool) is for synthetic families; {name!r} has a fixed set "
            "of ratings per user: leave pool unset."
        )


def family_from_ratings(
    ratings: Ratings, request: FamilyRequest, name: str, extra_info: dict[str, Any] | None = None
) -> TaskFamily:
    """Turn ratings into a :class:`TaskFamily`, one task per user (see module docstring).

    Args:
        ratings: All ratings of the data set.
        request: Validated arguments of :func:`amaml.tasks.make_family`. ``n_train=None``
            uses every eligible user that is not a meta-test user.
        name: Family name recorded in the result.
        extra_info: More facts to put in ``info``.

    Returns:
        The family. ``info`` holds ``n_users``, ``n_items``, ``n_ratings``,
        ``min_ratings``, ``skipped_users``, ``eligible_users``, ``n_train``, ``n_test``,
        ``rating_mean``, ``rating_std`` (targets are ``(rating - mean) / std``),
        ``n_components``, ``null_components``, ``feature_mean``/``feature_std`` (of the
        raw singular vectors), ``singular_values``, ``train_items``, ``test_user_ids``
        and ``test_points`` (total, min, max per meta-test user).

    Raises:
        DataError: Too few users have ``shots + queries + 1`` ratings for the split.
        ValueError: ``request.pool`` is set (episode pools are for synthetic families).
    """
    _refuse_pool(name, request)
    shots, queries, seed = request.shots, request.queries, request.seed
    counts = np.bincount(ratings.users, minlength=ratings.n_users)
    min_ratings = shots + queries + 1
    eligible = np.flatnonzero(counts >= min_ratings)
    skipped = ratings.n_users - int(eligible.shape[0])
    need = request.n_test + (1 if request.n_train is None else request.n_train)
    if eligible.shape[0] < need:
        raise DataError(
            f"{ratings.source}: only {eligible.shape[0]} of {ratings.n_users} users have at "
            f"least shots + queries + 1 = {min_ratings} ratings, but n_test={request.n_test} "
            f"plus n_train={request.n_train if request.n_train is not None else 'at least 1'} "
            f"needs {need}; lower shots, queries, n_test or n_train."
        )
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SPLIT_USERS,)))
    order = rng.permutation(eligible)
    test_users = np.sort(order[: request.n_test])
    rest = order[request.n_test :]
    train_users = np.sort(rest if request.n_train is None else rest[: request.n_train])

    is_train = np.zeros(ratings.n_users, dtype=bool)
    is_train[train_users] = True
    train_values = ratings.values[is_train[ratings.users]]
    mu = float(train_values.mean())
    sigma = float(train_values.std())
    if not sigma > 0:
        sigma = 1.0  # all training ratings equal: centre only
    feats = item_features(ratings, train_users, mu, seed)
    x_all = torch.from_numpy(feats.features).to(request.dtype)
    y_all = torch.from_numpy((ratings.values - mu) / sigma).to(request.dtype).unsqueeze(1)

    by_user = np.argsort(ratings.users, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    item_of = torch.from_numpy(ratings.items)

    def task(u: int) -> Task:
        own = by_user[starts[u] : starts[u + 1]]
        rng_u = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PER_USER, u)))
        idx = torch.from_numpy(own[rng_u.permutation(own.shape[0])])
        x, y = x_all[item_of[idx]], y_all[idx]
        a, b = shots, shots + queries
        return Task(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:])

    train = TaskSet([task(int(u)) for u in train_users])
    test = TaskSet([task(int(u)) for u in test_users])
    n_points = counts[test_users] - shots - queries
    info: dict[str, Any] = {
        "family": name,
        **request.as_info(),
        "source": ratings.source,
        "n_users": ratings.n_users,
        "n_items": ratings.n_items,
        "n_ratings": int(ratings.values.shape[0]),
        "min_ratings": min_ratings,
        "skipped_users": skipped,
        "eligible_users": int(eligible.shape[0]),
        "n_train": int(train_users.shape[0]),
        "unused_users": int(rest.shape[0] - train_users.shape[0]),
        "rating_mean": mu,
        "rating_std": sigma,
        "n_components": int(feats.features.shape[1]),
        "null_components": feats.null_components,
        "feature_mean": feats.mean.tolist(),
        "feature_std": feats.std.tolist(),
        "singular_values": feats.singular_values.tolist(),
        "train_items": feats.train_items,
        "test_user_ids": ratings.user_ids[test_users].tolist(),
        "test_points": {
            "total": int(n_points.sum()),
            "min": int(n_points.min()),
            "max": int(n_points.max()),
        },
        **(extra_info or {}),
    }
    return TaskFamily(
        name=name, input_dim=int(feats.features.shape[1]), train=train, test=test, info=info
    )


_READERS: dict[str, Callable[[list[Path]], Ratings]] = {
    "movielens-100k": lambda files: read_movielens_100k(files[0]),
    "movielens-1m": lambda files: read_movielens_1m(files[0]),
    "jester-1": read_jester,
}


def build_collaborative(name: str, request: FamilyRequest) -> TaskFamily:
    """Locate (downloading if allowed), read and build a collaborative-filtering family.

    Args:
        name: ``"movielens-100k"``, ``"movielens-1m"`` or ``"jester-1"``.
        request: Validated arguments of :func:`amaml.tasks.make_family`.

    Raises:
        DataError: The data is missing (and ``download`` is off), or malformed.
        ValueError: ``request.pool`` is set (episode pools are for synthetic families).
    """
    _refuse_pool(name, request)
    root = default_root() if request.root is None else request.root
    files, tried = find_data_files(name, root)
    if not files and request.download:
        download_family(name, root)
        files, tried = find_data_files(name, root)
    if not files:
        urls = ", ".join(a.url for a in ARCHIVES.get(name, ()))
        raise DataError(
            f"No {name} data found (tried {', '.join(map(str, tried))}); pass download=True "
            "(--download on the command line) "
            f"to fetch the official archive ({urls}) into {root}, or extract it there yourself."
        )
    ratings = _READERS[name](files)
    return family_from_ratings(ratings, request, name, {"files": [str(p) for p in files]})
