"""adapt_batch(tasks="auto") batches its tasks or loops over them by what one step measures
(amaml.taskrace): the faster side is taken, the race runs once per model shape, and the
numbers are those of either way (exact in float64 against unrolled autograd)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from helpers import DT, rel_err, unrolled_tasks_meta_grad
from torch import nn

import amaml
from amaml import taskrace


class _Residual(nn.Module):
    """Does not fold (a residual connection): vmap's candidate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(2 * 8 * 8, 3)

    def forward(self, x):
        return self.head(torch.flatten(torch.tanh(self.conv(x)) + x, 1))


def _models():
    torch.manual_seed(0)
    folded = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
                           nn.Flatten(), nn.Linear(2 * 8 * 8, 3)).to(DT)
    return {"folded into channels": folded, "batched by vmap": _Residual().to(DT)}


def _data(tasks: int = 3, n: int = 4):
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(tasks, n, 1, 8, 8, dtype=DT, generator=g)
    ys = torch.randint(0, 3, (tasks, n), generator=g)
    xq = torch.randn(tasks, n, 1, 8, 8, dtype=DT, generator=g)
    yq = torch.randint(0, 3, (tasks, n), generator=g)
    return xs, ys, xq, yq


def _unrolled(net, xs, ys, xq, yq, steps, lr):
    return unrolled_tasks_meta_grad(net, xs, ys, xq, yq, list(net.parameters()), steps, lr)


@pytest.fixture
def rigged(monkeypatch):
    """A race whose winner the test sets: the batched side's step takes ``slow["batched"]``
    seconds, each task of the loop ``slow["task"]``; the steps are counted."""
    slow = {"batched": 0.0, "task": 0.0}
    calls = {"batched": 0, "task": 0}

    def step(objective, u, data):
        side = "batched" if objective.batched else "task"
        calls[side] += 1
        time.sleep(slow[side])

    monkeypatch.setattr(taskrace, "_step", step)
    monkeypatch.setattr(taskrace, "_CACHE", type(taskrace._CACHE)())
    return slow, calls


@pytest.mark.parametrize("form", ["folded into channels", "batched by vmap"])
@pytest.mark.parametrize("winner", ["loop", "batched"])
def test_auto_takes_the_side_that_measures_faster(rigged, form: str, winner: str) -> None:
    slow, calls = rigged
    net = _models()[form]
    xs, ys, xq, yq = _data()
    # the loss side: 3 tasks x 4 ms against 30 ms batched, or the reverse
    slow.update({"batched": 0.030, "task": 0.004} if winner == "loop"
                else {"batched": 0.004, "task": 0.010})
    text = amaml.explain(net, F.cross_entropy, (xs, ys), steps=4, lr=0.2, batched=True)
    first = text.splitlines()[0]
    assert "measured one step" in first and form in first
    if winner == "loop":
        assert "tasks one after another (faster than " + form in first
    else:
        assert f"tasks {form}" in first and "one after another" not in first
    assert calls["batched"] >= 2 and calls["task"] == 3 * calls["batched"]

    # The race ran once: adapt_batch with the same shapes reuses it.
    before = dict(calls)
    ref = _unrolled(net, xs, ys, xq, yq, steps=4, lr=0.2)
    p = amaml.adapt_batch(net, F.cross_entropy, (xs, ys), steps=4, lr=0.2)
    assert calls == before
    out = amaml.functional_call_batch(net, p, xq)
    q = sum(F.cross_entropy(out[b], yq[b]) for b in range(xs.shape[0]))
    got = torch.cat([g.reshape(-1) for g in torch.autograd.grad(q, list(net.parameters()))])
    assert rel_err(got, ref) < 1e-10


def test_a_close_race_keeps_the_batched_form(rigged) -> None:
    """The loop must win by the margin (it also pays each task's fixed cost of a call)."""
    slow, _ = rigged
    net = _models()["batched by vmap"]
    xs, ys, _, _ = _data()
    slow.update({"batched": 0.030, "task": 0.0097})  # loop 29.1 ms: within 5%
    first = amaml.explain(net, F.cross_entropy, (xs, ys), steps=2, lr=0.1,
                          batched=True).splitlines()[0]
    assert first.split("; ", 1)[1].startswith("tasks batched by vmap")


def test_fixed_choices_and_other_shapes(rigged) -> None:
    """tasks="batched" / "loop" run no race; another shape races anew; the fused MLP batches
    its tasks itself and runs none either."""
    _, calls = rigged
    net = _models()["batched by vmap"]
    xs, ys, _, _ = _data()
    for tasks in ("batched", "loop"):
        amaml.adapt_batch(net, F.cross_entropy, (xs, ys), steps=2, lr=0.1, tasks=tasks)
    assert calls == {"batched": 0, "task": 0}
    amaml.explain(net, F.cross_entropy, (xs, ys), steps=2, lr=0.1, batched=True)
    n = calls["batched"]
    assert n > 0
    xs2, ys2, _, _ = _data(tasks=2)
    amaml.explain(net, F.cross_entropy, (xs2, ys2), steps=2, lr=0.1, batched=True)
    assert calls["batched"] > n
    n = calls["batched"]
    mlp = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    text = amaml.explain(mlp, F.mse_loss, (torch.randn(2, 5, 2, dtype=DT),
                                           torch.randn(2, 5, 1, dtype=DT)),
                         steps=2, lr=0.1, batched=True)
    assert "tasks batched by the fused MLP" in text.splitlines()[0]
    assert calls["batched"] == n


def test_the_race_itself_times_both_sides() -> None:
    """Unrigged: the figures are real times of both sides and the winner is the faster."""
    net = _models()["batched by vmap"]
    xs, ys, _, _ = _data()
    from amaml.params import FlatModel

    flat = FlatModel(net)

    def loss(u, x, y):
        return F.cross_entropy(torch.func.functional_call(net, flat.unflatten(u), (x,)), y)

    theta = flat.theta()
    r = taskrace.race(("test", 1), loss, loss, theta, [xs, ys])
    assert 0 < r.batched_s < 10 and 0 < r.loop_s < 10
    assert r.loop == (r.loop_s < taskrace.MARGIN * r.batched_s)
    assert taskrace.race(("test", 1), loss, loss, theta, [xs, ys]) is r
