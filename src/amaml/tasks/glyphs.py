"""``glyphs``: procedurally drawn handwritten-like characters, an Omniglot without files.

Each base class is a character of 2 to 4 strokes, each a quadratic Bezier curve or a
two-segment polyline through three control points, drawn once from the class's own
generator. Each sample (a "drawer" of the character) jitters the control points, the
stroke width and applies a small affine wobble (rotation, anisotropic scale, shear,
shift), then renders the strokes anti-aliased onto a 28 x 28 grey image with numpy
(ink 1, background 0): the pixel value is ``clip(half_width + 0.5 - distance, 0, 1)``,
a one-pixel linear ramp at the stroke's edge.

The data set is fixed by ``data_seed`` (default 0), like a downloaded benchmark; the
family's ``seed`` only chooses the episodes. Class ``c`` draws its strokes from
``SeedSequence(data_seed, spawn_key=(8, c))`` and the jitter of all its samples at once
from ``SeedSequence(data_seed, spawn_key=(8, c, 1))``. A class's samples are rendered together
on first use and cached (about 63 kB per base class), so building the family renders
nothing.

Split (:func:`build_glyphs`): 1,600 base classes, the first 1,200 meta-training and the
last 400 meta-test, each with 20 samples; rotations by 90, 180 and 270 degrees are new
classes of the same split, so 4,800 meta-training and 1,600 meta-test classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import FamilyRequest, TaskFamily
from .classification import build_classification
from .episodic import AbstractClassSource, Rotated

__all__ = ["GLYPH_SIZE", "Glyphs", "build_glyphs"]

#: Side of a glyph image in pixels.
GLYPH_SIZE = 28

_GLYPH = 8  # SeedSequence spawn key (0-5: regression families and oracle, 6-7: episodes)
# Points per stroke: a stroke spans at most ~35 px, so neighbours lie < 0.9 px apart and the
# nearest point is within ~0.1 px of the true distance at the stroke's edge (half-width ~1).
_CURVE_POINTS = 41
_OFFSETS = np.arange(-2, 4, dtype=np.int32)
_WINDOW = tuple(g.ravel() for g in np.meshgrid(_OFFSETS, _OFFSETS, indexing="ij"))


@dataclass(frozen=True)
class Glyphs(AbstractClassSource):
    """The glyph classes (no rotations; wrap in :class:`~amaml.tasks.episodic.Rotated`).

    Args:
        n_base: Number of base classes.
        samples_per_class: Images per class (20, as Omniglot's drawers).
        data_seed: Seed of the data set itself (the strokes and their samples).
        size: Image side in pixels.
    """

    n_base: int = 1600
    samples_per_class: int = 20
    data_seed: int = 0
    size: int = GLYPH_SIZE
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("n_base", "samples_per_class", "size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Glyphs.{name} must be an int >= 1, got {value!r}.")

    @property
    def image_shape(self) -> tuple[int, int, int]:  # type: ignore[override]
        return (1, self.size, self.size)

    @property
    def n_classes(self) -> int:
        return self.n_base

    def n_samples(self, cls: int) -> int:
        return self.samples_per_class

    def images(self, cls: int, samples: np.ndarray) -> np.ndarray:
        if not 0 <= cls < self.n_base:
            raise IndexError(f"Glyph class {cls} is out of range 0..{self.n_base - 1}.")
        if cls not in self._cache:
            self._cache[cls] = self.render_class(cls)
        return self._cache[cls][np.asarray(samples)]

    def strokes(self, cls: int) -> tuple[np.ndarray, np.ndarray, float]:
        """The character of class ``cls``.

        Returns:
            ``(control, curved, half_width)``: control points ``[S, 3, 2]`` in unit
            coordinates (x right, y down), whether each stroke is a Bezier curve (else
            a polyline) ``[S]``, and the stroke half-width in pixels.
        """
        rng = np.random.default_rng(np.random.SeedSequence(self.data_seed, spawn_key=(_GLYPH, cls)))
        n_strokes = int(rng.integers(2, 5))
        start = rng.uniform(0.2, 0.8, size=(n_strokes, 2))
        angle = rng.uniform(0.0, 2.0 * np.pi, size=n_strokes)
        length = rng.uniform(0.3, 0.6, size=(n_strokes, 1))
        end = start + length * np.stack([np.cos(angle), np.sin(angle)], axis=1)
        normal = np.stack([-np.sin(angle), np.cos(angle)], axis=1)
        bend = rng.normal(0.0, 0.2, size=(n_strokes, 1)) * length
        mid = (start + end) / 2 + bend * normal
        control = np.clip(np.stack([start, mid, end], axis=1), 0.12, 0.88)
        curved = rng.random(n_strokes) < 0.6
        half_width = float(rng.uniform(0.8, 1.3))
        return control, curved, half_width

    def render_class(self, cls: int) -> np.ndarray:
        """All ``samples_per_class`` images of class ``cls``, ``[n, 1, size, size]`` float32."""
        control, curved, half_width = self.strokes(cls)
        n = self.samples_per_class
        rng = np.random.default_rng(
            np.random.SeedSequence(self.data_seed, spawn_key=(_GLYPH, cls, 1))
        )
        ctrl = control + rng.normal(0.0, 0.025, size=(n, *control.shape))
        rot = rng.uniform(-0.15, 0.15, size=n)
        scale = rng.uniform(0.9, 1.1, size=(n, 1, 2))
        shear = rng.uniform(-0.15, 0.15, size=n)
        shift = rng.normal(0.0, 0.03, size=(n, 2))
        widths = (half_width * rng.uniform(0.85, 1.15, size=n)).astype(np.float32)  # < 1.5 px
        c, si, zero, one = np.cos(rot), np.sin(rot), np.zeros(n), np.ones(n)
        rotation = np.stack([np.stack([c, -si], -1), np.stack([si, c], -1)], 1)
        shearing = np.stack([np.stack([one, shear], -1), np.stack([zero, one], -1)], 1)
        affine = (rotation @ shearing) * scale  # [n, 2, 2]
        # Wobble about the image centre: p -> A (p - 1/2) + 1/2 + shift.
        ctrl = np.einsum("nij,nskj->nski", affine, ctrl - 0.5) + 0.5 + shift[:, None, None, :]
        t = np.linspace(0.0, 1.0, _CURVE_POINTS)[:, None]
        p0, p1, p2 = ctrl[:, :, 0, None], ctrl[:, :, 1, None], ctrl[:, :, 2, None]
        bezier = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        # A polyline visits p1 at the middle of the stroke's parameter range.
        poly = np.where(t < 0.5, p0 + 2 * t * (p1 - p0), p1 + (2 * t - 1) * (p2 - p1))
        path = np.where(curved[None, :, None, None], bezier, poly) * self.size
        pts = path.reshape(n, -1, 2).astype(np.float32)  # [n, Q, 2] (x, y) in pixels
        # Ink reaches half_width + 0.5 < 2 px from a point; the pixels whose centres lie
        # within 2 px of a point in each axis are the 6 x 6 window _WINDOW from the pixel
        # just below-left of it. The nearest point stands for the stroke.
        base = np.floor(pts - 0.5).astype(np.int32)
        px = base[..., 0, None] + _WINDOW[1]  # [n, Q, 36]
        py = base[..., 1, None] + _WINDOW[0]
        dx = px.astype(np.float32) + 0.5 - pts[..., 0, None]
        dy = py.astype(np.float32) + 0.5 - pts[..., 1, None]
        ink = np.clip(widths[:, None, None] + 0.5 - np.sqrt(dx * dx + dy * dy), 0.0, 1.0)
        inside = (px >= 0) & (px < self.size) & (py >= 0) & (py < self.size)
        flat = (np.arange(n)[:, None, None] * self.size + py) * self.size + px
        out = np.zeros(n * self.size * self.size, dtype=np.float32)
        np.maximum.at(out, flat[inside], ink[inside])
        return out.reshape(n, 1, self.size, self.size)


#: Base classes of each split of ``glyphs``: the first 1,200 meta-train, the last 400 meta-test.
N_TRAIN_BASE, N_TEST_BASE = 1200, 400


def build_glyphs(name: str, request: FamilyRequest) -> TaskFamily:
    """Build the ``glyphs`` family (see the module docstring for the split).

    ``root`` and ``download`` are ignored: nothing is read or fetched.

    Raises:
        ValueError: ``pool`` is set, ``ways`` exceeds the 1,600 meta-test classes, or
            ``shots + queries`` exceeds the 20 samples per class.
    """
    source = Glyphs(n_base=N_TRAIN_BASE + N_TEST_BASE)
    rotated = Rotated(source)
    train = [4 * b + k for b in range(N_TRAIN_BASE) for k in range(4)]
    test = [4 * b + k for b in range(N_TRAIN_BASE, source.n_base) for k in range(4)]
    info: dict[str, Any] = {
        "base_classes_train": N_TRAIN_BASE,
        "base_classes_test": N_TEST_BASE,
        "rotations": [0, 90, 180, 270],
        "samples_per_class": source.samples_per_class,
        "data_seed": source.data_seed,
    }
    return build_classification(name, request, rotated, train, test, info)
