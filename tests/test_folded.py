"""adapt_batch's ways of computing a meta-batch (``tasks=``): folded into channels, vmap,
one task after another: the same adapted parameters and meta-gradients, exact in float64
against unrolled autograd task by task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DT, rel_err, unrolled_tasks_meta_grad
from torch import nn

import amaml
from amaml.folded import FoldedLoss

TOL = 1e-10


def _chain(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv4":  # the Omniglot network, narrow
        layers, c = [], 1
        for _ in range(2):
            layers += [nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c = 4
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).to(DT)
    if kind == "variety":  # stride, groups, no bias, affine-free BN, other pools
        return nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False),
                             nn.BatchNorm2d(4, affine=False), nn.LeakyReLU(0.1),
                             nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Tanh(),
                             nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3)).to(DT)
    if kind == "custom":  # a module subclass whose forward is a chain (torch.fx)

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = nn.Conv2d(2, 3, 3)
                self.bn = nn.BatchNorm2d(3)
                self.flat = nn.Flatten()
                self.head = nn.Linear(3 * 6 * 6, 3)

            def forward(self, x):
                return self.head(self.flat(F.relu(self.bn(self.conv(x)))))

        return Net().to(DT)
    raise ValueError(kind)


def _data(kind: str, tasks: int = 3, n: int = 6):
    g = torch.Generator().manual_seed(1)
    c, hw = (1, 8) if kind == "conv4" else (2, 8)
    xs = torch.randn(tasks, n, c, hw, hw, dtype=DT, generator=g)
    ys = torch.randint(0, 3, (tasks, n), generator=g)
    xq = torch.randn(tasks, n, c, hw, hw, dtype=DT, generator=g)
    yq = torch.randint(0, 3, (tasks, n), generator=g)
    return xs, ys, xq, yq


def _meta_grad(net, xs, ys, xq, yq, wrt, **kw):
    p = amaml.adapt_batch(net, F.cross_entropy, (xs, ys), steps=5, lr=0.2, **kw)
    out = amaml.functional_call_batch(net, p, xq)
    q = sum(F.cross_entropy(out[b], yq[b]) for b in range(xs.shape[0]))
    grads = torch.autograd.grad(q, wrt)
    return p, torch.cat([g.reshape(-1) for g in grads])


def _unrolled(net, xs, ys, xq, yq, wrt, steps=5, lr=0.2):
    return unrolled_tasks_meta_grad(net, xs, ys, xq, yq, wrt, steps, lr)


@pytest.mark.parametrize("kind", ["conv4", "variety", "custom"])
@pytest.mark.parametrize("memory", ["store", "checkpoint"])
def test_folded_matches_unrolled_and_the_loop(kind: str, memory: str) -> None:
    net = _chain(kind)
    xs, ys, xq, yq = _data(kind)
    xs = xs.clone().requires_grad_(True)  # the support inputs as meta-parameters too
    wrt = [*net.parameters(), xs]
    why = amaml.explain(net, F.cross_entropy, (xs, ys), steps=5, lr=0.2, batched=True,
                        tasks="batched")
    assert "tasks folded into channels" in why.splitlines()[0]
    ref = _unrolled(net, xs, ys, xq, yq, wrt)
    p_fold, g_fold = _meta_grad(net, xs, ys, xq, yq, wrt, memory=memory, tasks="batched")
    p_loop, g_loop = _meta_grad(net, xs, ys, xq, yq, wrt, memory=memory, tasks="loop")
    assert rel_err(g_fold, ref) < TOL
    assert rel_err(g_loop, ref) < TOL
    for name in p_fold:
        assert rel_err(p_fold[name], p_loop[name]) < TOL


def test_folded_forward_is_each_task_alone() -> None:
    net = _chain("variety")
    xs, _, _, _ = _data("variety")
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    u = theta + 0.1 * torch.randn(3, theta.numel(), dtype=DT)
    plan = amaml.api._plan(net, F.cross_entropy, (xs, torch.zeros(3, 6, dtype=torch.long)),
                           amaml.api._Options(steps=1, lr=0.1, memory="store", batched=True,
                                              tasks="batched"))
    assert isinstance(plan.loss, FoldedLoss)
    out = plan.loss.forward(u, xs)
    via_api = amaml.functional_call_batch(net, plan.flat.unflatten(u), xs)  # folded too
    for b in range(3):
        ref = amaml.functional_call(net, plan.flat.unflatten(u[b]), xs[b])
        assert rel_err(out[b], ref) < 1e-12
        assert rel_err(via_api[b], ref) < 1e-12
    from amaml.folded import folded_forward

    assert folded_forward(net, plan.flat.unflatten(u), xs, "batch") is not None
    assert folded_forward(net, {}, xs, "batch") is None  # not its parameters: vmap


def test_running_statistics_folded() -> None:
    net = _chain("conv4")
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    xs, ys, _, _ = _data("conv4")
    kw = dict(memory="store", batch_norm="running")
    p_fold = amaml.adapt_batch(net, F.cross_entropy, (xs, ys), steps=4, lr=0.2,
                               tasks="batched", **kw)
    p_loop = amaml.adapt_batch(net, F.cross_entropy, (xs, ys), steps=4, lr=0.2, tasks="loop",
                               **kw)
    for name in p_fold:
        assert rel_err(p_fold[name], p_loop[name]) < TOL


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.flat = nn.Flatten()
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(self.flat(x + self.conv(x)))


@pytest.mark.parametrize("model, why", [
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout(0.1), nn.Flatten(),
                           nn.Linear(72, 3)).to(DT), "Dropout"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding_mode="reflect", padding=1),
                           nn.Flatten(), nn.Linear(128, 3)).to(DT), "reflect"),
    (lambda: _Residual().to(DT), "previous layer's output alone"),
])
def test_what_is_not_folded_says_why_and_takes_vmap(model, why: str) -> None:
    net = model()
    xs = torch.randn(2, 4, 1, 8, 8, dtype=DT)
    ys = torch.randint(0, 3, (2, 4))
    text = amaml.explain(net, F.cross_entropy, (xs, ys), steps=2, lr=0.1, batched=True,
                         tasks="batched").splitlines()[0]
    assert "tasks batched by vmap (not folded:" in text and why in text


def test_auto_folds_conv_chains_and_tasks_is_checked() -> None:
    net = _chain("conv4")
    xs, ys, _, _ = _data("conv4")
    text = amaml.explain(net, F.cross_entropy, (xs, ys), steps=2, lr=0.1, batched=True)
    assert "tasks folded into channels" in text.splitlines()[0]
    text = amaml.explain(net, F.cross_entropy, (xs, ys), steps=2, lr=0.1, batched=True,
                         tasks="loop")
    assert "tasks one after another" in text.splitlines()[0]
    mlp = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    text = amaml.explain(mlp, F.mse_loss, (torch.randn(2, 5, 2, dtype=DT),
                                           torch.randn(2, 5, 1, dtype=DT)),
                         steps=2, lr=0.1, batched=True)
    assert "tasks batched by the fused MLP" in text.splitlines()[0]
    with pytest.raises(ValueError, match="tasks="):
        amaml.adapt_batch(net, F.cross_entropy, (xs, ys), steps=2, lr=0.1, tasks="threads")


def test_vmap_path_matches_the_loop() -> None:
    """A model that does not fold (a residual connection) is batched by vmap, exactly."""
    torch.manual_seed(3)
    net = _Residual().to(DT)
    g = torch.Generator().manual_seed(4)
    xs = torch.randn(2, 4, 1, 8, 8, dtype=DT, generator=g)
    ys = torch.randint(0, 3, (2, 4), generator=g)
    xq = torch.randn(2, 4, 1, 8, 8, dtype=DT, generator=g)
    yq = torch.randint(0, 3, (2, 4), generator=g)
    wrt = list(net.parameters())
    ref = _unrolled(net, xs, ys, xq, yq, wrt)
    for tasks in ("batched", "loop"):
        _, got = _meta_grad(net, xs, ys, xq, yq, wrt, memory="checkpoint", tasks=tasks)
        assert rel_err(got, ref) < TOL


def test_a_loss_weight_the_loss_reads_gets_its_gradient_folded() -> None:
    net = _chain("conv4")
    xs, ys, xq, yq = _data("conv4")
    w = torch.tensor(0.7, dtype=DT, requires_grad=True)

    def weighted(p, t):
        return w * F.cross_entropy(p, t)

    grads = {}
    for tasks in ("batched", "loop"):
        p = amaml.adapt_batch(net, weighted, (xs, ys), steps=4, lr=0.2, tasks=tasks)
        out = amaml.functional_call_batch(net, p, xq)
        q = sum(F.cross_entropy(out[b], yq[b]) for b in range(xs.shape[0]))
        grads[tasks] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            q, [w, *net.parameters()])])
    assert grads["loop"][0] != 0
    assert rel_err(grads["batched"], grads["loop"]) < TOL


def test_mini_batch_schedule_folded_and_looped_agree() -> None:
    net = _chain("conv4")
    xs, ys, xq, yq = _data("conv4", n=8)

    def schedule(k):
        s = (2 * k) % 8
        return xs[:, s:s + 4], ys[:, s:s + 4]

    grads = {}
    for tasks in ("batched", "loop"):
        p = amaml.adapt_batch(net, F.cross_entropy, schedule, steps=5, lr=0.2, tasks=tasks)
        out = amaml.functional_call_batch(net, p, xq)
        q = sum(F.cross_entropy(out[b], yq[b]) for b in range(xs.shape[0]))
        grads[tasks] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            q, list(net.parameters()))])
    assert rel_err(grads["batched"], grads["loop"]) < TOL
