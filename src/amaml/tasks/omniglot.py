"""Omniglot's "minimal" background splits, read from their zip archives or extracted.

Lake et al. (2015) published, beside the 30 background alphabets, two small background
sets of 5 alphabets each, ``images_background_small1.zip`` and
``images_background_small2.zip`` (the data set's repository, folder ``python/``)::

    <root>/images_background_small1.zip   (or the folder images_background_small1/)
        images_background_small1/<alphabet>/<characterNN>/<id>_<drawer>.png

(``<root>`` may also be a folder holding ``omniglot/``). The two share Greek and Latin,
file for file, so their union has 8 alphabets and 242 characters. Three families read them:

* ``omniglot-small1``: small1's 5 alphabets (136 characters);
* ``omniglot-small2``: small2's 5 alphabets (156 characters);
* ``omniglot-minimal``: their union (242 characters).

Alphabets are sorted by name; the last :data:`HELD_OUT_ALPHABETS` of each family (Latin;
Tagalog; Sanskrit and Tagalog) are held out of meta-training and give the family's
meta-test episodes (validation: the evaluation alphabets of Omniglot's own one-shot test
are in :mod:`amaml.tasks.lake_runs`). Every image is read as the full Omniglot is
(:mod:`amaml.tasks.images`): resized to 28 x 28 (Lanczos) and inverted, so ink is 1; each
character in 4 rotations (0, 90, 180, 270 degrees) is 4 classes, 20 images each.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .base import DataError, FamilyRequest, TaskFamily
from .classification import build_classification
from .download import ARCHIVES, default_root, download_family
from .episodic import AbstractClassSource, Rotated

__all__ = [
    "HELD_OUT_ALPHABETS",
    "MINIMAL_SPLITS",
    "PngStore",
    "StoredPngClasses",
    "build_omniglot_minimal",
    "decode_png",
    "read_minimal",
]

#: Family name -> the archives (without ``.zip``) whose alphabets it reads.
MINIMAL_SPLITS: dict[str, tuple[str, ...]] = {
    "omniglot-small1": ("images_background_small1",),
    "omniglot-small2": ("images_background_small2",),
    "omniglot-minimal": ("images_background_small1", "images_background_small2"),
}

#: Family name -> alphabets (the last in sorted order) held out as its meta-test split.
HELD_OUT_ALPHABETS: dict[str, int] = {
    "omniglot-small1": 1,
    "omniglot-small2": 1,
    "omniglot-minimal": 2,
}


def decode_png(data: bytes, size: int | None = None) -> np.ndarray:
    """A PNG as a ``[1, H, W]`` uint8 grey array, resized (Lanczos) to ``size`` if given.

    Raises:
        DataError: The bytes are not a readable image.
    """
    from PIL import Image, UnidentifiedImageError  # Pillow, a dependency of matplotlib

    try:
        with Image.open(io.BytesIO(data)) as raw:
            img = raw.convert("L")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.uint8)[None]
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"Cannot decode a PNG ({exc}); re-download the archive.") from exc


@dataclass
class PngStore:
    """Files under one top folder, read from ``<root>/<top>/`` if it exists, else from
    ``<root>/<top>.zip`` (members ``<top>/...``).

    Attributes:
        root: The data folder.
        top: The archive's top folder, e.g. ``"images_background_small1"``.
    """

    root: Path
    top: str
    _zip: zipfile.ZipFile | None = field(default=None, repr=False, compare=False)

    @property
    def folder(self) -> Path:
        return self.root / self.top

    @property
    def archive(self) -> Path:
        return self.root / f"{self.top}.zip"

    def exists(self) -> bool:
        """Whether the folder or the archive is there."""
        return self.folder.is_dir() or self.archive.is_file()

    def names(self) -> list[str]:
        """Every file, as a path relative to ``top`` with ``/`` separators, sorted.

        Raises:
            DataError: Neither the folder nor a readable archive is there.
        """
        if self.folder.is_dir():
            return sorted(p.relative_to(self.folder).as_posix()
                          for p in self.folder.rglob("*") if p.is_file())
        prefix = self.top + "/"
        return sorted(n[len(prefix):] for n in self._open().namelist()
                      if n.startswith(prefix) and not n.endswith("/"))

    def read(self, name: str) -> bytes:
        """The bytes of file ``name`` (as :meth:`names` lists it)."""
        if self.folder.is_dir():
            return (self.folder / name).read_bytes()
        try:
            return self._open().read(f"{self.top}/{name}")
        except (KeyError, zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"Cannot read {name} from {self.archive} ({exc}); re-download "
                            "the archive.") from exc

    def _open(self) -> zipfile.ZipFile:
        if self._zip is None:
            try:
                self._zip = zipfile.ZipFile(self.archive)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(f"Cannot open {self.archive} ({exc}); re-download it "
                                "(--download) or extract it there.") from exc
        return self._zip


@dataclass(frozen=True)
class StoredPngClasses(AbstractClassSource):
    """Classes given as lists of PNG files of a :class:`PngStore`, decoded on first use,
    resized to ``size`` and inverted (black ink on white becomes 1); cached as uint8.

    Args:
        store: Where the files are.
        files: One tuple of file names per class.
        size: Side every image is resized to.
    """

    store: PngStore
    files: tuple[tuple[str, ...], ...]
    size: int = 28
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def image_shape(self) -> tuple[int, int, int]:  # type: ignore[override]
        return (1, self.size, self.size)

    @property
    def n_classes(self) -> int:
        return len(self.files)

    def n_samples(self, cls: int) -> int:
        return len(self.files[cls])

    def images(self, cls: int, samples: np.ndarray) -> np.ndarray:
        if cls not in self._cache:  # a class's 20 images are decoded together
            self._cache[cls] = np.stack([decode_png(self.store.read(n), self.size)
                                         for n in self.files[cls]])
        out = self._cache[cls][np.asarray(samples, dtype=np.int64)].astype(np.float32)
        return 1.0 - out / 255.0


def _find_root(root: Path, tops: tuple[str, ...]) -> Path | None:
    for base in (root, root / "omniglot"):
        if all(PngStore(base, top).exists() for top in tops):
            return base
    return None


def read_minimal(folder: str | os.PathLike[str], tops: tuple[str, ...]
                 ) -> list[tuple[str, str, tuple[str, ...]]]:
    """List the characters of some minimal splits, sorted by ``"<alphabet>/<character>"``.

    A character present in several splits (Greek and Latin are in both) is listed once,
    read from the first split that has it.

    Args:
        folder: The folder holding the archives (or their extracted folders).
        tops: Archive names without ``.zip``, e.g. ``("images_background_small1",)``.

    Returns:
        ``[(alphabet, top, pngs), ...]``, one entry per character; ``pngs`` are the file
        names (relative to ``top``) of its images, sorted.

    Raises:
        DataError: An archive is missing or holds no character with PNG images.
    """
    base = Path(os.fspath(folder))
    found: dict[str, tuple[str, str, list[str]]] = {}
    for top in tops:
        store = PngStore(base, top)
        if not store.exists():
            raise DataError(f"Neither {store.archive} nor {store.folder} is there; "
                            "--download fetches it.")
        characters: dict[str, list[str]] = {}
        for name in store.names():
            parts = PurePosixPath(name).parts
            if len(parts) == 3 and name.endswith(".png"):
                characters.setdefault(f"{parts[0]}/{parts[1]}", []).append(name)
        if not characters:
            raise DataError(f"{store.archive if not store.folder.is_dir() else store.folder} "
                            "holds no <alphabet>/<character>/*.png; re-download it.")
        for key, pngs in characters.items():
            found.setdefault(key, (key.split("/")[0], top, sorted(pngs)))
    return [(a, top, tuple(p)) for _, (a, top, p) in sorted(found.items())]


def build_omniglot_minimal(name: str, request: FamilyRequest) -> TaskFamily:
    """Locate (downloading if allowed), list and build a minimal-background family.

    Meta-training classes are the characters of all but the last
    :data:`HELD_OUT_ALPHABETS` alphabets (sorted by name), in 4 rotations; meta-test
    classes those of the held-out alphabets.

    Raises:
        ValueError: ``name`` is not in :data:`MINIMAL_SPLITS`; as
            :func:`~amaml.tasks.classification.build_classification`.
        DataError: The archives are missing (and ``download`` is off) or malformed.
    """
    if name not in MINIMAL_SPLITS:
        raise ValueError(f"Unknown minimal Omniglot family {name!r}; expected one of "
                         f"{sorted(MINIMAL_SPLITS)}.")
    tops = MINIMAL_SPLITS[name]
    root = default_root() if request.root is None else request.root
    folder = _find_root(root, tops)
    if folder is None and request.download:
        download_family(name, root / "omniglot")
        folder = _find_root(root, tops)
    if folder is None:
        urls = ", ".join(a.url for a in ARCHIVES[name])
        raise DataError(
            f"No {', '.join(t + '.zip' for t in tops)} found in {root} or {root}/omniglot; "
            f"pass download=True (--download) to fetch {urls} into {root / 'omniglot'}, or "
            "put the archives there (--data-dir names the folder)."
        )
    chars = read_minimal(folder, tops)
    alphabets = sorted({a for a, _, _ in chars})
    held_out = alphabets[-HELD_OUT_ALPHABETS[name]:]
    stores = {top: PngStore(folder, top) for top in tops}
    groups: dict[str, list[tuple[str, ...]]] = {}
    for _, top, pngs in chars:  # one source per archive, classes in sorted order
        groups.setdefault(top, []).append(pngs)
    source = _Concatenated(tuple(StoredPngClasses(stores[t], tuple(groups[t]))
                                 for t in tops if t in groups))
    order = [(a, top, p) for top in tops if top in groups for a, t2, p in chars if t2 == top]
    train = [4 * b + k for b, (a, _, _) in enumerate(order) if a not in held_out
             for k in range(4)]
    test = [4 * b + k for b, (a, _, _) in enumerate(order) if a in held_out for k in range(4)]
    info: dict[str, Any] = {
        "root": str(folder),
        "archives": [f"{t}.zip" for t in tops],
        "alphabets_train": [a for a in alphabets if a not in held_out],
        "alphabets_test": held_out,
        "base_classes_train": len(train) // 4,
        "base_classes_test": len(test) // 4,
        "rotations": [0, 90, 180, 270],
    }
    return build_classification(name, request, Rotated(source), train, test, info)


@dataclass(frozen=True)
class _Concatenated(AbstractClassSource):
    """The classes of several sources, one after the other."""

    parts: tuple[AbstractClassSource, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:  # type: ignore[override]
        return self.parts[0].image_shape

    @property
    def n_classes(self) -> int:
        return sum(p.n_classes for p in self.parts)

    def _locate(self, cls: int) -> tuple[AbstractClassSource, int]:
        for p in self.parts:
            if cls < p.n_classes:
                return p, cls
            cls -= p.n_classes
        raise IndexError(f"Class {cls} is out of range.")

    def n_samples(self, cls: int) -> int:
        part, i = self._locate(cls)
        return part.n_samples(i)

    def images(self, cls: int, samples: np.ndarray) -> np.ndarray:
        part, i = self._locate(cls)
        return part.images(i, samples)
