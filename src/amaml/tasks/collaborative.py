"""Meta collaborative filtering: MovieLens-100K, MovieLens-1M and Jester-1, one task per user.

Loaders read the official layouts:

* ``movielens-100k``: ``u.data``, tab-separated ``user item rating timestamp``;
* ``movielens-1m``: ``ratings.dat``, ``user::item::rating::timestamp``;
* ``jester-1``: Jester dataset 1, ``jester-data-1.xls`` (and ``-2``, ``-3`` when present),
  one row per user ``[n_rated, rating_1, ..., rating_100]`` with ``99`` = not rated and
  ratings in ``[-10, 10]``; a ``jester-data-*.csv`` with the same rows is read instead of
  the ``.xls`` of the same name when both exist.

``root`` is the dataset's own folder or a folder holding it (``root/ml-100k/u.data``,
``root/ml-1m/ratings.dat``, ``root/jester-1/jester-data-1.xls``).

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

import io
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import DataError, FamilyRequest, Task, TaskFamily, TaskSet
from .download import ARCHIVES, default_root, download_family

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

#: Number of SVD item features (fewer when there are fewer items or training users).
N_COMPONENTS = 100
#: Above this size of the smaller matrix side the SVD is computed by randomised subspace
#: iteration instead of a full LAPACK SVD (MovieLens-1M: 3706 items, about 6000 users).
EXACT_SVD_MAX = 2000
#: Jester's marker of a missing rating.
JESTER_MISSING = 99.0

_SPLIT_USERS, _PER_USER, _SKETCH = 2, 3, 4

FloatArray = np.ndarray
IntArray = np.ndarray


@dataclass(frozen=True)
class Ratings:
    """All ratings of a data set in long form, users and items re-indexed densely.

    Attributes:
        users: ``[n_ratings]`` int64 user index in ``[0, n_users)``.
        items: ``[n_ratings]`` int64 item index in ``[0, n_items)``.
        values: ``[n_ratings]`` float64 ratings.
        user_ids: ``[n_users]`` original user ids (Jester: 1-based row number over the
            files in order), sorted.
        item_ids: ``[n_items]`` original item ids (Jester: 1-based joke number), sorted.
        source: What was read, for messages and ``info`` (file names).
    """

    users: IntArray
    items: IntArray
    values: FloatArray
    user_ids: IntArray
    item_ids: IntArray
    source: str

    @property
    def n_users(self) -> int:
        """Number of users."""
        return int(self.user_ids.shape[0])

    @property
    def n_items(self) -> int:
        """Number of items."""
        return int(self.item_ids.shape[0])

    @classmethod
    def from_triples(
        cls, user_ids: IntArray, item_ids: IntArray, values: FloatArray, source: str
    ) -> Ratings:
        """Build from parallel arrays of original ids and ratings.

        Raises:
            DataError: A (user, item) pair occurs twice, or a value is NaN or infinite.
        """
        values = np.asarray(values, dtype=np.float64)
        if not np.isfinite(values).all():
            raise DataError(f"{source} holds a NaN or infinite rating; fix or re-download it.")
        uid, users = np.unique(np.asarray(user_ids, dtype=np.int64), return_inverse=True)
        iid, items = np.unique(np.asarray(item_ids, dtype=np.int64), return_inverse=True)
        pair = users.astype(np.int64) * len(iid) + items
        if np.unique(pair).shape[0] != pair.shape[0]:
            _, first, counts = np.unique(pair, return_index=True, return_counts=True)
            k = first[np.argmax(counts > 1)]
            raise DataError(
                f"{source} rates item {iid[items[k]]} by user {uid[users[k]]} more than once; "
                "each (user, item) pair must occur once: fix or re-download the file."
            )
        return cls(users.astype(np.int64), items.astype(np.int64), values, uid, iid, source)


# --------------------------------------------------------------------------- parsing


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"Cannot read {path} ({exc.strerror or exc}); check the path and permissions."
        ) from exc
    # latin-1 decodes any byte; the numeric layouts here are plain ASCII.
    return data.decode("latin-1")


def _fast_table(text: str, sep: str) -> FloatArray | None:
    """numpy's C parser on well-formed text; ``None`` when it cannot be trusted or fails."""
    if sep not in ("\t", ","):
        if "\t" in text:
            return None  # a tab would become a field separator: let the slow path report
        text = text.replace(sep, "\t")
        sep = "\t"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data"
            table = np.loadtxt(
                io.StringIO(text), delimiter=sep, dtype=np.float64, ndmin=2, comments=None
            )
    except ValueError:
        return None
    return table if table.size and np.isfinite(table).all() else None


def _parse_rows(path: Path, sep: str, n_cols: int | None, layout: str) -> FloatArray:
    """Parse a delimited numeric table into ``[rows, cols]`` float64.

    Well-formed files go through numpy's fast parser; any failure is re-parsed line by
    line to name the first offending line (1-based, blank lines counted) in the error.

    Args:
        path: The file, for messages.
        sep: Field separator.
        n_cols: Required number of fields per line, or ``None``: every line must have as
            many as the first.
        layout: Human description of the expected row, e.g. ``"user, item, rating,
            timestamp"``.
    """
    text = _read_text(path)
    table = _fast_table(text, sep)
    if table is not None and (n_cols is None or table.shape[1] == n_cols):
        return table
    numbered = [(k + 1, ln) for k, ln in enumerate(text.splitlines()) if ln.strip()]
    if not numbered:
        raise DataError(f"{path} is empty; expected rows of {layout}: re-download the file.")
    rows = [ln.split(sep) for _, ln in numbered]
    want = len(rows[0]) if n_cols is None else n_cols
    for (line_no, line), row in zip(numbered, rows, strict=True):
        if len(row) != want:
            raise DataError(
                f"{path} line {line_no} has {len(row)} fields separated by {sep!r}, expected "
                f"{want} ({layout}): {line[:80]!r}; is this the right file and layout?"
            )
    try:
        table = np.array(rows, dtype=np.float64)
    except ValueError:
        for (line_no, _), row in zip(numbered, rows, strict=True):
            for field in row:
                try:
                    float(field)
                except ValueError:
                    raise DataError(
                        f"{path} line {line_no} has a non-numeric field {field.strip()!r} "
                        f"(expected {layout}); fix or re-download the file."
                    ) from None
        raise  # pragma: no cover - numpy rejected what float() accepts
    bad = ~np.isfinite(table)
    if bad.any():
        line_no = numbered[int(np.argmax(bad.any(axis=1)))][0]
        raise DataError(
            f"{path} line {line_no} holds a NaN or infinite value; fix or re-download the file."
        )
    return table


def _check_integer_ids(path: Path, table: FloatArray, cols: Sequence[int], names: str) -> None:
    ids = table[:, list(cols)]
    bad = ids != np.round(ids)
    if bad.any():
        k = int(np.argmax(bad.any(axis=1)))
        raise DataError(
            f"{path} data row {k + 1} has a non-integer {names} id; expected integer ids in the "
            "first two columns: is this the right file?"
        )


def _read_movielens(path: Path, sep: str) -> Ratings:
    table = _parse_rows(path, sep, 4, "user, item, rating, timestamp")
    _check_integer_ids(path, table, (0, 1), "user or item")
    return Ratings.from_triples(table[:, 0], table[:, 1], table[:, 2], source=path.name)


def read_movielens_100k(path: str | os.PathLike[str]) -> Ratings:
    """Read MovieLens-100K ``u.data`` (tab-separated ``user item rating timestamp``).

    Raises:
        DataError: The file is missing, unreadable or malformed.
    """
    return _read_movielens(Path(path), "\t")


def read_movielens_1m(path: str | os.PathLike[str]) -> Ratings:
    """Read MovieLens-1M ``ratings.dat`` (``user::item::rating::timestamp``).

    Raises:
        DataError: The file is missing, unreadable or malformed.
    """
    return _read_movielens(Path(path), "::")


def _read_xls_table(path: Path) -> FloatArray:
    try:
        import xlrd
    except ImportError as exc:  # pragma: no cover - xlrd is a declared dependency
        raise DataError(
            f"Reading {path} needs the xlrd package: pip install xlrd, or save the sheet "
            "as a .csv with the same rows."
        ) from exc
    try:
        book = xlrd.open_workbook(str(path), on_demand=True)
        try:
            sheet = book.sheet_by_index(0)
            rows = [sheet.row_values(r) for r in range(sheet.nrows)]
        finally:
            book.release_resources()
    except Exception as exc:  # xlrd raises many types on a damaged or foreign file
        raise DataError(
            f"Cannot read {path} as an .xls workbook ({exc}); re-download the official "
            "Jester archive or save the sheet as a .csv with the same rows."
        ) from exc
    if not rows:
        raise DataError(f"{path} has an empty first sheet; re-download the Jester archive.")
    try:
        return np.array(rows, dtype=np.float64)
    except ValueError:
        for k, row in enumerate(rows):
            for c, cell in enumerate(row):
                if not isinstance(cell, (int, float)):
                    raise DataError(
                        f"{path} row {k + 1} column {c + 1} holds {cell!r}, not a number "
                        "(missing ratings must be 99); fix or re-download the file."
                    ) from None
        raise  # pragma: no cover


def read_jester(paths: Sequence[str | os.PathLike[str]]) -> Ratings:
    """Read Jester dataset 1 from one or more ``.xls`` or ``.csv`` files.

    Each row is one user, ``[n_rated, rating_1, ..., rating_J]`` (``J = 100`` in the
    official files), ``99`` meaning not rated, ratings in ``[-10, 10]``. Users are
    numbered by row over the files in the given order; the ``n_rated`` column is ignored.

    Raises:
        DataError: A file is unreadable, rows differ in length across files, a value is
            non-numeric, NaN/inf, or a rating lies outside ``[-10, 10]``.
    """
    files = [Path(p) for p in paths]
    if not files:
        raise DataError("read_jester needs at least one jester-data-*.xls or .csv file.")
    tables: list[FloatArray] = []
    for path in files:
        if path.suffix.lower() == ".csv":
            table = _parse_rows(path, ",", None, "n_rated followed by one rating per joke")
        else:
            table = _read_xls_table(path)
            if not np.isfinite(table).all():
                raise DataError(f"{path} holds a NaN or infinite value; re-download it.")
        if table.shape[1] < 2:
            raise DataError(
                f"{path} has {table.shape[1]} column(s); a Jester row is [n_rated, ratings...] "
                "with at least one rating column: is this the right file?"
            )
        if tables and table.shape[1] != tables[0].shape[1] + 1:
            raise DataError(
                f"{path} has {table.shape[1]} columns but {files[0]} has "
                f"{tables[0].shape[1] + 1}; all Jester files must share one layout."
            )
        ratings = table[:, 1:]
        bad = (ratings != JESTER_MISSING) & (np.abs(ratings) > 10.0)
        if bad.any():
            k, c = (int(v[0]) for v in np.nonzero(bad))
            raise DataError(
                f"{path} row {k + 1} column {c + 2} holds {ratings[k, c]:g}, outside [-10, 10] "
                "and not the missing marker 99: is this a Jester dataset 1 file?"
            )
        tables.append(ratings)
    matrix = np.concatenate(tables)
    user_rows, item_cols = np.nonzero(matrix != JESTER_MISSING)
    return Ratings.from_triples(
        user_rows + 1,
        item_cols + 1,
        matrix[user_rows, item_cols],
        source="+".join(p.name for p in files),
    )


# --------------------------------------------------------------------------- locating


def _jester_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        if (
            path.is_file()
            and path.stem.lower().startswith("jester-data-")
            and suffix in (".xls", ".csv")
        ):
            # A .csv beside the .xls of the same name is read instead: it is much faster.
            if path.stem not in by_stem or suffix == ".csv":
                by_stem[path.stem] = path
    return [by_stem[s] for s in sorted(by_stem)]


_SINGLE_FILES = {
    "movielens-100k": ("ml-100k", "u.data"),
    "movielens-1m": ("ml-1m", "ratings.dat"),
}


def find_data_files(name: str, root: str | os.PathLike[str]) -> tuple[list[Path], list[Path]]:
    """Locate a family's data files under ``root``.

    Args:
        name: ``"movielens-100k"``, ``"movielens-1m"`` or ``"jester-1"``.
        root: The dataset's own folder or a folder holding it.

    Returns:
        ``(files, tried)``: the files found (empty if none) and the paths looked at.
    """
    base = Path(os.fspath(root)).expanduser()
    if name in _SINGLE_FILES:
        sub, fname = _SINGLE_FILES[name]
        tried = [base / fname, base / sub / fname]
        return [p for p in tried if p.is_file()][:1], tried
    if name == "jester-1":
        tried = [base / "jester-data-*.xls|csv", base / "jester-1" / "jester-data-*.xls|csv"]
        for folder in (base, base / "jester-1"):
            files = _jester_files(folder)
            if files:
                return files, tried
        return [], tried
    raise ValueError(f"No data files are known for family {name!r}.")


# --------------------------------------------------------------------------- features


def _fix_signs(v: FloatArray) -> FloatArray:
    """Make each column's largest-magnitude entry positive (SVD signs are arbitrary)."""
    pivot = v[np.argmax(np.abs(v), axis=0), np.arange(v.shape[1])]
    return v * np.where(pivot < 0, -1.0, 1.0)


def _top_right_singular(
    rows: IntArray,
    cols: IntArray,
    values: FloatArray,
    shape: tuple[int, int],
    k: int,
    seed: int,
) -> tuple[FloatArray, FloatArray]:
    """Top-``k`` singular values and right singular vectors ``[n_cols, k]`` of a sparse matrix.

    The matrix has ``values`` at ``(rows, cols)`` and zeros elsewhere. When its smaller side
    is at most :data:`EXACT_SVD_MAX` the SVD is exact, from the eigendecomposition of the
    Gram matrix of that side (much faster than LAPACK's SVD on these shapes; singular values
    below ``1e-7`` of the largest lose accuracy, and :func:`item_features` treats them as
    zero). Otherwise randomised subspace iteration (Halko, Martinsson and Tropp 2011,
    Alg. 4.4) with 50 extra directions and 10 power iterations on sparse products, seeded
    by ``seed``, recovers the leading components (MovieLens-1M) in seconds.
    """
    n_rows, n_cols = shape
    if min(shape) <= EXACT_SVD_MAX:
        dense = torch.zeros(shape, dtype=torch.float64)
        dense[torch.from_numpy(rows), torch.from_numpy(cols)] = torch.from_numpy(values)
        if n_rows <= n_cols:
            w, u = torch.linalg.eigh(dense @ dense.T)
            w, u = w.flip(0)[:k], u.flip(1)[:, :k]
            s = w.clamp_min(0).sqrt()
            v = (dense.T @ u) / torch.where(s > 0, s, 1.0)
        else:
            w, v = torch.linalg.eigh(dense.T @ dense)
            w, v = w.flip(0)[:k], v.flip(1)[:, :k]
            s = w.clamp_min(0).sqrt()
        return s.numpy(), v.numpy()
    idx = torch.from_numpy(np.stack([rows, cols]))
    vals = torch.from_numpy(values)
    mat = torch.sparse_coo_tensor(idx, vals, shape, check_invariants=True).coalesce()
    mat_t = torch.sparse_coo_tensor(idx.flip(0), vals, (n_cols, n_rows), check_invariants=True)
    mat_t = mat_t.coalesce()
    width = min(k + 50, n_rows, n_cols)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(n_cols, width, dtype=torch.float64, generator=gen)
    q, _ = torch.linalg.qr(torch.sparse.mm(mat, omega))
    for _ in range(10):
        z, _ = torch.linalg.qr(torch.sparse.mm(mat_t, q))
        q, _ = torch.linalg.qr(torch.sparse.mm(mat, z))
    _, s, vt = torch.linalg.svd(torch.sparse.mm(mat_t, q).T, full_matrices=False)
    return s[:k].numpy(), vt[:k].T.numpy()


@dataclass(frozen=True)
class ItemFeatures:
    """Item features from a truncated SVD (see :func:`item_features`).

    Attributes:
        features: ``[n_items, k]`` standardised features, the model inputs.
        mean: ``[k]`` mean of the raw right singular vectors over the training items.
        std: ``[k]`` their standard deviation (1 for a null component).
        singular_values: ``[k]`` leading singular values of the centred training matrix.
        null_components: How many components had a negligible singular value (set to 0).
        train_items: How many items the training users rated.
    """

    features: FloatArray
    mean: FloatArray
    std: FloatArray
    singular_values: FloatArray
    null_components: int
    train_items: int


def item_features(
    ratings: Ratings,
    train_users: IntArray,
    rating_mean: float,
    seed: int,
    n_components: int = N_COMPONENTS,
) -> ItemFeatures:
    """SVD item features from the ratings of ``train_users`` only.

    Args:
        ratings: All ratings.
        train_users: Dense indices of the users whose ratings may be used.
        rating_mean: Their mean rating (the centring).
        seed: Seeds the randomised SVD of large matrices.
        n_components: Requested number of features.

    Returns:
        Features ``[n_items, k]`` with ``k = min(n_components, n_items, len(train_users))``,
        standardised per feature over the items that training users rated. A component
        with a negligible singular value (rank deficiency) is set to 0.
    """
    row_of = np.full(ratings.n_users, -1, dtype=np.int64)
    row_of[train_users] = np.arange(train_users.shape[0])
    keep = row_of[ratings.users] >= 0
    shape = (int(train_users.shape[0]), ratings.n_items)
    k = min(n_components, *shape)
    sketch_seed = int(np.random.SeedSequence(seed, spawn_key=(_SKETCH,)).generate_state(1)[0])
    s, v = _top_right_singular(
        row_of[ratings.users[keep]],
        ratings.items[keep],
        ratings.values[keep] - rating_mean,
        shape,
        k,
        sketch_seed,
    )
    v = _fix_signs(v)
    rated = np.zeros(ratings.n_items, dtype=bool)
    rated[ratings.items[keep]] = True
    mean = v[rated].mean(axis=0)
    std = v[rated].std(axis=0)
    # Negligible singular values span noise, not data: those features are set to 0.
    scale = s[0] if s.size else 0.0
    null = (s <= scale * 1e-6) | (std <= 1e-12)
    std = np.where(null, 1.0, std)
    mean = np.where(null, 0.0, mean)
    feats = (v - mean) / std
    feats[:, null] = 0.0
    return ItemFeatures(feats, mean, std, s, int(null.sum()), int(rated.sum()))


# --------------------------------------------------------------------------- tasks


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
    """
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
    """
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
