"""Tests of draw_episode: fresh support and query sets drawn from each task's pools."""

from __future__ import annotations

import pytest
import torch

from amaml.tasks import draw_episode, make_family

F64 = torch.float64


def pools(n_tasks: int = 3, pool_support: int = 12, pool_query: int = 9, d: int = 2) -> tuple:
    """Pools whose rows are unique and whose target is a function of the input row."""
    g = torch.Generator().manual_seed(0)
    sx = torch.randn(n_tasks, pool_support, d, generator=g, dtype=F64)
    qx = torch.randn(n_tasks, pool_query, d, generator=g, dtype=F64)
    return sx, sx.sum(-1, keepdim=True), qx, qx.sum(-1, keepdim=True)


def test_shapes_rows_from_the_pool_without_replacement() -> None:
    batch = pools()
    sx, sy, qx, qy = draw_episode(batch, 5, 4, torch.Generator().manual_seed(1))
    assert (sx.shape, sy.shape, qx.shape, qy.shape) == ((3, 5, 2), (3, 5, 1), (3, 4, 2), (3, 4, 1))
    assert sx.dtype == F64
    torch.testing.assert_close(sy, sx.sum(-1, keepdim=True), rtol=0, atol=0)  # pairs kept
    torch.testing.assert_close(qy, qx.sum(-1, keepdim=True), rtol=0, atol=0)
    for b in range(3):
        for drawn, pool in ((sx[b], batch[0][b]), (qx[b], batch[2][b])):
            match = (drawn[:, None, :] == pool[None, :, :]).all(-1)  # [k, P]
            assert torch.all(match.sum(1) == 1)  # every row is a row of its own task's pool
            assert torch.all(match.sum(0) <= 1)  # no pool row twice


def test_deterministic_given_the_generator_state() -> None:
    batch = pools()
    a = draw_episode(batch, 5, 4, torch.Generator().manual_seed(3))
    b = draw_episode(batch, 5, 4, torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    g = torch.Generator().manual_seed(3)
    first, second = draw_episode(batch, 5, 4, g), draw_episode(batch, 5, 4, g)
    assert not torch.equal(first[0], second[0])  # the state advances: a fresh episode


def test_every_pool_point_is_drawn() -> None:
    batch = pools(n_tasks=1, pool_support=10, pool_query=10)
    g = torch.Generator().manual_seed(0)
    seen = torch.zeros(10, dtype=torch.bool)
    for _ in range(40):  # P(a point is missed 40 times at 3/10) = 0.7**40 ~ 6e-7
        sx = draw_episode(batch, 3, 3, g)[0][0]
        seen |= (sx[:, None, :] == batch[0][0][None]).all(-1).any(0)
    assert seen.all()


def test_whole_pool_is_a_permutation() -> None:
    batch = pools()
    sx, _, qx, _ = draw_episode(batch, 12, 9, torch.Generator().manual_seed(0))
    for drawn, pool in ((sx, batch[0]), (qx, batch[2])):
        key = lambda t: t[..., 0].sort(-1).values  # noqa: E731
        assert torch.equal(key(drawn), key(pool))


def test_with_a_pool_family() -> None:
    fam = make_family("alpine-paper", shots=4, queries=6, pool=20, n_train=5, n_test=2, dtype=F64)
    batch = fam.train.batch([0, 3])
    episode = draw_episode(batch, 4, 6, torch.Generator().manual_seed(0))
    assert [tuple(t.shape) for t in episode] == [(2, 4, 2), (2, 4, 1), (2, 6, 2), (2, 6, 1)]


@pytest.mark.parametrize(
    "shots, queries, match",
    [
        (13, 4, r"shots \(--shots\) = 13 exceeds the pool of 12 support points .*--pool"),
        (5, 10, r"queries \(--queries\) = 10 exceeds the pool of 9 query points .*--pool"),
        (0, 4, r"shots \(--shots\) must be >= 1"),
    ],
)
def test_counts_above_the_pool_name_the_flags(shots: int, queries: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        draw_episode(pools(), shots, queries, torch.Generator())


def test_argument_errors() -> None:
    batch = pools()
    with pytest.raises(TypeError, match="4-tuple"):
        draw_episode(batch[:3], 2, 2, torch.Generator())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        draw_episode(batch, 2, 2, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"shots \(--shots\) must be an int"):
        draw_episode(batch, 2.0, 2, torch.Generator())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same B and P"):
        draw_episode((batch[0], batch[1][:, :3], batch[2], batch[3]), 2, 2, torch.Generator())
    with pytest.raises(ValueError, match="one per task"):
        draw_episode((*batch[:2], batch[2][:2], batch[3][:2]), 2, 2, torch.Generator())
