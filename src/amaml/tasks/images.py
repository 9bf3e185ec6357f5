"""Image classification data read from files: Omniglot and mini-ImageNet.

Both are read lazily: building a family lists the files, and an image is decoded (with
Pillow) the first time an episode needs it, then cached. Images are float32 in
``[0, 1]``.

**Omniglot** (Lake et al. 2015), the official layout of the two archives
``images_background.zip`` and ``images_evaluation.zip``::

    <root>/images_background/<alphabet>/<character>/<drawer>.png
    <root>/images_evaluation/<alphabet>/<character>/<drawer>.png

(``<root>`` may also be a folder holding ``omniglot/``). The 1,623 characters of both
archives are sorted by ``"<alphabet>/<character>"``; the first 1,200 are the meta-training
characters and the remaining 423 the meta-test characters (the sizes of Vinyals et al.
2016's split; its exact membership was never published). Each image is resized to
28 x 28 (Lanczos) and inverted, so ink is 1. Rotations by 90, 180 and 270 degrees are new
classes of the same split: 4,800 meta-training and 1,692 meta-test classes, 20 images each.

**mini-ImageNet**, the split of Ravi & Larochelle (2017)::

    <root>/train.csv, <root>/val.csv, <root>/test.csv   (header ``filename,label``)
    <root>/images/<filename>                            (84 x 84 RGB)

(or under ``<root>/mini-imagenet/``). Meta-training classes are those of ``train.csv``
(64), meta-test classes those of ``test.csv`` (20); ``val.csv`` is not read. Images of
another size are resized to 84 x 84. There is no official archive, so nothing is
downloaded.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._extras import MissingExtraError, import_extra
from .base import DataError, FamilyRequest, TaskFamily
from .classification import build_classification
from .download import UNVERIFIED_ARCHIVES, default_root, download_family
from .episodic import AbstractClassSource, Rotated

__all__ = [
    "MINI_IMAGENET_HELP",
    "N_OMNIGLOT_CHARACTERS",
    "N_OMNIGLOT_TRAIN",
    "ImageFolderClasses",
    "build_mini_imagenet",
    "build_omniglot",
    "read_mini_imagenet",
    "read_omniglot",
]

#: Characters of the official Omniglot (964 background + 659 evaluation).
N_OMNIGLOT_CHARACTERS = 1623
#: Meta-training characters: the first 1,200 in sorted order.
N_OMNIGLOT_TRAIN = 1200
_OMNIGLOT_FOLDERS = ("images_background", "images_evaluation")

#: Where mini-ImageNet comes from, as the missing-data message says it.
MINI_IMAGENET_HELP = (
    "mini-ImageNet has no official archive: take the Ravi & Larochelle split CSVs "
    "(train.csv, val.csv, test.csv, header 'filename,label') from "
    "https://github.com/twitter/meta-learning-lstm/tree/master/data/miniImagenet and the "
    "84x84 images named in them, and lay them out as <root>/mini-imagenet/{train,val,test}.csv "
    "and <root>/mini-imagenet/images/<filename>"
)


def _load_image(path: Path, size: int, mode: str) -> np.ndarray:
    """``path`` as a ``[C, size, size]`` uint8 array (``mode`` ``"L"`` or ``"RGB"``)."""
    try:
        Image = import_extra("PIL.Image", f"Reading {path}")  # Pillow
    except MissingExtraError as exc:
        raise DataError(str(exc)) from exc

    try:
        with Image.open(path) as raw:
            img = raw.convert(mode)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.LANCZOS)
        arr = np.asarray(img, dtype=np.uint8)
    except (OSError, Image.UnidentifiedImageError) as exc:
        raise DataError(f"Cannot read image {path} ({exc}); re-extract or re-download it.") from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


@dataclass(frozen=True)
class ImageFolderClasses(AbstractClassSource):
    """Classes given as lists of image files, decoded on first use and cached (uint8).

    Args:
        files: One tuple of image paths per class.
        size: Side every image is resized to.
        mode: ``"L"`` (grey, one channel) or ``"RGB"``.
        invert: Return ``1 - pixel / 255`` (Omniglot: black ink on white becomes 1).
    """

    files: tuple[tuple[Path, ...], ...]
    size: int
    mode: str = "L"
    invert: bool = False
    _cache: dict[Path, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def image_shape(self) -> tuple[int, int, int]:  # type: ignore[override]
        return (1 if self.mode == "L" else 3, self.size, self.size)

    @property
    def n_classes(self) -> int:
        return len(self.files)

    def n_samples(self, cls: int) -> int:
        return len(self.files[cls])

    def images(self, cls: int, samples: np.ndarray) -> np.ndarray:
        paths = [self.files[cls][int(i)] for i in samples]
        for p in paths:
            if p not in self._cache:
                self._cache[p] = _load_image(p, self.size, self.mode)
        out = np.stack([self._cache[p] for p in paths]).astype(np.float32) / 255.0
        return 1.0 - out if self.invert else out


# --------------------------------------------------------------------------- Omniglot


def _omniglot_folder(root: Path) -> Path | None:
    for base in (root, root / "omniglot"):
        if any((base / sub).is_dir() for sub in _OMNIGLOT_FOLDERS):
            return base
    return None


def read_omniglot(folder: str | os.PathLike[str]) -> list[tuple[str, tuple[Path, ...]]]:
    """List the characters of an Omniglot folder, sorted by ``"<alphabet>/<character>"``.

    Args:
        folder: The folder holding ``images_background/`` and ``images_evaluation/``.

    Returns:
        ``[(key, pngs), ...]``, the PNG paths of each character sorted by name.

    Raises:
        DataError: A sub-folder is missing, an alphabet holds no character folder, or a
            character folder holds no ``.png`` file.
    """
    base = Path(os.fspath(folder))
    found: list[tuple[str, tuple[Path, ...]]] = []
    for sub in _OMNIGLOT_FOLDERS:
        top = base / sub
        if not top.is_dir():
            raise DataError(
                f"{top} is missing; extract the official {sub}.zip there (download=True, "
                "--download, fetches both Omniglot archives)."
            )
        for alphabet in sorted(p for p in top.iterdir() if p.is_dir()):
            characters = sorted(p for p in alphabet.iterdir() if p.is_dir())
            if not characters:
                raise DataError(
                    f"{alphabet} holds no character folder; re-extract {sub}.zip there."
                )
            for character in characters:
                pngs = tuple(sorted(character.glob("*.png")))
                if not pngs:
                    raise DataError(
                        f"{character} holds no .png image; re-extract {sub}.zip there, or "
                        "delete the empty folder."
                    )
                found.append((f"{alphabet.name}/{character.name}", pngs))
    found.sort(key=lambda item: item[0])
    return found


def build_omniglot(
    name: str,
    request: FamilyRequest,
    *,
    n_train_characters: int = N_OMNIGLOT_TRAIN,
    n_characters: int | None = N_OMNIGLOT_CHARACTERS,
) -> TaskFamily:
    """Locate (downloading if allowed), list and build the Omniglot family.

    Args:
        name: Family name recorded in the result.
        request: Validated arguments of :func:`amaml.tasks.make_family`.
        n_train_characters: Characters (in sorted order) of the meta-training split.
        n_characters: Characters the data must hold (the official 1,623), so that a
            partial extraction is refused rather than silently split; ``None``: any
            number above ``n_train_characters``.

    Raises:
        DataError: The data is missing (and ``download`` is off), malformed or
            incomplete.
        ValueError: As :func:`~amaml.tasks.classification.build_classification`.
    """
    root = default_root() if request.root is None else request.root
    folder = _omniglot_folder(root)
    if folder is None and request.download:
        download_family("omniglot", root / "omniglot")
        folder = _omniglot_folder(root)
    if folder is None:
        urls = ", ".join(a.url for a in UNVERIFIED_ARCHIVES["omniglot"])
        raise DataError(
            f"No Omniglot found (tried {root}/images_background and "
            f"{root}/omniglot/images_background); pass download=True (--download) to fetch "
            f"the official archives ({urls}) into {root / 'omniglot'}, or extract them there."
        )
    chars = read_omniglot(folder)
    if (n_characters is not None and len(chars) != n_characters) or len(
        chars
    ) <= n_train_characters:
        expected = n_characters or f"more than {n_train_characters}"
        raise DataError(
            f"{folder} holds {len(chars)} Omniglot characters, expected {expected}; "
            "re-extract both official archives (images_background.zip, "
            "images_evaluation.zip) there."
        )
    source = ImageFolderClasses(tuple(f for _, f in chars), size=28, mode="L", invert=True)
    n_test = len(chars) - n_train_characters
    train = [4 * b + k for b in range(n_train_characters) for k in range(4)]
    test = [4 * b + k for b in range(n_train_characters, len(chars)) for k in range(4)]
    info: dict[str, Any] = {
        "root": str(folder),
        "base_classes_train": n_train_characters,
        "base_classes_test": n_test,
        "rotations": [0, 90, 180, 270],
        "first_test_character": chars[n_train_characters][0],
    }
    return build_classification(name, request, Rotated(source), train, test, info)


# --------------------------------------------------------------------------- mini-ImageNet


def _read_split_csv(path: Path, images: Path, listed: set[str]) -> dict[str, list[Path]]:
    """``label -> image paths`` of one split CSV, in file order."""
    if not path.is_file():
        raise DataError(f"{path} is missing; {MINI_IMAGENET_HELP}.")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        head = rows[0] if rows else "nothing"
        raise DataError(
            f"{path} must start with the header 'filename,label', found {head}; use the "
            "Ravi & Larochelle CSVs."
        )
    classes: dict[str, list[Path]] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path} line {line_no} is not 'filename,label': {row}; fix the file.")
        filename, label = row[0].strip(), row[1].strip()
        if filename not in listed:
            raise DataError(
                f"{path} line {line_no} names {filename}, which is not in {images}; add the "
                "image or use the CSV that matches your images folder."
            )
        classes.setdefault(label, []).append(images / filename)
    if not classes:
        raise DataError(f"{path} lists no image; use the Ravi & Larochelle CSVs.")
    return classes


def read_mini_imagenet(
    folder: str | os.PathLike[str],
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Read ``train.csv`` and ``test.csv`` of a mini-ImageNet folder.

    Returns:
        ``(train, test)``: ``label -> image paths`` of each split.

    Raises:
        DataError: A CSV or the ``images`` folder is missing, a header or row is
            malformed, an image named is absent, or a label is in both splits.
    """
    base = Path(os.fspath(folder))
    images = base / "images"
    if not images.is_dir():
        raise DataError(f"{images} is missing; {MINI_IMAGENET_HELP}.")
    listed = set(os.listdir(images))
    train = _read_split_csv(base / "train.csv", images, listed)
    test = _read_split_csv(base / "test.csv", images, listed)
    shared = sorted(set(train) & set(test))
    if shared:
        raise DataError(
            f"{base}/train.csv and test.csv share the labels {shared[:3]}; the splits must "
            "have disjoint classes: use the Ravi & Larochelle CSVs."
        )
    return train, test


def build_mini_imagenet(name: str, request: FamilyRequest) -> TaskFamily:
    """Read and build the mini-ImageNet family (classes of each split sorted by label).

    Raises:
        DataError: The data is missing (there is no download) or malformed.
        ValueError: As :func:`~amaml.tasks.classification.build_classification`.
    """
    root = default_root() if request.root is None else request.root
    tried = [root / "train.csv", root / "mini-imagenet" / "train.csv"]
    folder = next((p.parent for p in tried if p.is_file()), None)
    if folder is None:
        refused = " (download=True cannot fetch it)" if request.download else ""
        raise DataError(
            f"No mini-ImageNet found (tried {', '.join(map(str, tried))}){refused}; "
            f"{MINI_IMAGENET_HELP}."
        )
    train, test = read_mini_imagenet(folder)
    labels = sorted(train) + sorted(test)
    files = tuple(tuple(train.get(lab) or test[lab]) for lab in labels)
    source = ImageFolderClasses(files, size=84, mode="RGB")
    info: dict[str, Any] = {
        "root": str(folder),
        "labels_train": sorted(train),
        "labels_test": sorted(test),
    }
    return build_classification(
        name, request, source, range(len(train)), range(len(train), len(labels)), info
    )
