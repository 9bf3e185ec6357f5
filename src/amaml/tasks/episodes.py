"""Episodes drawn from pools: a fresh support and query set per task and meta-iteration.

With ``make_family(..., pool=P)`` every meta-training task holds ``P`` support and ``P``
query points; the authors' protocol draws, at each meta-iteration, ``shots`` of the first
and ``queries`` of the second (:func:`draw_episode`), so that the meta-learner sees new
points of the same functions instead of one fixed data set per function.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Batch", "draw_episode"]

#: ``(support_x, support_y, query_x, query_y)`` as returned by :meth:`TaskSet.batch`.
Batch = tuple[Tensor, Tensor, Tensor, Tensor]


def _check_count(name: str, flag: str, value: object, pool: int, side: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} ({flag}) must be an int, got {type(value).__name__} {value!r}.")
    if value < 1:
        raise ValueError(f"{name} ({flag}) must be >= 1, got {value}.")
    if value > pool:
        raise ValueError(
            f"{name} ({flag}) = {value} exceeds the pool of {pool} {side} points per task "
            f"(--pool); draw at most {pool}, or build the family with pool >= {value}."
        )
    return value


def _choose(n_tasks: int, pool: int, k: int, generator: torch.Generator) -> Tensor:
    """``[n_tasks, k]`` indices, each row ``k`` distinct draws from ``range(pool)``."""
    if n_tasks == 0:
        return torch.empty((0, k), dtype=torch.long)
    return torch.stack(
        [
            torch.randperm(pool, generator=generator, device=generator.device)[:k]
            for _ in range(n_tasks)
        ]
    )


def _take(t: Tensor, idx: Tensor) -> Tensor:
    rows = torch.arange(t.shape[0], device=t.device).unsqueeze(1)
    return t[rows, idx.to(t.device)]


def draw_episode(batch: Batch, shots: int, queries: int, generator: torch.Generator) -> Batch:
    """Draw one episode per task from a batch of pools, without replacement.

    Args:
        batch: ``(support_x, support_y, query_x, query_y)`` of shapes ``[B, P_s, d]``,
            ``[B, P_s, 1]``, ``[B, P_q, d]``, ``[B, P_q, 1]``, e.g. from
            ``family.train.batch(indices)`` of a family built with ``pool``.
        shots: Support points to draw per task, ``1 <= shots <= P_s``.
        queries: Query points to draw per task, ``1 <= queries <= P_q``.
        generator: Source of the draws (any device; the indices are moved to the
            batch's). The result is a function of its state, which advances.

    Returns:
        ``(support_x, support_y, query_x, query_y)`` of shapes ``[B, shots, d]``,
        ``[B, shots, 1]``, ``[B, queries, d]``, ``[B, queries, 1]``: for each task, the
        rows at ``shots`` distinct support indices and ``queries`` distinct query indices,
        inputs and targets kept together. Support rows come from the support pool only and
        query rows from the query pool only, so the two sets never share a point.

    Raises:
        TypeError: ``batch`` is not a 4-tuple of tensors, ``shots``/``queries`` not ints,
            ``generator`` not a ``torch.Generator``.
        ValueError: Shapes that do not pair up, or ``shots``/``queries`` below 1 or above
            the pool (the message names ``--shots``/``--queries`` and ``--pool``).
    """
    if not (
        isinstance(batch, (tuple, list))
        and len(batch) == 4
        and all(isinstance(t, Tensor) for t in batch)
    ):
        raise TypeError(
            "batch must be the 4-tuple (support_x, support_y, query_x, query_y) of tensors "
            "returned by TaskSet.batch."
        )
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
    support_x, support_y, query_x, query_y = batch
    for name, x, y in (("support", support_x, support_y), ("query", query_x, query_y)):
        if x.dim() != 3 or y.dim() != 3 or x.shape[:2] != y.shape[:2]:
            raise ValueError(
                f"batch {name}_x and {name}_y must be [B, P, d] and [B, P, 1] with the same "
                f"B and P, got {tuple(x.shape)} and {tuple(y.shape)}."
            )
    if support_x.shape[0] != query_x.shape[0]:
        raise ValueError(
            f"batch has {support_x.shape[0]} support pools but {query_x.shape[0]} query pools; "
            "both must hold one per task."
        )
    n_tasks, pool_support, pool_query = (int(n) for n in (*support_x.shape[:2], query_x.shape[1]))
    shots = _check_count("shots", "--shots", shots, pool_support, "support")
    queries = _check_count("queries", "--queries", queries, pool_query, "query")
    idx_s = _choose(n_tasks, pool_support, shots, generator)
    idx_q = _choose(n_tasks, pool_query, queries, generator)
    return (
        _take(support_x, idx_s),
        _take(support_y, idx_s),
        _take(query_x, idx_q),
        _take(query_y, idx_q),
    )
