"""Ratings in long form, read from the official files of MovieLens and Jester.

Readers of the official layouts:

* ``movielens-100k``: ``u.data``, tab-separated ``user item rating timestamp``;
* ``movielens-1m``: ``ratings.dat``, ``user::item::rating::timestamp``;
* ``jester-1``: Jester dataset 1, ``jester-data-1.xls`` (and ``-2``, ``-3`` when present),
  one row per user ``[n_rated, rating_1, ..., rating_100]`` with ``99`` = not rated and
  ratings in ``[-10, 10]``; a ``jester-data-*.csv`` with the same rows is read instead of
  the ``.xls`` of the same name when both exist.

:func:`find_data_files` locates them under ``root``, the dataset's own folder or a folder
holding it (``root/ml-100k/u.data``, ``root/ml-1m/ratings.dat``,
``root/jester-1/jester-data-1.xls``). Every malformed file raises a :class:`DataError`
naming the file, the line and the fix.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._extras import MissingExtraError, import_extra
from .base import DataError

__all__ = [
    "JESTER_MISSING",
    "Ratings",
    "find_data_files",
    "read_jester",
    "read_movielens_100k",
    "read_movielens_1m",
]

#: Jester's marker of a missing rating.
JESTER_MISSING = 99.0

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
        xlrd = import_extra("xlrd", f"Reading {path}")
    except MissingExtraError as exc:
        raise DataError(f"{exc}, or save the sheet as a .csv with the same rows.") from exc
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
