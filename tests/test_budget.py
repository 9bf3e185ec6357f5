"""``amaml.Budget``: step graphs kept while they fit, checkpoints beyond; exact either way.

Tolerance 1e-10 relative in float64 against unrolled autograd (helpers.py), as elsewhere:
the taped steps are back-propagated as unrolling does, the others as the adjoint does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DT,
    amaml_meta_grad,
    conv_bn_apply,
    conv_bn_net,
    mlp,
    regression_data,
    rel_err,
    unrolled_meta_grad,
    unrolled_meta_grad_apply,
)

import amaml
from amaml.flow import DiscreteAdjoint
from amaml.flow.integrate import FlowOptions, flow_context

TOL = 1e-10
# no room, room for some steps, room for every step (MiB; one step's graph is ~40 KiB here)
BUDGETS = [0.0, 0.2, 64.0]


@pytest.mark.parametrize("mb", BUDGETS)
@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_budget_matches_unrolled(mb: float, solver: str) -> None:
    model = mlp(hidden=16)
    x, y, xq, yq = regression_data()
    lr = torch.tensor(0.03, dtype=DT, requires_grad=True)
    mu = torch.tensor(0.4, dtype=DT, requires_grad=True)
    ref = unrolled_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=30, lr=lr, mu=mu,
                             solver=solver, extra=(lr, mu))
    got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=30, lr=lr, proximal=mu,
                          solver=solver, memory=amaml.Budget(megabytes=mb), extra=(lr, mu))
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("mb", BUDGETS)
def test_budget_with_optimizer_schedule_and_batch(mb: float) -> None:
    """Adam, a learnable per-step schedule, distilled inputs, a meta-batch of 2."""
    from optim_reference import query_grad, unrolled_optimizer

    model = mlp(hidden=8)
    xs, ys, xq, yq = regression_data(batch=2)
    xs = xs.clone().requires_grad_(True)
    lr = torch.full((12,), 0.02, dtype=DT, requires_grad=True)
    wrt = [*model.parameters(), xs, lr]
    for t in wrt:
        t.grad = None
    p = amaml.adapt_batch(model, F.mse_loss, (xs, ys), steps=12, lr=lr, optimizer="adam",
                          memory=amaml.Budget(megabytes=mb))
    torch.func.vmap(F.mse_loss)(amaml.functional_call_batch(model, p, xq), yq).sum().backward()
    got = torch.cat([t.grad.reshape(-1) for t in wrt])
    ref = 0
    for b in range(2):
        u = unrolled_optimizer(model, F.mse_loss, lambda k, b=b: (xs[b], ys[b]), steps=12,
                               lr=lambda k: lr[k], kind="adam", h={})
        ref = ref + query_grad(model, F.mse_loss, u, xq[b], yq[b], wrt)
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("mb", BUDGETS)
def test_budget_conv_batchnorm(mb: float) -> None:
    net = conv_bn_net()
    x, y = torch.randn(9, 1, 8, 8, dtype=DT), torch.randint(0, 3, (9,))
    xq, yq = torch.randn(9, 1, 8, 8, dtype=DT), torch.randint(0, 3, (9,))
    p = amaml.adapt(net, F.cross_entropy, (x, y), steps=6, lr=0.3,
                    memory=amaml.Budget(megabytes=mb))
    F.cross_entropy(amaml.functional_call(net, p, xq), yq).backward()
    got = torch.cat([t.grad.reshape(-1) for t in net.parameters()])
    ref = unrolled_meta_grad_apply(lambda q, z: conv_bn_apply(q, z), dict(net.named_parameters()),
                                   F.cross_entropy, x, y, xq, yq, steps=6, lr=0.3)
    assert rel_err(got, ref) < TOL


def test_budget_keeps_what_fits_and_a_second_backward_recomputes() -> None:
    model = mlp(hidden=16)
    x, y, xq, yq = regression_data()
    theta = torch.cat([p.reshape(-1) for p in model.parameters()]).detach().requires_grad_()
    names = [n for n, _ in model.named_parameters()]

    def loss(u, xb, yb):
        ps = dict(zip(names, u.split([p.numel() for p in model.parameters()])))
        ps = {n: t.view_as(p) for (n, t), p in zip(ps.items(), model.parameters())}
        return F.mse_loss(torch.func.functional_call(model, ps, (xb,)), yb)

    flow = flow_context(loss, theta, FlowOptions(
        0.03, 40, data=(x, y), adjoint=DiscreteAdjoint(amaml.Budget(megabytes=0.0))))
    z1, tape = flow.tape_step(flow.initial_state(), 0)
    per_step = tape.nbytes()
    assert per_step > 0
    budget = amaml.Budget(megabytes=10.5 * per_step / 2**20)
    flow = flow_context(loss, theta, FlowOptions(0.03, 40, data=(x, y),
                                                 adjoint=DiscreteAdjoint(budget)))
    budget.forward(flow)
    assert flow.stats.taped_steps == 10  # floor(10.5): the budget is not exceeded
    assert sum(t.nbytes() for t in flow.carry["budget"]) <= budget.megabytes * 2**20
    # retain_graph: the second backward recomputes the taped steps and agrees
    model.zero_grad()
    p = amaml.adapt(model, F.mse_loss, (x, y), steps=40, lr=0.03, memory=budget)
    q = F.mse_loss(amaml.functional_call(model, p, xq), yq)
    g1 = torch.autograd.grad(q, list(model.parameters()), retain_graph=True)
    g2 = torch.autograd.grad(q, list(model.parameters()))
    ref = unrolled_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=40, lr=0.03)
    for g in (g1, g2):
        assert rel_err(torch.cat([t.reshape(-1) for t in g]), ref) < TOL


def test_budget_is_registered_and_checked() -> None:
    assert isinstance(amaml.api.resolve_memory("budget"), amaml.Budget)
    with pytest.raises(ValueError, match="megabytes"):
        amaml.Budget(megabytes=-1)
