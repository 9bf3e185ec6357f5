"""N-way K-shot classification episodes: :class:`ClassificationTask` and :class:`EpisodeSet`.

An *episode* (a classification task) draws ``ways`` classes of a split, then ``shots``
support and ``queries`` query images of each class, all distinct; the chosen classes are
relabelled ``0 .. ways-1`` in the random order of the draw. Rows are label-major: the
support labels are ``[0]*shots + [1]*shots + ...``, the query labels likewise.

Episode ``i`` of a split draws from its own generator,
``numpy.random.SeedSequence(seed, spawn_key=(split, i))``, so it is the same whenever and
however often it is drawn, and does not depend on the other split. An :class:`EpisodeSet`
is thus an indexable set of episodes, rendered on demand from an
:class:`AbstractClassSource` (which caches its images): the meta-test split holds
``n_test`` fixed episodes, the meta-training split either ``n_train`` fixed ones or
:data:`FRESH_EPISODES` indices, so that each meta-iteration draws new episodes
(:meth:`EpisodeSet.sample`).

This module imports nothing from the rest of :mod:`amaml`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FRESH_EPISODES",
    "AbstractClassSource",
    "ClassificationTask",
    "EpisodeSet",
    "Rotated",
]

#: Episode indices of a meta-training split built with ``n_train=None``: each
#: meta-iteration draws indices uniformly in ``[0, 2**62)``, new episodes in practice.
FRESH_EPISODES = 2**62


class AbstractClassSource(abc.ABC):
    """Images of classes, addressed by a class index ``0 .. n_classes-1``.

    Implementations load or render lazily and cache what they produced, so building a
    family costs nothing and an episode touches only its own classes.

    Attributes:
        image_shape: ``(C, H, W)`` of every image.
    """

    image_shape: tuple[int, int, int]

    @property
    @abc.abstractmethod
    def n_classes(self) -> int:
        """Number of classes."""

    @abc.abstractmethod
    def n_samples(self, cls: int) -> int:
        """Number of images of class ``cls``."""

    @abc.abstractmethod
    def images(self, cls: int, samples: np.ndarray) -> np.ndarray:
        """Images ``samples`` (indices into ``range(n_samples(cls))``) of class ``cls``.

        Returns:
            ``[len(samples), C, H, W]`` float32 in ``[0, 1]`` (a new array).
        """


@dataclass(frozen=True)
class Rotated(AbstractClassSource):
    """Every class of ``base`` rotated by 0, 90, 180 and 270 degrees, as four classes.

    Class ``4 * b + k`` is class ``b`` of ``base`` rotated by ``90 * k`` degrees
    counter-clockwise (the usual Omniglot augmentation). Images must be square.
    """

    base: AbstractClassSource

    def __post_init__(self) -> None:
        _, h, w = self.base.image_shape
        if h != w:
            raise ValueError(f"Rotated needs square images, got {self.base.image_shape}.")

    @property
    def image_shape(self) -> tuple[int, int, int]:  # type: ignore[override]
        return self.base.image_shape

    @property
    def n_classes(self) -> int:
        return 4 * self.base.n_classes

    def n_samples(self, cls: int) -> int:
        return self.base.n_samples(cls // 4)

    def images(self, cls: int, samples: np.ndarray) -> np.ndarray:
        out = self.base.images(cls // 4, samples)
        return np.ascontiguousarray(np.rot90(out, k=cls % 4, axes=(-2, -1)))


def _check_images(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        kind = type(x).__name__
        raise TypeError(f"ClassificationTask.{name} must be a torch.Tensor, got {kind}.")
    if not x.is_floating_point() or x.dim() != 4:
        raise ValueError(
            f"ClassificationTask.{name} must be floating [n, C, H, W], got {x.dtype} "
            f"{tuple(x.shape)}."
        )
    return x


def _check_labels(name: str, y: object, n: int, ways: int) -> None:
    if not isinstance(y, Tensor):
        kind = type(y).__name__
        raise TypeError(f"ClassificationTask.{name} must be a torch.Tensor, got {kind}.")
    if y.dtype != torch.int64 or y.shape != (n,):
        raise ValueError(
            f"ClassificationTask.{name} must be int64 [{n}] (one label per image), got "
            f"{y.dtype} {tuple(y.shape)}."
        )
    if n and (int(y.min()) < 0 or int(y.max()) >= ways):
        raise ValueError(f"ClassificationTask.{name} labels must lie in 0..{ways - 1}.")


@dataclass(frozen=True)
class ClassificationTask:
    """One N-way classification episode.

    Attributes:
        support_x: Support images ``[ways * shots, C, H, W]``, floating.
        support_y: Support labels ``[ways * shots]``, int64 in ``0 .. ways-1``.
        query_x: Query images ``[ways * queries, C, H, W]``.
        query_y: Query labels ``[ways * queries]``, int64.
        ways: Number of classes ``N``.

    The test set of an episode is its query set (:attr:`test_x`, :attr:`test_y`): accuracy
    on the queries is the field's convention.

    Raises:
        TypeError: A field is not a tensor.
        ValueError: Wrong dtype or shape, labels out of range, or tensors on different
            devices or of different floating dtypes.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    ways: int

    def __post_init__(self) -> None:
        if isinstance(self.ways, bool) or not isinstance(self.ways, int) or self.ways < 1:
            raise ValueError(f"ClassificationTask.ways must be an int >= 1, got {self.ways!r}.")
        sx = _check_images("support_x", self.support_x)
        qx = _check_images("query_x", self.query_x)
        _check_labels("support_y", self.support_y, int(sx.shape[0]), self.ways)
        _check_labels("query_y", self.query_y, int(qx.shape[0]), self.ways)
        if sx.shape[1:] != qx.shape[1:] or sx.dtype != qx.dtype:
            raise ValueError(
                f"ClassificationTask support and query images must share shape [C, H, W] and "
                f"dtype, got {tuple(sx.shape[1:])} {sx.dtype} and {tuple(qx.shape[1:])} {qx.dtype}."
            )
        tensors = [getattr(self, f.name) for f in fields(self) if f.name != "ways"]
        if len({str(t.device) for t in tensors}) > 1:
            raise ValueError("ClassificationTask tensors must be on one device.")

    @property
    def test_x(self) -> Tensor:
        """The query images: an episode is evaluated on its queries."""
        return self.query_x

    @property
    def test_y(self) -> Tensor:
        """The query labels."""
        return self.query_y

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the images."""
        return self.support_x.dtype

    @property
    def device(self) -> torch.device:
        """Device of every tensor."""
        return self.support_x.device


class EpisodeSet:
    """The episodes of one split of a classification family, drawn on demand.

    Args:
        source: Where the images come from.
        classes: Class indices of ``source`` that this split draws from (at least ``ways``).
        ways: Classes per episode ``N`` >= 2.
        shots: Support images per class ``K`` >= 1.
        queries: Query images per class >= 1; ``shots + queries`` images of each class
            must exist.
        n_episodes: Number of episodes (the indices ``0 .. n_episodes-1``).
        seed: Seed of every draw (non-negative).
        split: Spawn key of the split, so that the splits' episodes are independent.
        dtype: Floating dtype of the images returned.
        device: Device of the tensors returned.

    Raises:
        ValueError: Arguments out of range, or fewer images in some class than
            ``shots + queries`` (the message names ``--shots``/``--queries``).
    """

    def __init__(
        self,
        source: AbstractClassSource,
        classes: Sequence[int],
        *,
        ways: int,
        shots: int,
        queries: int,
        n_episodes: int,
        seed: int,
        split: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.source = source
        self.classes: tuple[int, ...] = tuple(int(c) for c in classes)
        if ways < 2 or ways > len(self.classes):
            raise ValueError(
                f"ways ({ways}, --ways) must be between 2 and the {len(self.classes)} classes "
                "of the split."
            )
        if shots < 1 or queries < 1 or n_episodes < 1:
            raise ValueError(
                f"shots, queries and n_episodes must be >= 1, got {shots}, {queries}, {n_episodes}."
            )
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
        self.ways, self.shots, self.queries = ways, shots, queries
        self.n_episodes, self.seed, self.split = n_episodes, seed, split
        self.dtype, self.device = dtype, torch.device(device)

    def __len__(self) -> int:
        return self.n_episodes

    def __repr__(self) -> str:
        return (
            f"EpisodeSet(n_episodes={self.n_episodes}, ways={self.ways}, shots={self.shots}, "
            f"queries={self.queries}, classes={len(self.classes)}, "
            f"input_shape={self.input_shape}, dtype={self.dtype})"
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        return tuple(self.source.image_shape)  # type: ignore[return-value]

    @property
    def input_dim(self) -> int:
        """``C * H * W``, the flattened image size."""
        c, h, w = self.input_shape
        return c * h * w

    def _draw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Support and query images of episode ``index``, label-major, as float32 arrays."""
        ss = np.random.SeedSequence(self.seed, spawn_key=(self.split, index))
        rng = np.random.default_rng(ss)
        # choice without replacement returns the classes in random order: that order
        # is the relabelling 0 .. ways-1.
        chosen = rng.choice(len(self.classes), size=self.ways, replace=False)
        k = self.shots + self.queries
        support, query = [], []
        for pos in chosen:
            cls = self.classes[int(pos)]
            n = self.source.n_samples(cls)
            if n < k:
                raise ValueError(
                    f"shots + queries ({self.shots} + {self.queries}, --shots/--queries) exceeds "
                    f"the {n} images of class {cls}; ask for at most {n} per class."
                )
            imgs = self.source.images(cls, rng.choice(n, size=k, replace=False))
            support.append(imgs[: self.shots])
            query.append(imgs[self.shots :])
        return np.concatenate(support), np.concatenate(query)

    def _index(self, i: object) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"Episode index must be an int, got {type(i).__name__}.")
        n = self.n_episodes
        if not -n <= int(i) < n:
            raise IndexError(f"Episode index {i} is out of range for an EpisodeSet of {n}.")
        return int(i) % n

    def _tensor(self, a: np.ndarray) -> Tensor:
        return torch.from_numpy(a).to(device=self.device, dtype=self.dtype)

    def _labels(self, per_class: int) -> Tensor:
        return torch.arange(self.ways, device=self.device).repeat_interleave(per_class)

    def __getitem__(self, index: int) -> ClassificationTask:
        support, query = self._draw(self._index(index))
        return ClassificationTask(
            self._tensor(support),
            self._labels(self.shots),
            self._tensor(query),
            self._labels(self.queries),
            self.ways,
        )

    def __iter__(self) -> Iterator[ClassificationTask]:
        return (self[i] for i in range(self.n_episodes))

    def batch(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Stack some episodes into one meta-batch.

        Args:
            indices: Episode indices (a list, a range or a 1-D integer tensor), at least one.

        Returns:
            ``(support_x, support_y, query_x, query_y)`` of shapes
            ``[B, ways * shots, C, H, W]``, ``[B, ways * shots]`` (int64),
            ``[B, ways * queries, C, H, W]``, ``[B, ways * queries]`` (int64).

        Raises:
            ValueError: ``indices`` is empty.
            IndexError: An index is out of range.
        """
        if isinstance(indices, Tensor):
            indices = indices.tolist()
        idx = [self._index(i) for i in indices]
        if not idx:
            raise ValueError("EpisodeSet.batch needs at least one index, got an empty sequence.")
        drawn = [self._draw(i) for i in idx]
        b = len(idx)
        return (
            self._tensor(np.stack([s for s, _ in drawn])),
            self._labels(self.shots).expand(b, -1).clone(),
            self._tensor(np.stack([q for _, q in drawn])),
            self._labels(self.queries).expand(b, -1).clone(),
        )

    def sample_indices(self, meta_batch: int, generator: torch.Generator) -> Tensor:
        """``meta_batch`` episode indices drawn uniformly (with replacement), int64 on CPU.

        With :data:`FRESH_EPISODES` indices a repeat has probability ~ ``meta_batch**2 /
        2**63``: new episodes at every call. Shard these indices between processes, then
        call :meth:`batch`.
        """
        if isinstance(meta_batch, bool) or not isinstance(meta_batch, int) or meta_batch < 1:
            raise ValueError(f"meta_batch must be an int >= 1, got {meta_batch!r}.")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
        drawn = torch.randint(
            self.n_episodes, (meta_batch,), generator=generator, device=generator.device
        )
        return drawn.cpu()

    def sample(
        self, meta_batch: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``batch(sample_indices(meta_batch, generator))``: a meta-batch of episodes."""
        return self.batch(self.sample_indices(meta_batch, generator))

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> EpisodeSet:
        """The same episodes, returned on ``device`` and/or as ``dtype`` (labels stay int64).

        The source, and so its image cache, is shared.
        """
        return EpisodeSet(
            self.source,
            self.classes,
            ways=self.ways,
            shots=self.shots,
            queries=self.queries,
            n_episodes=self.n_episodes,
            seed=self.seed,
            split=self.split,
            dtype=self.dtype if dtype is None else dtype,
            device=self.device if device is None else device,
        )
