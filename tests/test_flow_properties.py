"""Closed forms, convergence orders, memory held, gradcheck and finite differences."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DT, amaml_meta_grad, mlp, regression_data, rel_err, unrolled_meta_grad

import amaml
from amaml.flow import (
    RK4,
    Backsolve,
    Checkpoint,
    DiscreteAdjoint,
    Euler,
    FlowContext,
    FlowSpec,
    Heun,
    Objective,
    Reads,
    Store,
    adjoint_sweep,
    forward_kept,
    gradient_flow,
)


def _quadratic(P: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=DT))
    H = Q @ torch.diag(torch.linspace(0.5, 3.0, P, dtype=DT)) @ Q.T
    a = torch.randn(P, generator=g, dtype=DT)  # minimiser of the support loss
    b = torch.randn(P, generator=g, dtype=DT)  # minimiser of the query loss
    theta = torch.randn(P, generator=g, dtype=DT)

    def loss(u: torch.Tensor) -> torch.Tensor:
        return 0.5 * (u - a) @ H @ (u - a)

    return H, a, b, theta, loss


def _closed_form_meta_grad(H, a, b, theta, T):
    """u(T) = a + e^{-HT}(theta - a); d/dtheta 0.5||u(T) - b||^2 = e^{-HT}(u(T) - b)."""
    E = torch.linalg.matrix_exp(-H * T)
    uT = a + E @ (theta - a)
    return uT, E @ (uT - b)


def _meta_grad_quadratic(solver, dt, memory=Store(), T=1.0):
    H, a, b, theta, loss = _quadratic()
    th = theta.clone().requires_grad_()
    uT = gradient_flow(loss, th, dt=dt, t1=T, solver=solver, adjoint=DiscreteAdjoint(memory))
    (0.5 * (uT - b).square().sum()).backward()
    return uT.detach(), th.grad


@pytest.mark.parametrize("solver", [Euler(), Heun(), RK4()])
def test_quadratic_closed_form(solver) -> None:
    H, a, b, theta, _ = _quadratic()
    uT_exact, g_exact = _closed_form_meta_grad(H, a, b, theta, 1.0)
    uT, g = _meta_grad_quadratic(solver, 1 / 256)
    # discretisation error C * dt**order with C ~ 1 here: 4e-3 for Euler at dt = 1/256
    tol = 5 * (1 / 256) ** solver.order
    assert rel_err(uT, uT_exact) < tol
    assert rel_err(g, g_exact) < tol


@pytest.mark.parametrize("solver", [Euler(), Heun(), RK4()])
def test_meta_grad_convergence_order(solver) -> None:
    H, a, b, theta, _ = _quadratic()
    _, g_exact = _closed_form_meta_grad(H, a, b, theta, 1.0)
    dts = [2.0**-k for k in range(3, 7)]
    errs = [rel_err(_meta_grad_quadratic(solver, dt)[1], g_exact) for dt in dts]
    slope = np.polyfit(np.log(dts), np.log(errs), 1)[0]
    assert abs(slope - solver.order) < 0.3  # asymptotic fit over 4 points; loose on purpose


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2)])
def test_backsolve_converges_to_exact_gradient(solver: str, order: int) -> None:
    """At fixed horizon T, backsolve's error against the exact discrete gradient on the
    paper's MLP shrinks at least like lr**order (measured: slope 1.0 for Euler, 3.0 for
    Heun, whose leading error terms cancel)."""
    model = mlp()
    x, y, xq, yq = regression_data()
    T = 0.2
    lrs = [0.01, 0.005, 0.0025, 0.00125]
    errs = []
    for lr in lrs:
        steps = round(T / lr)
        exact = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=steps, lr=lr,
                                solver=solver, memory="store")
        approx = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=steps, lr=lr,
                                 solver=solver, memory="backsolve")
        errs.append(rel_err(approx, exact))
    slope = np.polyfit(np.log(lrs), np.log(errs), 1)[0]
    assert slope > order - 0.3
    assert errs[-1] < 0.01


@pytest.mark.parametrize("solver", [Euler(), Heun(), RK4()])
def test_backsolve_order_against_closed_form(solver) -> None:
    """On the quadratic, backsolve converges to e^{-HT} grad at the solver's order."""
    H, a, b, theta, _ = _quadratic()
    _, g_exact = _closed_form_meta_grad(H, a, b, theta, 1.0)
    dts = [2.0**-k for k in range(3, 7)]
    errs = [rel_err(_meta_grad_quadratic(solver, dt, memory=Backsolve(tol=1.0))[1], g_exact)
            for dt in dts]
    slope = np.polyfit(np.log(dts), np.log(errs), 1)[0]
    assert abs(slope - solver.order) < 0.3  # asymptotic fit; loose on purpose


def test_backsolve_blow_up_is_detected() -> None:
    """Gradient flow run backward diverges on a long horizon: an error, not a wrong gradient."""
    model = mlp()
    x, y, xq, yq = regression_data()
    with pytest.raises(amaml.BacksolveError, match="checkpoint"):
        amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=200, lr=0.05, memory="backsolve")


def _saved_states(memory: object, steps: int) -> float:
    """Numbers kept alive between forward and backward by adapt, in units of P.

    The pack hook also sees the short-lived graphs of each inner gradient; only the
    packed tensors still referenced once adapt has returned are what the backward keeps.
    """
    import gc
    import weakref

    model = mlp(hidden=8)
    x, y, _, _ = regression_data()
    P = sum(p.numel() for p in model.parameters())

    class _Box:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

    boxes: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> _Box:
        box = _Box(t)
        boxes.append(weakref.ref(box))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        params = amaml.adapt(model, F.mse_loss, (x, y), steps=steps, lr=0.01, memory=memory)
    gc.collect()
    alive = [r() for r in boxes]
    held = sum(b.t.numel() for b in alive if b is not None) / P
    del params
    return held


@pytest.mark.parametrize("steps", [100, 400, 900])
def test_checkpoint_keeps_sqrt_states(steps: int) -> None:
    held = _saved_states("checkpoint", steps)
    # sqrt(N) checkpoints, plus theta itself and the (small) support data
    assert held <= math.sqrt(steps) + 3
    assert _saved_states("store", steps) >= steps + 1
    assert _saved_states("backsolve", steps) <= 3


def _flat_mlp_flow(memory, steps: int, hidden: int = 8):
    torch.manual_seed(11)  # the same model and data for every memory strategy
    model = mlp(hidden=hidden)
    x, y, _, _ = regression_data()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(u, xb, yb):
        ps = {n: t.view(s) for n, t, s in zip(names, u.split(sizes), shapes)}
        return F.mse_loss(torch.func.functional_call(model, ps, (xb,)), yb)

    spec = FlowSpec(Objective(loss), Euler(), steps, n_data=2)
    return spec, theta, (x, y)


def _run(memory, spec, theta, dt, data, lam=None):
    """One forward pass and one sweep of the theta gradient: ``(g_theta, backward flow,
    kept)``."""
    adjoint = DiscreteAdjoint(memory)
    flow = FlowContext(spec, Reads(theta, dt, None, tuple(data)))
    u_end, kept = forward_kept(adjoint, flow)
    back = flow.backward_flow(flow.reads.tensors(), (True,) + (False,) * (2 + len(data)))
    lam = torch.ones_like(u_end) if lam is None else lam.reshape(u_end.shape)
    return adjoint_sweep(adjoint, back, kept, lam)[0], back, kept


@pytest.mark.parametrize("steps", [100, 400, 1000])
def test_checkpoint_peak_states_during_backward(steps: int) -> None:
    """Checkpoints plus one recomputed segment: at most about 2 sqrt(N) states; with the
    segment's graphs kept, ceil(N / L) checkpoints and L graphs for the L that holds the
    fewest bytes."""
    dt = torch.tensor(0.01, dtype=DT)
    for memory in (Checkpoint(tapes=False), Checkpoint()):
        spec, theta, data = _flat_mlp_flow(memory, steps)
        _, back, kept = _run(memory, spec, theta, dt, data)
        stats, every = back.stats, back.carry["checkpoint_every"]
        if memory.tapes is False:
            assert stats.peak_states <= 2 * math.ceil(math.sqrt(steps))
            assert stats.taped_steps == 0
        else:
            assert every == Checkpoint.taped_segment(steps, theta.numel() * 8, _graph(spec))
            assert stats.peak_states <= kept.shape[0] + every
            assert stats.taped_steps == steps
        assert stats.recomputed_steps < steps  # one extra forward pass at most


def _graph(spec) -> int:
    """Bytes one step's graph keeps (what the taped checkpoint measures)."""
    _, theta, data = _flat_mlp_flow(Checkpoint(), 2)
    flow = FlowContext(spec, Reads(theta, torch.tensor(0.01, dtype=DT), None, tuple(data)))
    return flow.tape_step(flow.initial_state(), 0)[1].nbytes()


@pytest.mark.parametrize("adjoint", [DiscreteAdjoint(Store()),
                                     DiscreteAdjoint(Checkpoint(every=2)),
                                     DiscreteAdjoint(Backsolve(tol=1.0))])
@pytest.mark.parametrize("solver", [Euler(), RK4()])
def test_gradcheck_flow_function(adjoint, solver) -> None:
    """torch.autograd.gradcheck of the custom Function w.r.t. theta, lr and mu."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(5, 4, generator=g, dtype=DT)
    c = torch.randn(5, generator=g, dtype=DT)

    def loss(u, A_, c_):
        return torch.log(torch.cosh(A_ @ u - c_)).sum() + 0.1 * (u**4).sum()

    def f(theta, lr, mu):
        return gradient_flow(loss, theta, dt=lr, n_steps=5, data=(A, c), solver=solver,
                             adjoint=adjoint, mu=mu)

    theta = torch.randn(4, generator=g, dtype=DT, requires_grad=True)
    lr = torch.tensor(0.05, dtype=DT, requires_grad=True)
    mu = torch.tensor(0.3, dtype=DT, requires_grad=True)
    if isinstance(adjoint.memory, Backsolve):
        # backsolve is approximate by design: compare it with the exact adjoint instead
        exact = torch.autograd.grad(gradient_flow(loss, theta, dt=lr, n_steps=5, data=(A, c),
                                                  solver=solver, mu=mu).sum(), theta)[0]
        approx = torch.autograd.grad(f(theta, lr, mu).sum(), theta)[0]
        assert rel_err(approx, exact) < 0.05
        return
    assert torch.autograd.gradcheck(f, (theta, lr, mu), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_meta_gradient_finite_differences() -> None:
    """Central differences of J(theta) = query loss after adaptation, tiny model."""
    model = mlp(hidden=4)
    x, y, xq, yq = regression_data(n=10)
    got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=50, lr=0.05, solver="rk4",
                          memory="checkpoint")
    params = list(model.parameters())
    eps = 1e-5
    fd = []
    with torch.no_grad():
        for p in params:
            flat = p.view(-1)
            for i in range(flat.numel()):
                vals = []
                for s in (eps, -eps):
                    flat[i] += s
                    pa = amaml.adapt(model, F.mse_loss, (x, y), steps=50, lr=0.05, solver="rk4")
                    vals.append(F.mse_loss(torch.func.functional_call(model, pa, (xq,)), yq))
                    flat[i] -= s
                fd.append((vals[0] - vals[1]) / (2 * eps))
    fd_t = torch.stack(fd)
    # central differences: truncation O(eps^2) ~ 1e-10, round-off ~ 1e-16/eps ~ 1e-11
    assert rel_err(got, fd_t) < 1e-7


def test_conjugate_gradient_batched() -> None:
    from amaml.flow import conjugate_gradient

    g = torch.Generator().manual_seed(0)
    M = torch.randn(3, 5, 5, generator=g, dtype=DT)
    A = M @ M.transpose(1, 2) + torch.eye(5, dtype=DT)
    b = torch.randn(3, 5, generator=g, dtype=DT)
    x = conjugate_gradient(lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), b, max_iter=20,
                           tol=1e-14, batched=True)
    assert torch.allclose(x, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-12)


def test_conjugate_gradient_stops_at_negative_curvature() -> None:
    """An indefinite system (iMAML's I + H/mu for a non-convex loss) must not blow up: the
    system that meets negative curvature stops at its last iterate, the others still solve."""
    from amaml.flow import conjugate_gradient

    spd = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=DT))
    indefinite = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=DT))
    A = torch.stack([spd, indefinite])
    b = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], dtype=DT)  # b[1] along the -2 axis
    x = conjugate_gradient(lambda v: (A @ v.unsqueeze(-1)).squeeze(-1), b, max_iter=10,
                           tol=1e-14, batched=True)
    assert torch.isfinite(x).all()
    assert torch.allclose(x[0], torch.linalg.solve(spd, b[0]), rtol=1e-12)
    assert torch.equal(x[1], torch.zeros(3, dtype=DT))  # first direction has p^T A p < 0
    x1 = conjugate_gradient(lambda v: indefinite @ v, b[1], max_iter=10, tol=1e-14)
    assert torch.equal(x1, torch.zeros(3, dtype=DT))


# ----------------------------------------------------------------------------- revolve


def _sweep(memory, steps: int):
    spec, theta, data = _flat_mlp_flow(memory, steps)
    dt = torch.tensor(0.05, dtype=DT)
    lam = torch.linspace(-1, 1, theta.numel(), dtype=DT)
    g, back, _ = _run(memory, spec, theta, dt, data, lam)
    return g, back.stats


@pytest.mark.parametrize("snapshots", [1, 2, 3, 5])
def test_revolve_schedule_visits_every_step_once_in_reverse(snapshots: int) -> None:
    """Bitwise the store gradient: every state recomputed exactly, every VJP taken once,
    in the same order (any schedule error shows as a difference)."""
    from amaml.flow import Revolve

    for steps, ahead in itertools.product([1, 2, 3, 7, 16, 29], [True, False]):
        ref, _ = _sweep(Store(), steps)
        got, stats = _sweep(Revolve(snapshots=snapshots, snapshots_in_forward=ahead), steps)
        assert torch.equal(got, ref), (snapshots, steps, ahead)
        t = Revolve.repetitions(snapshots, steps)
        assert stats.peak_states <= snapshots + 2
        assert stats.recomputed_steps <= max(t, 1) * steps


@pytest.mark.parametrize("steps", [100, 1000])
def test_revolve_holds_constant_states(steps: int) -> None:
    from amaml.flow import Revolve

    _, stats = _sweep(Revolve(snapshots=6), steps)
    assert stats.peak_states <= 8  # 6 snapshots + u_0 + the state being differentiated
    assert Revolve.repetitions(6, steps) == (4 if steps == 100 else 7)
    assert stats.recomputed_steps <= Revolve.repetitions(6, steps) * steps
    # Between forward and backward: u_0 and the first descent's snapshots (at most 6), or
    # u_0 alone when the forward pass places none.
    first = Revolve(snapshots=6).first_snapshots(steps)
    assert 1 <= len(first) <= 6 and first == sorted(set(first))
    assert _saved_states(Revolve(snapshots=6), steps) <= 1 + len(first) + 2
    assert _saved_states(Revolve(snapshots=6, snapshots_in_forward=False), steps) <= 3
    _, lazy = _sweep(Revolve(snapshots=6, snapshots_in_forward=False), steps)
    assert stats.recomputed_steps < lazy.recomputed_steps - 0.5 * steps


def test_revolve_exact_with_proximal_learnable_lr_and_batch() -> None:
    from amaml.flow import Revolve

    model = mlp(hidden=8)
    x, y, xq, yq = regression_data()
    lr = torch.tensor(0.02, dtype=DT, requires_grad=True)
    mu = torch.tensor(0.6, dtype=DT, requires_grad=True)
    ref = unrolled_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=150, lr=lr, mu=mu,
                             solver="rk4", extra=(lr, mu))
    got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=150, lr=lr, proximal=mu,
                          solver="rk4", memory=Revolve(snapshots=3), extra=(lr, mu))
    assert rel_err(got, ref) < 1e-10
    assert torch.allclose(got[-2:], ref[-2:], rtol=1e-10, atol=0)
    # a meta-batch: equal to task by task
    xs, ys, xqs, yqs = regression_data(batch=3)
    model.zero_grad()
    params = amaml.adapt_batch(model, F.mse_loss, (xs, ys), steps=80, lr=0.03, memory="revolve")
    torch.func.vmap(F.mse_loss)(amaml.functional_call_batch(model, params, xqs),
                                yqs).sum().backward()
    batched = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    looped = sum(unrolled_meta_grad(model, F.mse_loss, xs[i], ys[i], xqs[i], yqs[i], steps=80,
                                    lr=0.03) for i in range(3))
    assert rel_err(batched, looped) < 1e-10


def test_revolve_rejects_bad_snapshots() -> None:
    from amaml.flow import Revolve

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="snapshots"):
            Revolve(snapshots=bad)
