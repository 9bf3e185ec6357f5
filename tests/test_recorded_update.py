"""Adam's update recorded as one autograd node (``records_update``) where a step keeps its
graph: unrolled MAML (``Unrolled()``), ``Budget``'s graphs, checkpoint segments with their
graphs and the autograd kernel's step VJPs.

The node saves the state the step starts from and the gradient, not the update's own
intermediates; its backward pass is the optimiser's written transpose. Checked against the
independent references of ``optim_reference.py`` (torch.optim's equations unrolled by plain
autograd), in float64, first and second order, and against SGD's graph for what it saves.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DT, rel_err
from optim_reference import query_grad, unrolled_optimizer
from torch import nn

import amaml
from amaml.flow.loop import AutogradTape
from amaml.flow.reads import StepReads
from amaml.flow.step_maps import base

TOL = 1e-10


class _Net(nn.Module):
    """A custom module with a LayerNorm (the generic autograd kernel, not the fused MLP)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.n, self.b = nn.Linear(2, 7), nn.LayerNorm(7), nn.Linear(7, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.n(self.a(x))))


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = _Net().to(DT)
    x, xq = torch.randn(10, 2, dtype=DT), torch.randn(10, 2, dtype=DT)
    f = lambda z: torch.sin(2 * z).sum(-1, keepdim=True)  # noqa: E731
    return model, (x, f(x)), (xq, f(xq))


OPTIMIZERS = [
    ("adam", amaml.optim.Adam(), "adam", {}),
    ("adam-l2", amaml.optim.Adam(betas=(0.8, 0.95), weight_decay=0.05), "adam",
     {"betas": (0.8, 0.95), "weight_decay": 0.05}),
    ("adamw", amaml.optim.AdamW(weight_decay=0.1), "adamw", {"weight_decay": 0.1}),
    # No written transpose: autograd through the update taken again in the backward pass.
    ("adam-amsgrad", amaml.optim.Adam(amsgrad=True), "adam", {"amsgrad": True}),
    ("rmsprop-centred", amaml.optim.RMSprop(centered=True, momentum=0.5, weight_decay=0.02),
     "rmsprop", {"centered": True, "momentum": 0.5, "weight_decay": 0.02}),
]
PATHS = [
    ("unrolled", {"adjoint": amaml.Unrolled()}),
    ("budget-all", {"memory": amaml.Budget(megabytes=1e6)}),
    ("budget-some", {"memory": amaml.Budget(megabytes=0.01)}),
    ("checkpoint", {"memory": "checkpoint"}),
    ("revolve", {"memory": amaml.Revolve(snapshots=2)}),
]


@pytest.mark.parametrize("path,kw", PATHS, ids=[p[0] for p in PATHS])
@pytest.mark.parametrize("name,opt,kind,h", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_meta_gradient_with_learnable_lr(name, opt, kind, h, path, kw) -> None:
    """The meta-gradient of the weights and of a learnable learning rate."""
    model, (x, y), (xq, yq) = _setup()
    lr = torch.tensor(0.03, dtype=DT, requires_grad=True)
    wrt = [*model.parameters(), lr]
    u = unrolled_optimizer(model, F.mse_loss, lambda k: (x, y), steps=12, lr=lr, kind=kind, h=h)
    ref = query_grad(model, F.mse_loss, u, xq, yq, wrt)
    p = amaml.adapt(model, F.mse_loss, (x, y), steps=12, lr=lr, optimizer=opt, **kw)
    q = F.mse_loss(amaml.functional_call(model, p, xq), yq)
    got = torch.cat([g.reshape(-1) for g in torch.autograd.grad(q, wrt)])
    assert rel_err(got, ref) < TOL
    assert abs(float(got[-1] - ref[-1])) <= TOL * abs(float(ref[-1]))


SECOND_ORDER = [("adam", amaml.optim.Adam(weight_decay=0.02), {"weight_decay": 0.02}),
                ("rmsprop", amaml.optim.RMSprop(centered=True, momentum=0.5),
                 {"centered": True, "momentum": 0.5})]


@pytest.mark.parametrize("kind,opt,h", SECOND_ORDER, ids=[c[0] for c in SECOND_ORDER])
def test_second_order_through_unrolled(kind, opt, h) -> None:
    """A Hessian-vector product of the meta-loss (``create_graph`` through the meta-gradient):
    the node's backward pass is differentiable, written (Adam) or taken again (RMSprop)."""
    model, (x, y), (xq, yq) = _setup(1)
    wrt = list(model.parameters())
    v = [torch.randn_like(t) for t in wrt]

    def hvp(meta_grad):
        dot = sum((g * w).sum() for g, w in zip(meta_grad, v))
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(dot, wrt)])

    u = unrolled_optimizer(model, F.mse_loss, lambda k: (x, y), steps=6, lr=0.05, kind=kind,
                           h=h)
    out = F.mse_loss(torch.func.functional_call(model, dict(zip(
        [n for n, _ in model.named_parameters()], u)), (xq,)), yq)
    ref = hvp(torch.autograd.grad(out, wrt, create_graph=True))
    p = amaml.adapt(model, F.mse_loss, (x, y), steps=6, lr=0.05, optimizer=opt,
                    adjoint=amaml.Unrolled())
    q = F.mse_loss(amaml.functional_call(model, p, xq), yq)
    got = hvp(torch.autograd.grad(q, wrt, create_graph=True))
    assert rel_err(got, ref) < 1e-9


def test_adapt_batch_loop_and_batched_forms() -> None:
    """A meta-batch under ``Unrolled()``: the sum of the tasks' references, whichever form
    (a loop takes the node; the vmap form falls back to autograd's record)."""
    torch.manual_seed(3)
    model = _Net().to(DT)
    B = 3
    xs, xq = torch.randn(B, 8, 2, dtype=DT), torch.randn(B, 8, 2, dtype=DT)
    ys, yq = torch.sin(xs).sum(-1, keepdim=True), torch.sin(xq).sum(-1, keepdim=True)
    wrt = list(model.parameters())
    ref = sum(query_grad(model, F.mse_loss, unrolled_optimizer(
        model, F.mse_loss, lambda k, i=i: (xs[i], ys[i]), steps=8, lr=0.04, kind="adam", h={}),
        xq[i], yq[i], wrt) for i in range(B))
    for tasks in ("loop", "batched"):
        p = amaml.adapt_batch(model, F.mse_loss, (xs, ys), steps=8, lr=0.04, optimizer="adam",
                              adjoint=amaml.Unrolled(), tasks=tasks)
        q = torch.func.vmap(F.mse_loss)(amaml.functional_call_batch(model, p, xq), yq).sum()
        got = torch.cat([g.reshape(-1) for g in torch.autograd.grad(q, wrt)])
        assert rel_err(got, ref) < TOL, tasks


@pytest.mark.parametrize("recorded", [True, False])
def test_what_one_step_saves(recorded: bool, monkeypatch) -> None:
    """One Adam step's graph saves the gradient and nothing else of the parameters' size
    (the state it starts from exists anyway); autograd's record of the elementwise update
    saves four more vectors (the new first moment, the mask and result of the square root,
    the denominator)."""
    if not recorded:
        monkeypatch.setattr(amaml.optim.Adam, "records_update", lambda self: False)
    P = 1000
    z = torch.randn(3, P, dtype=DT).abs().requires_grad_(True)
    r = StepReads(theta=z.detach()[0], lr=torch.tensor(0.1, dtype=DT), mu=None, data=(),
                  hyper={"betas0": 0.9, "betas1": 0.999, "eps": 1e-8, "weight_decay": 0.0})
    out = amaml.optim.Adam().step(3, z, lambda v: v * v, r)  # g = v^2 saves v (a view of z)
    node = type(out.grad_fn).__name__
    assert (node == "_RecordedUpdateBackward") == recorded
    saved = AutogradTape(out, z, [], 3).nbytes()  # what the graph saves, z itself not
    vec = P * 8
    if recorded:
        assert vec <= saved < vec + 64  # g, and the 0-d learning rate
    else:
        assert saved >= 4 * vec
    # Both records give the same step and the same transpose.
    lam = torch.randn(3, P, dtype=DT)
    (bar,) = torch.autograd.grad(out, z, lam)
    with torch.no_grad():
        u, bufs = base.rows_of(z, 3)
        u2, new = amaml.optim.Adam().update(3, u, bufs, u * u, r.lr, r.hyper)
    torch.testing.assert_close(out.detach(), base.stacked(u2, new), rtol=0, atol=0)
    assert torch.isfinite(bar).all()


def test_not_used_where_autograd_must_record() -> None:
    """A hyperparameter that needs a gradient, SGD, and steps taken without a graph keep
    autograd's record or none."""
    P = 50
    z = torch.rand(4, P, dtype=DT).requires_grad_(True)
    hyper = {"betas0": 0.9, "betas1": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    r = StepReads(theta=z.detach()[0], lr=torch.tensor(0.1, dtype=DT), mu=None, data=(),
                  hyper=hyper)
    sgd = amaml.optim.SGD(momentum=0.9)
    r_sgd = r._replace(hyper=sgd.hyperparameters())
    assert type(sgd.step(1, z[:2], lambda v: v * v, r_sgd).grad_fn).__name__ \
        != "_RecordedUpdateBackward"
    b1 = torch.tensor(0.9, dtype=DT, requires_grad=True)
    r2 = r._replace(hyper={**hyper, "betas0": b1})
    out = amaml.optim.Adam().step(1, z[:3], lambda v: v * v, r2)
    assert type(out.grad_fn).__name__ != "_RecordedUpdateBackward"
    with torch.no_grad():
        assert amaml.optim.Adam().step(1, z[:3], lambda v: v * v, r).grad_fn is None


STEP_CASES = [amaml.optim.Adam(), amaml.optim.Adam(amsgrad=True, weight_decay=0.1),
              amaml.optim.AdamW(), amaml.optim.RMSprop(),
              amaml.optim.RMSprop(centered=True, momentum=0.5, weight_decay=0.1)]


@pytest.mark.parametrize("opt", STEP_CASES, ids=lambda o: o.describe())
def test_one_step_first_and_second_order(opt, monkeypatch) -> None:
    """One step whose gradient depends on the state (``g = sin(u) u``): the node's
    ``(dz'/dz)^T lam`` and its derivative again equal those of autograd's own record of the
    update (the node must not count the path through ``g`` twice)."""
    torch.manual_seed(0)
    P = 6
    z = (torch.rand(opt.rows, P, dtype=DT) + 0.5).requires_grad_(True)
    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)
    lam, vec = torch.randn(opt.rows, P, dtype=DT), torch.randn(opt.rows, P, dtype=DT)

    def derivatives():
        r = StepReads(theta=z.detach()[0], lr=lr, mu=None, data=(),
                      hyper=opt.hyperparameters())
        out = opt.step(2, z, lambda v: torch.sin(v) * v, r)
        first = torch.autograd.grad(out, (z, lr), lam, create_graph=True)
        second = torch.autograd.grad((first[0] * vec).sum() + first[1], (z, lr))
        return type(out.grad_fn).__name__, [t.detach() for t in (*first, *second)]

    node, got = derivatives()
    monkeypatch.setattr(type(opt), "records_update", lambda self: False)
    plain, ref = derivatives()
    assert node == "_RecordedUpdateBackward" and plain != node
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
