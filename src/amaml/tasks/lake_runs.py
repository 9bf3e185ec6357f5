"""Omniglot's own one-shot test (Lake et al. 2015): the 20 runs of ``all_runs.zip``, and
two baselines that learn nothing.

The data set's README defines the test: each run ``run01 .. run20`` is a 20-way 1-shot
problem *within one alphabet* of the evaluation set (two runs per alphabet): 20
training images ``training/class01..20.png``, one per character, and 20 test images
``test/item01..20.png``, each a character of the training images drawn by another
person; ``class_labels.txt`` pairs each test item with its class image, one line
``runNN/test/itemMM.png runNN/training/classKK.png``. A method classifies every test
image given the run's training images; its score is the error over the 400 test
images. Images are 105 x 105, black ink on white, like the background PNGs.

Layout read::

    <root>/all_runs.zip              (members runNN/...)
    <root>/all_runs/runNN/...        (the zip extracted, as --download leaves it)

(``<root>`` may also be a folder holding ``omniglot/``).

Baselines (no learning, no background data):

* :func:`mhd_predictions`: the modified Hausdorff distance (Dubuisson & Jain 1994) between
  the ink pixels of two images, each point set centred on its mean, as the data set's
  demo (``demo_classification.py``) computes it; a test image takes the class of the
  training image at the smallest distance. Published error: 38.8%.
* :func:`pixel_nn_predictions`: nearest neighbour in Euclidean distance between the
  28 x 28 inverted images a network sees.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import DataError
from .download import default_root, download_family
from .omniglot import decode_png

__all__ = [
    "N_RUNS",
    "RUN_WAYS",
    "LakeRun",
    "ink_points",
    "mhd_predictions",
    "modified_hausdorff",
    "pixel_nn_predictions",
    "read_lake_runs",
]

#: Runs of the one-shot test.
N_RUNS = 20
#: Classes (training images) and test images of each run.
RUN_WAYS = 20

_LINE = re.compile(r"^(run\d\d)/test/item(\d\d)\.png\s+(run\d\d)/training/class(\d\d)\.png$")


@dataclass(frozen=True)
class LakeRun:
    """One run of the one-shot test.

    Attributes:
        name: ``"run01"`` .. ``"run20"``.
        training: ``[20, 1, 105, 105]`` uint8 grey (ink 0, paper 255); row ``k`` is
            ``training/class{k+1:02d}.png``.
        test: ``[20, 1, 105, 105]`` uint8; row ``i`` is ``test/item{i+1:02d}.png``.
        labels: ``[20]`` int64: the training row of each test image's class.
    """

    name: str
    training: np.ndarray
    test: np.ndarray
    labels: np.ndarray

    def support(self, size: int = 28) -> np.ndarray:
        """The training images as a network sees them: ``[20, 1, size, size]`` float32,
        resized (Lanczos) and inverted so that ink is 1, as the background images are."""
        return _network_view(self.training, size)

    def query(self, size: int = 28) -> np.ndarray:
        """The test images, as :meth:`support`."""
        return _network_view(self.test, size)


def _network_view(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    out = []
    for img in images[:, 0]:
        pil = Image.fromarray(img)  # uint8 [H, W]: mode "L"
        if pil.size != (size, size):
            pil = pil.resize((size, size), Image.Resampling.LANCZOS)
        out.append(np.asarray(pil, dtype=np.uint8))
    return (1.0 - np.stack(out)[:, None].astype(np.float32) / 255.0).astype(np.float32)


class _Files:
    """The runs' files, in ``<base>/all_runs/`` or ``<base>/all_runs.zip``."""

    def __init__(self, base: Path) -> None:
        self.folder, self.archive = base / "all_runs", base / "all_runs.zip"
        self._zip: zipfile.ZipFile | None = None
        if not self.folder.is_dir():
            try:
                self._zip = zipfile.ZipFile(self.archive)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(f"Cannot open {self.archive} ({exc}); re-download it "
                                "(--download).") from exc

    def read(self, name: str) -> bytes:
        try:
            if self._zip is None:
                return (self.folder / name).read_bytes()
            return self._zip.read(name)
        except (KeyError, OSError) as exc:
            where = self.folder if self._zip is None else self.archive
            raise DataError(f"{name} is missing from {where}; re-download all_runs.zip "
                            "(--download).") from exc


def _find(root: Path) -> Path | None:
    for base in (root, root / "omniglot"):
        if (base / "all_runs").is_dir() or (base / "all_runs.zip").is_file():
            return base
    return None


def read_lake_runs(root: str | os.PathLike[str] | None = None, *,
                   download: bool = False) -> tuple[LakeRun, ...]:
    """Read the 20 runs of Omniglot's one-shot test.

    Args:
        root: Folder holding ``all_runs.zip`` or ``all_runs/`` (or ``omniglot/`` with
            them); ``None``: ``$AMAML_DATA`` or ``~/.cache/amaml``.
        download: Fetch ``all_runs.zip`` into ``root/omniglot`` if it is absent.

    Returns:
        The runs, ``run01`` first.

    Raises:
        DataError: The runs are missing (and ``download`` is off), or a
            ``class_labels.txt`` does not pair each of the 20 test items with one of the
            20 training images.
    """
    base_root = default_root() if root is None else Path(os.fspath(root)).expanduser()
    base = _find(base_root)
    if base is None and download:
        download_family("omniglot-runs", base_root / "omniglot")
        base = _find(base_root)
    if base is None:
        raise DataError(f"No all_runs.zip (or all_runs/) in {base_root} or "
                        f"{base_root}/omniglot; pass --download to fetch it from the data "
                        "set's repository (brendenlake/omniglot, python/all_runs.zip), or "
                        "put it there.")
    files = _Files(base)
    return tuple(_read_run(files, f"run{r:02d}") for r in range(1, N_RUNS + 1))


def _read_run(files: _Files, name: str) -> LakeRun:
    text = files.read(f"{name}/class_labels.txt").decode("ascii", errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    labels = np.full(RUN_WAYS, -1, dtype=np.int64)
    for ln in lines:
        m = _LINE.match(ln)
        if m is None or m.group(1) != name or m.group(3) != name:
            raise DataError(f"{name}/class_labels.txt has a line {ln!r}, not "
                            f"'{name}/test/itemMM.png {name}/training/classKK.png'; "
                            "re-download all_runs.zip.")
        item, cls = int(m.group(2)) - 1, int(m.group(4)) - 1
        if not (0 <= item < RUN_WAYS and 0 <= cls < RUN_WAYS) or labels[item] >= 0:
            raise DataError(f"{name}/class_labels.txt: line {ln!r} is out of range or "
                            "repeats an item; re-download all_runs.zip.")
        labels[item] = cls
    if (labels < 0).any():
        raise DataError(f"{name}/class_labels.txt pairs {int((labels >= 0).sum())} of the "
                        f"{RUN_WAYS} test items; re-download all_runs.zip.")
    training = np.stack([decode_png(files.read(f"{name}/training/class{k:02d}.png"))
                         for k in range(1, RUN_WAYS + 1)])
    test = np.stack([decode_png(files.read(f"{name}/test/item{k:02d}.png"))
                     for k in range(1, RUN_WAYS + 1)])
    return LakeRun(name, training, test, labels)


def ink_points(image: np.ndarray) -> np.ndarray:
    """The ink pixels (grey < 128) of a ``[1, H, W]`` or ``[H, W]`` image as ``[n, 2]``
    (row, column) coordinates, centred on their mean, as the data set's demo does."""
    pts = np.argwhere(np.squeeze(image) < 128).astype(np.float64)
    return pts - pts.mean(axis=0) if len(pts) else pts


def modified_hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """Modified Hausdorff distance (Dubuisson & Jain 1994) of two point sets ``[n, 2]``:
    ``max(mean_a min_b |a - b|, mean_b min_a |a - b|)``.

    Raises:
        ValueError: A point set is empty (an image without ink).
    """
    from scipy.spatial import cKDTree

    if len(a) == 0 or len(b) == 0:
        raise ValueError("modified_hausdorff needs two non-empty point sets; an image "
                         "holds no ink pixel.")
    a_to_b = cKDTree(b).query(a)[0].mean()
    b_to_a = cKDTree(a).query(b)[0].mean()
    return float(max(a_to_b, b_to_a))


def mhd_predictions(run: LakeRun) -> np.ndarray:
    """The training row of smallest modified Hausdorff distance, for each test image."""
    from scipy.spatial import cKDTree

    train = [ink_points(img) for img in run.training]
    test = [ink_points(img) for img in run.test]
    if any(len(p) == 0 for p in (*train, *test)):
        raise ValueError(f"{run.name} holds an image without ink; re-download all_runs.zip.")
    # One tree per image, queried by every image of the other side: the same distances
    # as modified_hausdorff pair by pair, 40 trees instead of 800.
    train_trees, test_trees = [cKDTree(p) for p in train], [cKDTree(p) for p in test]
    cost = np.array([[max(train_trees[j].query(q)[0].mean(), test_trees[i].query(t)[0].mean())
                      for j, t in enumerate(train)] for i, q in enumerate(test)])
    return cost.argmin(axis=1)


def pixel_nn_predictions(run: LakeRun, size: int = 28) -> np.ndarray:
    """The training row nearest in Euclidean distance between ``size`` x ``size`` inverted
    images (what the network sees), for each test image."""
    s = run.support(size).reshape(RUN_WAYS, -1).astype(np.float64)
    q = run.query(size).reshape(RUN_WAYS, -1).astype(np.float64)
    d2 = (q**2).sum(1)[:, None] - 2 * q @ s.T + (s**2).sum(1)[None]
    return d2.argmin(axis=1)
