"""Download, verify and extract the official archives of the collaborative-filtering data
and of Omniglot.

Only :mod:`urllib` is used. An archive is fetched into a temporary file in the target
folder, its checksum verified, and only then renamed into place; extraction goes through a
temporary folder as well, so a failed or interrupted download leaves no partial data
behind.

Where the data comes from can be changed without editing code:

* ``ARCHIVES`` is a module-level table ``family -> tuple of Archive``; replace an entry
  (e.g. with :func:`dataclasses.replace`) to change a URL or checksum;
* the environment variable ``AMAML_DATA_MIRROR`` (a base URL) makes every archive be
  fetched from ``<mirror>/<archive file name>`` instead of its official URL.

Checksum sources:

* MovieLens: MD5 values published by GroupLens beside each archive
  (``ml-100k.zip.md5``, ``ml-1m.zip.md5``), the same values torchtext and many loaders pin.
* Jester dataset 1: SHA-256 values recorded by two independent third-party loaders from
  the Berkeley archive (the Eigentaste site publishes no checksum); file sizes 4,171,628,
  3,924,205 and 2,151,299 bytes.

* Omniglot's full archives (``images_background.zip``, ``images_evaluation.zip``): none.
  They are listed apart, in ``UNVERIFIED_ARCHIVES``, because no checksum could be computed
  where this table was written (no network) and its authors publish none; they are
  downloaded from the authors' GitHub repository with a warning that nothing was
  verified. Pin one by moving the entry to ``ARCHIVES`` with its SHA-256.
* Omniglot's minimal background splits (``images_background_small1.zip``,
  ``images_background_small2.zip``) and its one-shot test (``all_runs.zip``), from the
  same repository: SHA-256 values computed here from copies of those files (sizes
  1,319,022, 1,580,917 and 352,787 bytes); the authors publish none.

An archive whose table entry has no checksum is still downloaded, with a warning.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .base import DataError

__all__ = [
    "ARCHIVES",
    "CACHE_ENV",
    "MIRROR_ENV",
    "UNVERIFIED_ARCHIVES",
    "Archive",
    "archive_url",
    "default_root",
    "download_family",
]

#: Environment variable naming the data cache folder (default ``~/.cache/amaml``).
CACHE_ENV = "AMAML_DATA"
#: Environment variable with a base URL that replaces the official download sites.
MIRROR_ENV = "AMAML_DATA_MIRROR"

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    """One downloadable archive.

    Attributes:
        filename: File name of the archive, e.g. ``"ml-100k.zip"``; also the name used
            under a mirror (``AMAML_DATA_MIRROR``).
        url: Official URL.
        subdir: Folder (under the data root) that extraction must produce or fill.
        md5: Expected MD5 hex digest, or ``None``.
        sha256: Expected SHA-256 hex digest, or ``None`` (checked in preference to MD5).
    """

    filename: str
    url: str
    subdir: str
    md5: str | None = None
    sha256: str | None = None


_GROUPLENS = "https://files.grouplens.org/datasets/movielens/"
_OMNIGLOT = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
_SMALL1 = Archive(
    "images_background_small1.zip",
    _OMNIGLOT + "images_background_small1.zip",
    "images_background_small1",
    sha256="f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
)
_SMALL2 = Archive(
    "images_background_small2.zip",
    _OMNIGLOT + "images_background_small2.zip",
    "images_background_small2",
    sha256="3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
)
_EIGENTASTE = "https://eigentaste.berkeley.edu/dataset/archive/"

#: Official archives of each collaborative-filtering family, of Omniglot's minimal
#: background families and of its one-shot test (``omniglot-runs``: ``all_runs.zip``,
#: whose runs ``run01 .. run20`` extract into ``all_runs/``).
ARCHIVES: dict[str, tuple[Archive, ...]] = {
    "movielens-100k": (
        Archive(
            "ml-100k.zip",
            _GROUPLENS + "ml-100k.zip",
            "ml-100k",
            md5="0e33842e24a9c977be4e0107933c0723",
        ),
    ),
    "movielens-1m": (
        Archive(
            "ml-1m.zip", _GROUPLENS + "ml-1m.zip", "ml-1m", md5="c4d9eecfca2ab87c1945afe126590906"
        ),
    ),
    "jester-1": (
        Archive(
            "jester_dataset_1_1.zip",
            _EIGENTASTE + "jester_dataset_1_1.zip",
            "jester-1",
            sha256="cb7841756ded125b15f3d95c9f8241224065e96354c132a46ae4214deeab7615",
        ),
        Archive(
            "jester_dataset_1_2.zip",
            _EIGENTASTE + "jester_dataset_1_2.zip",
            "jester-1",
            sha256="4d312fd824d8c8cb2c9c952a7b1fb7c00d1f5fd3ece370f7285aa701d371748b",
        ),
        Archive(
            "jester_dataset_1_3.zip",
            _EIGENTASTE + "jester_dataset_1_3.zip",
            "jester-1",
            sha256="7f548d3762d3506cf7cd37d8cb9e3adb67984a7da7aa2d2096d5e0b1b884758d",
        ),
    ),
    "omniglot-small1": (_SMALL1,),
    "omniglot-small2": (_SMALL2,),
    "omniglot-minimal": (_SMALL1, _SMALL2),
    "omniglot-runs": (
        Archive(
            "all_runs.zip",
            _OMNIGLOT + "all_runs.zip",
            "all_runs",
            sha256="437c1eeab0af8484112e1b4cc0f3d541ec727f7c47b9b202da738af9dfd6c325",
        ),
    ),
}



#: Official archives whose checksum is not known (see the module docstring): downloaded
#: with a warning that they were not verified. Each extracts to its own top folder.
UNVERIFIED_ARCHIVES: dict[str, tuple[Archive, ...]] = {
    "omniglot": (
        Archive("images_background.zip", _OMNIGLOT + "images_background.zip", "images_background"),
        Archive("images_evaluation.zip", _OMNIGLOT + "images_evaluation.zip", "images_evaluation"),
    ),
}


def default_root() -> Path:
    """The data cache folder: ``$AMAML_DATA`` if set, else ``~/.cache/amaml``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "amaml"


def archive_url(archive: Archive) -> str:
    """Where ``archive`` is fetched from: the mirror in ``$AMAML_DATA_MIRROR``, else its URL."""
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        return mirror.rstrip("/") + "/" + archive.filename
    return archive.url


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, archive: Archive, url: str) -> None:
    """Check the checksum of a downloaded file; warn when none is known."""
    for algorithm, expected in (("sha256", archive.sha256), ("md5", archive.md5)):
        if expected:
            got = _digest(path, algorithm)
            if got.lower() != expected.lower():
                raise DataError(
                    f"Downloaded {archive.filename} from {url} has {algorithm.upper()} {got}, "
                    f"expected {expected}; the file was deleted: retry, or fetch the official "
                    f"archive {archive.url} yourself and extract it under the data root."
                )
            return
    warnings.warn(
        f"No checksum is known for {archive.filename}; it was downloaded from {url} "
        "without verification.",
        stacklevel=3,
    )


def _fetch(archive: Archive, dest: Path, timeout: float) -> None:
    """Download ``archive`` to ``dest`` via a temporary file; verify before renaming."""
    url = archive_url(archive)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{archive.filename}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    shutil.copyfileobj(response, out, _CHUNK)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                if isinstance(exc, urllib.error.HTTPError):
                    reason: object = f"HTTP {exc.code} {exc.reason}"
                else:
                    reason = getattr(exc, "reason", None) or exc
                raise DataError(
                    f"Could not download {archive.filename} from {url} ({reason}); check the "
                    f"network, or fetch the official archive {archive.url} yourself and "
                    f"extract it under {dest.parent}."
                ) from exc
        _verify(tmp, archive, url)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _safe_members(zf: zipfile.ZipFile, zip_path: Path) -> list[zipfile.ZipInfo]:
    members = zf.infolist()
    for info in members:
        p = PurePosixPath(info.filename)
        if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
            raise DataError(
                f"Archive {zip_path} holds an unsafe member path {info.filename!r}; it was "
                "not extracted: delete it and download the official archive again."
            )
    return members


def _extract(zip_path: Path, archive: Archive, root: Path) -> None:
    """Extract ``zip_path`` into ``root / archive.subdir`` through a temporary folder.

    An archive whose members all sit in one top folder named ``archive.subdir`` (the
    MovieLens layout) is extracted as is; otherwise (Jester: bare files) its members go
    into ``root / archive.subdir``. Files already there are replaced.
    """
    target = root / archive.subdir
    staging = Path(tempfile.mkdtemp(prefix=f".{archive.subdir}.", dir=root))
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                members = _safe_members(zf, zip_path)
                zf.extractall(staging, members=members)
        except (zipfile.BadZipFile, OSError) as exc:
            zip_path.unlink(missing_ok=True)
            raise DataError(
                f"Could not extract {zip_path} ({exc}); it was deleted: download again, or "
                f"extract the official archive {archive.url} yourself under {root}."
            ) from exc
        tops = {PurePosixPath(m.filename).parts[0] for m in members if m.filename.strip("/")}
        source = staging / archive.subdir if tops == {archive.subdir} else staging
        target.mkdir(parents=True, exist_ok=True)
        for item in sorted(source.iterdir()):
            dest = target / item.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(item, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_family(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    timeout: float = 60.0,
    force: bool = False,
) -> Path:
    """Download, verify and extract the official archive(s) of a family.

    Archives already present in ``root`` (from an earlier call) are verified again and
    reused unless ``force`` is set.

    Args:
        name: A family with an entry in :data:`ARCHIVES` or :data:`UNVERIFIED_ARCHIVES`,
            e.g. ``"movielens-100k"`` or ``"omniglot"``.
        root: Data root; ``None`` means :func:`default_root`.
        timeout: Seconds to wait for the server before giving up.
        force: Download even if the archive file is already present.

    Returns:
        The folder holding the extracted data, ``root / <subdir>``.

    Raises:
        ValueError: ``name`` has no archive or ``timeout`` is not positive.
        DataError: The server is unreachable, the checksum does not match (nothing is
            kept), or the archive cannot be extracted.
    """
    table = {**ARCHIVES, **UNVERIFIED_ARCHIVES}
    if name not in table:
        raise ValueError(f"No download is known for {name!r}; expected one of {sorted(table)}.")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}.")
    base = default_root() if root is None else Path(os.fspath(root)).expanduser()
    base.mkdir(parents=True, exist_ok=True)
    archives = table[name]
    for archive in archives:
        zip_path = base / archive.filename
        if force or not zip_path.is_file():
            _fetch(archive, zip_path, timeout)
        else:
            try:
                _verify(zip_path, archive, str(zip_path))
            except DataError:
                # A stale or corrupt earlier download: fetch it afresh.
                zip_path.unlink(missing_ok=True)
                _fetch(archive, zip_path, timeout)
        _extract(zip_path, archive, base)
    return base / archives[0].subdir
