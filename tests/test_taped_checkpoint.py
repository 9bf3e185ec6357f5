"""Checkpoint and Budget recompute a segment with its autograd graphs kept, on the
autograd kernel (convolutions, BatchNorm, any model off the fused path): exact, and the
graphs actually used.

Tolerance 1e-10 relative in float64 against unrolled autograd (helpers.py), as elsewhere.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DT, conv_bn_apply, conv_bn_net, rel_err, unrolled_meta_grad_apply

import amaml
from amaml.flow import Checkpoint, DiscreteAdjoint
from amaml.flow.integrate import FlowOptions, flow_context

TOL = 1e-10


def _conv_task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(9, 1, 8, 8, dtype=DT, generator=g), torch.randint(0, 3, (9,), generator=g)
    xq = torch.randn(9, 1, 8, 8, dtype=DT, generator=g)
    yq = torch.randint(0, 3, (9,), generator=g)
    return x, y, xq, yq


def _flat_conv_loss(net):
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]

    def loss(u, xb, yb):
        ps = {n: t.view(s) for n, t, s in zip(names, u.split(sizes), shapes)}
        return F.cross_entropy(conv_bn_apply(ps, xb), yb)

    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).requires_grad_()
    return loss, theta


def _sweep(memory, steps: int, net=None):
    """(stats, flat meta-gradient, kept) of ``steps`` steps of the flat conv loss."""
    torch.manual_seed(0)
    net = conv_bn_net() if net is None else net
    x, y, xq, yq = _conv_task()
    loss, theta = _flat_conv_loss(net)
    flow = flow_context(loss, theta, FlowOptions(0.3, steps, data=(x, y),
                                                 adjoint=DiscreteAdjoint(memory)))
    u_end, kept = memory.forward(flow)
    u = flow.params(u_end).detach().requires_grad_()
    lam = torch.autograd.grad(loss(u, xq, yq), u)[0]
    back = flow.backward_flow(flow.reads.tensors(), (True, False, False, False, False))
    lam0 = back.params(memory.sweep(back, kept, lam))
    ref = unrolled_meta_grad_apply(conv_bn_apply, dict(net.named_parameters()), F.cross_entropy,
                                   x, y, xq, yq, steps=steps, lr=0.3)
    return back.stats, lam0, ref, kept


@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_checkpoint_keeps_graphs_on_the_autograd_kernel_and_is_exact(steps: int) -> None:
    stats, got, ref, _ = _sweep(Checkpoint(), steps)
    assert rel_err(got, ref) < TOL
    assert stats.taped_steps == steps  # every step transposed through its kept graph
    assert stats.recomputed_steps < steps


def test_checkpoint_without_graphs_agrees_and_keeps_none() -> None:
    stats, got, ref, _ = _sweep(Checkpoint(tapes=False), 20)
    assert rel_err(got, ref) < TOL
    assert stats.taped_steps == 0


def test_taped_segment_length_minimises_bytes() -> None:
    assert Checkpoint.taped_segment(100, 1, 1) == 10
    assert Checkpoint.taped_segment(100, 1, 16) == round(math.sqrt(100 / 16))
    assert Checkpoint.taped_segment(100, 1, 10**9) == 1
    assert Checkpoint.taped_segment(10, 10**9, 1) == 10  # never longer than the loop
    # the forward pass places its checkpoints at that spacing, measured on step 0
    per_step, state = _graph_bytes()
    for steps in (40, 400):
        every = Checkpoint.taped_segment(steps, state, per_step)
        _, _, _, kept = _sweep(Checkpoint(), steps) if steps == 40 else (0, 0, 0, None)
        if kept is not None:
            assert kept.shape[0] == -(-steps // every)
    assert Checkpoint.taped_segment(400, state, per_step) > 1


def _graph_bytes() -> tuple[int, int]:
    """Bytes of one step's graph and of one state, for the flat conv loss."""
    loss, theta = _flat_conv_loss(conv_bn_net())
    x, y, _, _ = _conv_task()
    flow = flow_context(loss, theta, FlowOptions(0.3, 2, data=(x, y),
                                                 adjoint=DiscreteAdjoint(Checkpoint())))
    return flow.tape_step(flow.initial_state(), 0)[1].nbytes(), theta.numel() * 8


def test_budget_with_room_for_some_steps_keeps_graphs_for_the_rest_too() -> None:
    per_step, _ = _graph_bytes()
    budget = amaml.Budget(megabytes=3.5 * per_step / 2**20)  # three steps' graphs
    stats, got, ref, kept = _sweep(budget, 20)
    assert rel_err(got, ref) < TOL
    assert stats.taped_steps == 17  # the 17 first steps, three at a time, in the sweep
    assert kept.shape[0] == 6 + 1  # checkpoints at 0, 3, ..., 15, then the state at 17


@pytest.mark.parametrize("memory", [amaml.Checkpoint(), amaml.Budget(megabytes=0.02)])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_adapt_conv_optimizer_schedule_and_data_gradient(memory, kind: str) -> None:
    """Adam or SGD with momentum, a learnable per-step schedule and a support input
    meta-parameter on Conv + BN, through taped segments, against unrolled autograd (Conv +
    BN + tanh for Adam: the reference's plain square root is NaN where a ReLU zeroes a
    gradient entry)."""
    from optim_reference import query_grad, unrolled_optimizer

    torch.manual_seed(1)
    net = conv_bn_net()
    if kind == "adam":
        net[2] = torch.nn.Tanh()
    h = {"momentum": 0.9} if kind == "sgd" else {}
    x, y, xq, yq = _conv_task(1)
    x = x.clone().requires_grad_(True)
    lr = torch.full((9,), 0.05, dtype=DT, requires_grad=True)
    wrt = [*net.parameters(), x, lr]
    p = amaml.adapt(net, F.cross_entropy, (x, y), steps=9, lr=lr,
                    optimizer=amaml.optim.SGD(momentum=0.9) if kind == "sgd" else kind,
                    memory=memory)
    got = torch.autograd.grad(F.cross_entropy(amaml.functional_call(net, p, xq), yq), wrt)
    got = torch.cat([t.reshape(-1) for t in got])
    u = unrolled_optimizer(net, F.cross_entropy, lambda k: (x, y), steps=9,
                           lr=lambda k: lr[k], kind=kind, h=h)
    ref = query_grad(net, F.cross_entropy, u, xq, yq, wrt)
    assert rel_err(got, ref) < TOL


def test_adapt_batch_conv_checkpoint_is_exact() -> None:
    torch.manual_seed(2)
    net = conv_bn_net()
    tasks = [_conv_task(s) for s in (3, 4)]
    xs, ys = torch.stack([t[0] for t in tasks]), torch.stack([t[1] for t in tasks])
    p = amaml.adapt_batch(net, F.cross_entropy, (xs, ys), steps=8, lr=0.3, memory="checkpoint")
    out = amaml.functional_call_batch(net, p, torch.stack([t[2] for t in tasks]))
    q = sum(F.cross_entropy(out[b], tasks[b][3]) for b in range(2))
    got = torch.cat([g.reshape(-1) for g in torch.autograd.grad(q, list(net.parameters()))])
    ref = sum(unrolled_meta_grad_apply(conv_bn_apply, dict(net.named_parameters()),
                                       F.cross_entropy, *t, steps=8, lr=0.3) for t in tasks)
    assert rel_err(got, ref) < TOL


def test_explain_says_what_checkpoint_and_budget_keep() -> None:
    net = conv_bn_net()
    x, y, _, _ = _conv_task()
    text = amaml.explain(net, F.cross_entropy, (x, y), steps=5, lr=0.1, memory="checkpoint")
    assert "memory: checkpoint spaced" in text and "autograd graphs kept" in text
    text = amaml.explain(net, F.cross_entropy, (x, y), steps=5, lr=0.1,
                         memory=amaml.Checkpoint(tapes=False))
    assert "memory: checkpoint every 3 steps; each segment's states recomputed" in text
    text = amaml.explain(net, F.cross_entropy, (x, y), steps=5, lr=0.1,
                         memory=amaml.Budget(megabytes=8))
    assert "fit in 8 MiB" in text and "segments with their graphs kept" in text
    mlp = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(),
                              torch.nn.Linear(4, 1)).to(DT)
    text = amaml.explain(mlp, F.mse_loss, (torch.randn(6, 2, dtype=DT),
                                           torch.randn(6, 1, dtype=DT)), steps=5, lr=0.1,
                         memory="checkpoint")
    assert "each segment's states recomputed" in text  # the fused path keeps no graphs
