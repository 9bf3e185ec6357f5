"""Containers for meta-learning tasks: :class:`Task`, :class:`TaskSet`, :class:`TaskFamily`.

A *task* is one regression problem (one function, or one user of a recommender). Its
support set is what the inner loop adapts on, its query set what the meta-objective is
measured on, and its test set a larger held-out sample used only for evaluation.
All tensors are 2-D: inputs ``[n, d]`` and targets ``[n, 1]``.

A family's ``kind`` is ``"regression"`` (splits are :class:`TaskSet` of :class:`Task`) or
``"classification"`` (splits are :class:`~amaml.tasks.episodic.EpisodeSet` of N-way
episodes: images ``[n, C, H, W]``, int64 labels ``[n]``). Either way
``family.train.batch(indices)`` returns ``(support_x, support_y, query_x, query_y)``
with a leading task dimension, and :meth:`TaskFamily.sample_train_batch` draws one
meta-training batch.

This module imports nothing from the rest of :mod:`amaml` outside :mod:`amaml.tasks`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .episodes import Batch, draw_episode
from .episodic import EpisodeSet
from .functions import AbstractSyntheticFunction

__all__ = [
    "KINDS",
    "DataError",
    "FamilyRequest",
    "Task",
    "TaskFamily",
    "TaskSet",
]


#: The kinds of task family: what a task's targets are.
KINDS = ("regression", "classification")


class DataError(ValueError):
    """Raised when a data file is missing, unreadable or malformed.

    The message is one sentence naming the file, what is wrong with it and how to fix it.
    """


def _check_pair(name: str, x: Any, y: Any) -> None:
    """Validate one ``(inputs, targets)`` pair of a :class:`Task`."""
    for label, t in ((f"{name}_x", x), (f"{name}_y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"Task.{label} must be a torch.Tensor, got {type(t).__name__}.")
        if not t.is_floating_point():
            raise TypeError(f"Task.{label} must have a floating dtype, got {t.dtype}.")
    if x.dim() != 2:
        raise ValueError(f"Task.{name}_x must be 2-D [n, d], got shape {tuple(x.shape)}.")
    if y.dim() != 2 or y.shape[1] != 1:
        raise ValueError(f"Task.{name}_y must be 2-D [n, 1], got shape {tuple(y.shape)}.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"Task.{name}_x has {x.shape[0]} rows but Task.{name}_y has {y.shape[0]}; "
            "inputs and targets must have the same number of points."
        )


@dataclass(frozen=True)
class Task:
    """One regression task: support, query and test points.

    Attributes:
        support_x: Support inputs, ``[shots, d]``: what the inner loop adapts on.
        support_y: Support targets, ``[shots, 1]``.
        query_x: Query inputs, ``[queries, d]``: what the meta-loss is measured on.
        query_y: Query targets, ``[queries, 1]``.
        test_x: Held-out evaluation inputs, ``[n_test, d]``. ``n_test`` may differ between
            tasks (collaborative filtering: all of a user's remaining ratings).
        test_y: Held-out evaluation targets, ``[n_test, 1]``.

    Raises:
        TypeError: A field is not a floating-point tensor.
        ValueError: Shapes are not 2-D, targets are not ``[n, 1]``, row counts of a pair
            differ, or the input dimension, dtype or device differ between the three pairs.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def __post_init__(self) -> None:
        pairs = (
            ("support", self.support_x, self.support_y),
            ("query", self.query_x, self.query_y),
            ("test", self.test_x, self.test_y),
        )
        for name, x, y in pairs:
            _check_pair(name, x, y)
        d = self.support_x.shape[1]
        if self.query_x.shape[1] != d or self.test_x.shape[1] != d:
            dims = {name: int(x.shape[1]) for name, x, _ in pairs}
            raise ValueError(f"Task inputs must share one input dimension d, got {dims}.")
        tensors = [t for _, x, y in pairs for t in (x, y)]
        dtype = self.support_x.dtype
        if any(t.dtype != dtype for t in tensors):
            dtypes = sorted({str(t.dtype) for t in tensors})
            raise ValueError(f"Task tensors must share one dtype, got {dtypes}.")
        device = self.support_x.device
        if any(t.device != device for t in tensors):
            devices = sorted({str(t.device) for t in tensors})
            raise ValueError(f"Task tensors must be on one device, got {devices}.")

    @property
    def input_dim(self) -> int:
        """Input dimension ``d``."""
        return int(self.support_x.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype shared by all tensors of the task."""
        return self.support_x.dtype

    @property
    def device(self) -> torch.device:
        """Device shared by all tensors of the task."""
        return self.support_x.device

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Task:
        """Return a copy with every tensor moved to ``device`` and/or cast to ``dtype``."""
        return Task(
            **{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)}
        )


class TaskSet:
    """The tasks of one split (meta-training or meta-test) of a :class:`TaskFamily`.

    All tasks share the number of support points (``shots``), of query points
    (``queries``), the input dimension, dtype and device, so that any subset stacks into
    one batch; the number of test points may differ between tasks.

    Args:
        tasks: The tasks, at least one.

    Raises:
        TypeError: An element is not a :class:`Task`.
        ValueError: ``tasks`` is empty or the tasks disagree on shots, queries, input
            dimension, dtype or device.

    Example:
        >>> sx, sy = torch.zeros(5, 2), torch.zeros(5, 1)
        >>> ts = TaskSet([Task(sx, sy, sx, sy, sx, sy)] * 3)
        >>> [tuple(t.shape) for t in ts.batch([0, 2])]
        [(2, 5, 2), (2, 5, 1), (2, 5, 2), (2, 5, 1)]
    """

    def __init__(self, tasks: Sequence[Task]) -> None:
        tasks = list(tasks)
        if not tasks:
            raise ValueError("TaskSet needs at least one task, got an empty sequence.")
        for i, task in enumerate(tasks):
            if not isinstance(task, Task):
                raise TypeError(f"TaskSet element {i} must be a Task, got {type(task).__name__}.")
        first = tasks[0]
        ref = self._signature(first)
        for i, task in enumerate(tasks[1:], start=1):
            sig = self._signature(task)
            if sig != ref:
                raise ValueError(
                    f"Task {i} has (shots, queries, d, dtype, device) = {sig} but task 0 has "
                    f"{ref}; all tasks of a TaskSet must agree so that they can be batched."
                )
        self.tasks: list[Task] = tasks

    @staticmethod
    def _signature(task: Task) -> tuple[int, int, int, str, str]:
        return (
            int(task.support_x.shape[0]),
            int(task.query_x.shape[0]),
            task.input_dim,
            str(task.dtype),
            str(task.device),
        )

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> Task:
        return self.tasks[index]

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __repr__(self) -> str:
        return (
            f"TaskSet(n_tasks={len(self)}, shots={self.shots}, queries={self.queries}, "
            f"input_dim={self.input_dim}, dtype={self.dtype})"
        )

    @property
    def shots(self) -> int:
        """Number of support points per task."""
        return int(self.tasks[0].support_x.shape[0])

    @property
    def queries(self) -> int:
        """Number of query points per task."""
        return int(self.tasks[0].query_x.shape[0])

    @property
    def input_dim(self) -> int:
        """Input dimension ``d``."""
        return self.tasks[0].input_dim

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(d,)``: the shape of one input."""
        return (self.input_dim,)

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of every tensor."""
        return self.tasks[0].dtype

    @property
    def device(self) -> torch.device:
        """Device of every tensor."""
        return self.tasks[0].device

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Stack the support and query sets of some tasks into one meta-batch.

        Args:
            indices: Task indices (a list, a range or a 1-D integer tensor), at least one.
                Repeats are allowed.

        Returns:
            ``(support_x, support_y, query_x, query_y)`` of shapes ``[B, shots, d]``,
            ``[B, shots, 1]``, ``[B, queries, d]``, ``[B, queries, 1]`` with
            ``B = len(indices)``.

        Raises:
            ValueError: ``indices`` is empty.
            IndexError: An index is out of range.
        """
        if isinstance(indices, Tensor):
            indices = indices.tolist()
        idx = [int(i) for i in indices]
        if not idx:
            raise ValueError("TaskSet.batch needs at least one index, got an empty sequence.")
        n = len(self.tasks)
        for i in idx:
            if not -n <= i < n:
                raise IndexError(f"Task index {i} is out of range for a TaskSet of {n} tasks.")
        chosen = [self.tasks[i] for i in idx]
        return (
            torch.stack([t.support_x for t in chosen]),
            torch.stack([t.support_y for t in chosen]),
            torch.stack([t.query_x for t in chosen]),
            torch.stack([t.query_y for t in chosen]),
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TaskSet:
        """Return a new TaskSet with every task moved to ``device`` and/or cast to ``dtype``."""
        return TaskSet([t.to(device=device, dtype=dtype) for t in self.tasks])


@dataclass(frozen=True)
class TaskFamily:
    """A meta-learning benchmark: meta-training and meta-test tasks plus facts about them.

    Attributes:
        name: Registered family name, e.g. ``"cosmixture"``.
        input_dim: Input dimension ``d`` of every task; for classification the flattened
            image size ``C * H * W`` (:attr:`input_shape` gives ``(C, H, W)``).
        train: Meta-training tasks: a :class:`TaskSet` (regression) or an
            :class:`~amaml.tasks.episodic.EpisodeSet` (classification).
        test: Meta-test tasks, of the same type as ``train``. Classification: ``n_test``
            fixed episodes, the same for every method evaluated with the same seed.
        info: JSON-serialisable facts: normalisation statistics, counts, the request's
            arguments (see each builder for its keys).
        function: The distribution the tasks' functions were drawn from (synthetic
            families), which the least-squares oracle fits; ``None`` for families without
            a parametric form (collaborative filtering, classification). Not part of
            ``info``, which is written as JSON.
        kind: ``"regression"`` (targets ``[n, 1]`` floating) or ``"classification"``
            (labels ``[n]`` int64 in ``0 .. ways-1``).
        ways: Classes per task ``N`` (classification), ``None`` for regression.

    Raises:
        TypeError: A split of the wrong type for ``kind``.
        ValueError: Unknown ``kind``, ``ways`` inconsistent with ``kind`` or the splits,
            or a split's input dimension differing from ``input_dim``.
    """

    name: str
    input_dim: int
    train: TaskSet | EpisodeSet
    test: TaskSet | EpisodeSet
    info: dict[str, Any] = field(default_factory=dict)
    function: AbstractSyntheticFunction | None = field(default=None, compare=False)
    kind: str = "regression"
    ways: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"TaskFamily.kind must be one of {KINDS}, got {self.kind!r}.")
        split_type = TaskSet if self.kind == "regression" else EpisodeSet
        for split in ("train", "test"):
            ts = getattr(self, split)
            if not isinstance(ts, split_type):
                raise TypeError(
                    f"TaskFamily.{split} of a {self.kind} family must be a "
                    f"{split_type.__name__}, got {type(ts).__name__}."
                )
            if ts.input_dim != self.input_dim:
                raise ValueError(
                    f"TaskFamily.{split} has input_dim {ts.input_dim}, but the family "
                    f"declares input_dim={self.input_dim}."
                )
            if isinstance(ts, EpisodeSet) and ts.ways != self.ways:
                raise ValueError(
                    f"TaskFamily.{split} draws {ts.ways}-way episodes, but the family "
                    f"declares ways={self.ways}."
                )
        if self.kind == "regression" and self.ways is not None:
            raise ValueError(f"TaskFamily.ways is for classification, got {self.ways!r}.")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input: ``(d,)`` (regression) or ``(C, H, W)`` (classification)."""
        return self.train.input_shape

    def sample_train_batch(self, meta_batch: int, generator: torch.Generator) -> Batch:
        """Draw one meta-training batch, as ``(support_x, support_y, query_x, query_y)``.

        Regression: ``min(meta_batch, len(train))`` distinct tasks
        (``torch.randperm(len(train), generator=generator)[:meta_batch]``), then, for a
        family built with ``pool``, a fresh episode from each pool (:func:`draw_episode`).
        Classification: ``meta_batch`` episode indices uniform in ``range(len(train))``
        (:meth:`EpisodeSet.sample`; fresh episodes unless ``n_train`` was given).

        Args:
            meta_batch: Tasks per meta-batch, >= 1.
            generator: Source of the draws; its state advances.

        Returns:
            Shapes as :meth:`TaskSet.batch` (regression) or :meth:`EpisodeSet.batch`
            (classification: images ``[B, ways * shots, C, H, W]``, int64 labels
            ``[B, ways * shots]``, likewise for the queries).
        """
        if isinstance(meta_batch, bool) or not isinstance(meta_batch, int) or meta_batch < 1:
            raise ValueError(f"meta_batch must be an int >= 1, got {meta_batch!r}.")
        if isinstance(self.train, EpisodeSet):
            return self.train.sample(meta_batch, generator)
        draw = torch.randperm(len(self.train), generator=generator)[:meta_batch]
        batch = self.train.batch(draw.tolist())
        if self.info.get("pool") is not None:
            batch = draw_episode(batch, self.info["shots"], self.info["queries"], generator)
        return batch

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TaskFamily:
        """Return a copy with every task moved to ``device`` and/or cast to ``dtype``.

        ``info`` and ``function`` are kept (``info["dtype"]`` follows a cast).
        Classification labels stay int64.
        """
        info = dict(self.info)
        if dtype is not None and "dtype" in info:
            info["dtype"] = str(dtype).removeprefix("torch.")
        return replace(
            self,
            train=self.train.to(device=device, dtype=dtype),
            test=self.test.to(device=device, dtype=dtype),
            info=info,
        )


@dataclass(frozen=True)
class FamilyRequest:
    """Validated arguments of :func:`amaml.tasks.make_family`, handed to a family builder.

    Attributes:
        shots: Support points per task.
        queries: Query points per task.
        n_train: Meta-training tasks; ``None`` means the family's default.
        n_test: Meta-test tasks.
        seed: Seed of every random choice (non-negative).
        root: Data folder of file-based families; ``None`` means the cache folder.
        download: Whether a file-based family may download its official archive.
        dtype: Floating dtype of the returned tensors.
        pool: Points per meta-training task (support and query each) from which episodes
            are drawn (:func:`amaml.tasks.draw_episode`); ``None``: ``shots`` and
            ``queries`` as for meta-test tasks. Synthetic families only.
        ways: Classes per task (classification families), ``None`` for regression.
            Classification: ``shots`` and ``queries`` are per class.
    """

    shots: int
    queries: int
    n_train: int | None
    n_test: int
    seed: int
    root: Path | None
    download: bool
    dtype: torch.dtype
    pool: int | None = None
    ways: int | None = None

    def as_info(self) -> dict[str, Any]:
        """The request as JSON-serialisable facts (``ways`` only when set)."""
        out: dict[str, Any] = {
            "shots": self.shots,
            "queries": self.queries,
            "n_test": self.n_test,
            "seed": self.seed,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        if self.ways is not None:
            out["ways"] = self.ways
        return out
