"""N-way K-shot classification families: the shared builder and its checks.

A classification family has two :class:`~amaml.tasks.episodic.EpisodeSet` splits over
disjoint class lists of one :class:`~amaml.tasks.episodic.AbstractClassSource`:

* meta-training (``family.train``): with ``n_train=None`` (the default) the indices
  ``0 .. FRESH_EPISODES-1``, so :meth:`TaskFamily.sample_train_batch` draws new episodes
  from the meta-training classes at every meta-iteration; with ``n_train`` a fixed set of
  that many episodes;
* meta-test (``family.test``): ``n_test`` fixed episodes of the meta-test classes, drawn
  by index from the seed, so every method evaluated with the same seed sees the same
  episodes. An episode's test set is its query set.

``shots`` and ``queries`` are per class: an episode has ``ways * shots`` support and
``ways * queries`` query images. ``ways`` defaults to :data:`DEFAULT_WAYS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import FamilyRequest, TaskFamily
from .episodic import FRESH_EPISODES, AbstractClassSource, EpisodeSet

__all__ = ["DEFAULT_WAYS", "build_classification"]

#: Classes per episode when ``ways`` is not given.
DEFAULT_WAYS = 5

# SeedSequence spawn keys of the episode draws (0-4: synthetic, collaborative, 5: oracle).
_TRAIN_EPISODES, _TEST_EPISODES = 6, 7


def build_classification(
    name: str,
    request: FamilyRequest,
    source: AbstractClassSource,
    train_classes: Sequence[int],
    test_classes: Sequence[int],
    extra_info: dict[str, Any] | None = None,
) -> TaskFamily:
    """Assemble a classification :class:`TaskFamily` from a source and its class split.

    Args:
        name: Family name recorded in the result.
        request: Validated arguments of :func:`amaml.tasks.make_family`.
        source: The images.
        train_classes: Meta-training class indices of ``source``.
        test_classes: Meta-test class indices, disjoint from ``train_classes``.
        extra_info: More facts to put in ``info``.

    Returns:
        The family, ``kind="classification"``. ``info`` holds the request's arguments,
        ``kind``, ``ways``, ``n_train`` (``None``: fresh episodes), ``classes_train``,
        ``classes_test``, ``input_shape``, ``min_samples_per_class`` and ``extra_info``.

    Raises:
        ValueError: ``pool`` is set; the class lists overlap; ``ways`` exceeds a split's
            classes (names ``--ways``); ``shots + queries`` exceeds the images of some
            class (names ``--shots``/``--queries``).
    """
    if request.pool is not None:
        raise ValueError(
            f"pool={request.pool} (--pool) is for synthetic regression families; {name!r} "
            "draws each episode from its classes: leave pool unset."
        )
    ways = DEFAULT_WAYS if request.ways is None else request.ways
    if set(train_classes) & set(test_classes):
        raise ValueError(f"{name}: meta-training and meta-test classes must be disjoint.")
    for split, classes in (("meta-training", train_classes), ("meta-test", test_classes)):
        if ways > len(classes):
            raise ValueError(
                f"ways ({ways}, --ways) exceeds the {len(classes)} {split} classes of "
                f"{name!r}; ask for at most {len(classes)} ways."
            )
    counts = [source.n_samples(c) for c in (*train_classes, *test_classes)]
    need = request.shots + request.queries
    if min(counts) < need:
        raise ValueError(
            f"shots + queries ({request.shots} + {request.queries}, --shots/--queries) "
            f"exceeds the {min(counts)} images of the smallest class of {name!r}; ask for "
            f"at most {min(counts)} images per class in all."
        )
    n_train = FRESH_EPISODES if request.n_train is None else request.n_train
    train, test = (
        EpisodeSet(
            source,
            classes,
            ways=ways,
            shots=request.shots,
            queries=request.queries,
            n_episodes=n_episodes,
            seed=request.seed,
            split=split,
            dtype=request.dtype,
        )
        for classes, n_episodes, split in (
            (train_classes, n_train, _TRAIN_EPISODES),
            (test_classes, request.n_test, _TEST_EPISODES),
        )
    )
    info: dict[str, Any] = {
        "family": name,
        **request.as_info(),
        "kind": "classification",
        "ways": ways,
        "n_train": request.n_train,
        "classes_train": len(train_classes),
        "classes_test": len(test_classes),
        "input_shape": list(source.image_shape),
        "min_samples_per_class": min(counts),
        **(extra_info or {}),
    }
    return TaskFamily(
        name=name,
        input_dim=train.input_dim,
        train=train,
        test=test,
        info=info,
        kind="classification",
        ways=ways,
    )
