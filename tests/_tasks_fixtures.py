"""Tiny data files in the official layouts, and a local HTTP server, for the task tests.

Nothing here touches real data or the network beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import struct
import threading
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

Triple = tuple[int, int, float]


def random_ratings(
    n_users: int,
    n_items: int,
    *,
    seed: int,
    low: int = 12,
    high: int = 30,
    scale: tuple[float, float] = (1.0, 5.0),
    integer: bool = True,
    first_id: int = 1,
) -> list[Triple]:
    """Ratings ``(user, item, value)``: user ``u`` rates between ``low`` and ``high`` items.

    Values follow a low-rank model plus noise, clipped to ``scale`` (rounded when
    ``integer``), so the SVD features carry some signal.
    """
    rng = np.random.default_rng(seed)
    users = rng.normal(size=(n_users, 3))
    items = rng.normal(size=(n_items, 3))
    lo, hi = scale
    out: list[Triple] = []
    for u in range(n_users):
        n = int(rng.integers(low, high + 1))
        for i in sorted(rng.choice(n_items, size=min(n, n_items), replace=False)):
            raw = (lo + hi) / 2 + (hi - lo) / 4 * (users[u] @ items[i] / 2 + rng.normal(0, 0.3))
            val = float(np.clip(raw, lo, hi))
            out.append((u + first_id, int(i) + first_id, float(round(val)) if integer else val))
    return out


def write_u_data(folder: Path, triples: Sequence[Triple]) -> Path:
    """MovieLens-100K ``u.data``: ``user<TAB>item<TAB>rating<TAB>timestamp``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "u.data"
    path.write_text(
        "".join(f"{u}\t{i}\t{int(r)}\t{881250949 + k}\n" for k, (u, i, r) in enumerate(triples))
    )
    return path


def write_ratings_dat(folder: Path, triples: Sequence[Triple]) -> Path:
    """MovieLens-1M ``ratings.dat``: ``user::item::rating::timestamp``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ratings.dat"
    path.write_text(
        "".join(f"{u}::{i}::{int(r)}::{978300760 + k}\n" for k, (u, i, r) in enumerate(triples))
    )
    return path


def jester_matrix(triples: Sequence[Triple], n_users: int, n_items: int) -> np.ndarray:
    """Jester rows ``[n_rated, r_1 .. r_n_items]`` with 99 for not rated (ids 1-based)."""
    mat = np.full((n_users, n_items), 99.0)
    for u, i, r in triples:
        mat[u - 1, i - 1] = r
    n_rated = (mat != 99.0).sum(axis=1, keepdims=True).astype(float)
    return np.concatenate([n_rated, mat], axis=1)


def write_jester_csv(path: Path, rows: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(",".join(f"{v:g}" for v in row) + "\n" for row in rows))
    return path


# --------------------------------------------------------------------------- .xls (BIFF8)
# A minimal writer: an OLE2 compound file holding one "Workbook" stream with one sheet of
# NUMBER records, which is all xlrd needs to read the Jester layout.

_SECTOR = 512
_FREE, _END, _FATSECT = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD


def _record(code: int, data: bytes = b"") -> bytes:
    return struct.pack("<HH", code, len(data)) + data


def _biff_workbook(rows: np.ndarray) -> bytes:
    def bof(kind: int) -> bytes:
        return _record(0x0809, struct.pack("<HHHHII", 0x0600, kind, 0x0DBB, 0x07CC, 0, 6))

    name = b"Sheet1"
    globals_head = bof(0x0005) + _record(0x0042, struct.pack("<H", 1200))  # CODEPAGE utf-16
    xf = _record(0x00E0, bytes(20))  # one default cell format (General -> number)
    boundsheet_len = 4 + 8 + len(name)
    sheet_offset = len(globals_head) + len(xf) + boundsheet_len + 4  # + EOF record
    boundsheet = _record(0x0085, struct.pack("<IBBBB", sheet_offset, 0, 0, len(name), 0) + name)
    globals_part = globals_head + xf + boundsheet + _record(0x000A)
    assert len(globals_part) == sheet_offset
    n_rows, n_cols = rows.shape
    cells = b"".join(
        _record(0x0203, struct.pack("<HHHd", r, c, 0, float(rows[r, c])))
        for r in range(n_rows)
        for c in range(n_cols)
        if not np.isnan(rows[r, c])  # NaN marks an empty cell
    )
    sheet = (
        bof(0x0010)
        + _record(0x0200, struct.pack("<IIHHH", 0, n_rows, 0, n_cols, 0))
        + cells
        + _record(0x000A)
    )
    return globals_part + sheet


def _compound_file(stream_name: str, payload: bytes) -> bytes:
    # Streams under 4096 bytes would live in the mini-stream: pad to stay a regular stream.
    payload = payload.ljust(max(4096, -(-len(payload) // _SECTOR) * _SECTOR), b"\0")
    n_data = len(payload) // _SECTOR
    n_fat = 1
    while n_fat * (_SECTOR // 4) < n_data + 1 + n_fat:
        n_fat += 1
    assert n_fat <= 109, "fixture workbook too large for a header-only DIFAT"
    dir_sid = n_data
    fat_sids = list(range(n_data + 1, n_data + 1 + n_fat))
    fat = [k + 1 for k in range(n_data - 1)] + [_END, _END] + [_FATSECT] * n_fat
    fat += [_FREE] * (n_fat * _SECTOR // 4 - len(fat))

    def entry(name: str, kind: int, child: int, start: int, size: int) -> bytes:
        raw = name.encode("utf-16-le") + b"\0\0" if name else b""
        return (
            raw.ljust(64, b"\0")
            + struct.pack("<HBB", len(raw), kind, 1)
            + struct.pack("<III", _FREE, _FREE, child)
            + bytes(16 + 4 + 16)
            + struct.pack("<III", start, size, 0)
        )

    directory = (
        entry("Root Entry", 5, 1, _END, 0)
        + entry(stream_name, 2, _FREE, 0, len(payload))
        + entry("", 0, _FREE, _FREE, 0) * 2
    )
    header = (
        bytes.fromhex("D0CF11E0A1B11AE1")
        + bytes(16)
        + struct.pack("<HHHHH", 0x003E, 0x0003, 0xFFFE, 9, 6)
        + bytes(6)
        + struct.pack("<IIIIIIIII", 0, n_fat, dir_sid, 0, 4096, _END, 0, _END, 0)
        + struct.pack("<109I", *(fat_sids + [_FREE] * (109 - n_fat)))
    )
    assert len(header) == _SECTOR
    return header + payload + directory + struct.pack(f"<{len(fat)}I", *fat)


def write_xls(path: Path, rows: np.ndarray) -> Path:
    """Write a numeric matrix as a one-sheet ``.xls`` (NaN = empty cell)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_compound_file("Workbook", _biff_workbook(np.asarray(rows, float))))
    return path


# --------------------------------------------------------------------------- zips, server


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@contextlib.contextmanager
def local_http_server(folder: Path) -> Iterator[str]:
    """Serve ``folder`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 array ``[H, W]`` (grey) or ``[H, W, 3]`` (RGB)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_omniglot(
    root: Path, alphabets: dict[str, dict[str, int]], *, size: int = 20, seed: int = 0
) -> Path:
    """The official Omniglot layout with tiny PNGs, black ink on white as the original.

    Args:
        root: Folder to hold ``images_background/`` and ``images_evaluation/``.
        alphabets: ``"<images_background|images_evaluation>/<alphabet>"`` ->
            ``{character: number of drawers}``; each character gets its own random
            blob pattern, each drawer a slight variation of it.
        size: Image side (the loader resizes to 28).

    Returns:
        ``root``.
    """
    rng = np.random.default_rng(seed)
    for sub in ("images_background", "images_evaluation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for alphabet, characters in alphabets.items():
        for character, drawers in characters.items():
            folder = root / alphabet / character
            folder.mkdir(parents=True, exist_ok=True)
            pattern = rng.random((size, size)) < 0.25
            for k in range(drawers):
                ink = pattern ^ (rng.random((size, size)) < 0.03)
                img = np.where(ink, 0, 255).astype(np.uint8)
                (folder / f"{character}_{k + 1:02d}.png").write_bytes(_png(img))
    return root


def write_mini_imagenet(
    root: Path,
    splits: Mapping[str, Sequence[str]],
    *,
    per_class: int = 4,
    size: int = 84,
    seed: int = 0,
) -> Path:
    """The Ravi-Larochelle layout: ``<split>.csv`` (``filename,label``) and ``images/``.

    Args:
        root: The mini-ImageNet folder.
        splits: ``"train"``/``"val"``/``"test"`` -> labels, e.g. ``["n01", "n02"]``.
        per_class: Images per label, each a random RGB image of side ``size``.

    Returns:
        ``root``.
    """
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for split, labels in splits.items():
        lines = ["filename,label"]
        for label in labels:
            for k in range(per_class):
                name = f"{label}{k:08d}.png"
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                (images / name).write_bytes(_png(pixels))
                lines.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root
