"""A small Omniglot classification set for the distillation example, read from a zip.

Omniglot (Lake et al. 2015): 105 x 105 binary PNGs of handwritten characters, each drawn
once by each of 20 people. This reads the "minimal" background split
``images_background_small1.zip`` (5 alphabets, 143 characters) without unpacking it, picks
``n_way`` characters at random over all its alphabets (``numpy.random.default_rng(seed)``),
inverts the images (strokes 1, paper 0) and resizes them to ``side x side`` (antialiased).
The drawings of the first ``train_drawers`` people are the training set, the others the
test set: a new person's handwriting of the same characters. Both are ordered by drawer,
then character, so that any leading slice (the example's held-out fifth for picking a
rate) holds whole drawers of every character.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

ZIP_NAME = "images_background_small1.zip"
_DRAWER = re.compile(r"_(\d+)\.png$")


def default_root() -> Path:
    """``<repo>/../shared/data/omniglot``."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"


def load_omniglot_split(root: str | Path, *, n_way: int = 20, train_drawers: int = 15,
                        side: int = 28, seed: int = 0, dtype: torch.dtype = torch.float32
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train [n_way * train_drawers, side * side], y_train, x_test, y_test); pixels in
    [0, 1]; labels 0 .. n_way - 1 in the order of the characters picked.

    Raises:
        FileNotFoundError: no ``images_background_small1.zip`` under ``root``.
    """
    from PIL import Image

    path = Path(root) / ZIP_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass --omniglot-root, the folder that "
                                f"holds {ZIP_NAME}")
    with zipfile.ZipFile(path) as z:
        chars: dict[str, list[str]] = {}
        for name in z.namelist():
            if name.endswith(".png"):
                chars.setdefault(name.rsplit("/", 1)[0], []).append(name)
        names = sorted(chars)
        if not 1 < n_way <= len(names):
            raise ValueError(f"n_way must be in 2..{len(names)}, not {n_way}")
        picked = [names[i] for i in np.random.default_rng(seed).choice(len(names), n_way,
                                                                        replace=False)]
        train: list[tuple[int, int, np.ndarray]] = []
        test: list[tuple[int, int, np.ndarray]] = []
        for label, char in enumerate(picked):
            for f in sorted(chars[char]):
                img = Image.open(io.BytesIO(z.read(f))).convert("L")
                img = img.resize((side, side), Image.Resampling.LANCZOS)
                x = 1.0 - np.asarray(img, dtype=np.float64) / 255.0
                drawer = int(_DRAWER.search(f).group(1))  # type: ignore[union-attr]
                (train if drawer <= train_drawers else test).append(
                    (drawer, label, x.clip(0, 1).ravel()))
    train.sort(key=lambda t: t[:2])
    test.sort(key=lambda t: t[:2])
    return (torch.tensor(np.stack([t[2] for t in train]), dtype=dtype),
            torch.tensor([t[1] for t in train]),
            torch.tensor(np.stack([t[2] for t in test]), dtype=dtype),
            torch.tensor([t[1] for t in test]))
