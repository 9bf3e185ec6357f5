"""The discrete adjoint is the exact gradient of the discrete inner loop.

Reference: plain autograd through hand-written solver steps (tests/helpers.py).
Tolerance 1e-10 (relative, float64): the adjoint and the unrolled graph compute
the same sums in different orders, so they agree to round-off (~1e-15 observed
for 1000 steps); 1e-10 leaves room for accumulation over long loops while still
catching any missing term, which would show at the 1e-3 level or above.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DT,
    amaml_meta_grad,
    classification_data,
    classifier,
    mlp,
    regression_data,
    rel_err,
    unrolled_meta_grad,
)

TOL = 1e-10
MEMORIES = ["store", "checkpoint"]


@pytest.mark.parametrize("memory", MEMORIES)
def test_euler_1000_steps_mlp(memory: str) -> None:
    model = mlp()
    x, y, xq, yq = regression_data()
    ref = unrolled_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=1000, lr=0.01)
    got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=1000, lr=0.01, memory=memory)
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("solver,steps", [("heun", 300), ("rk4", 200)])
def test_higher_order_solvers_mlp(solver: str, steps: int, memory: str) -> None:
    model = mlp()
    x, y, xq, yq = regression_data()
    ref = unrolled_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=steps, lr=0.02, solver=solver)
    got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=steps, lr=0.02, solver=solver,
                          memory=memory)
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("solver", ["euler", "heun", "rk4"])
@pytest.mark.parametrize("memory", MEMORIES)
def test_classifier_cross_entropy(solver: str, memory: str) -> None:
    model = classifier()
    x, y, xq, yq = classification_data()
    ref = unrolled_meta_grad(model, F.cross_entropy, x, y, xq, yq, steps=100, lr=0.1,
                             solver=solver)
    got = amaml_meta_grad(model, F.cross_entropy, x, y, xq, yq, steps=100, lr=0.1, solver=solver,
                          memory=memory)
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("solver", ["euler", "rk4"])
@pytest.mark.parametrize("memory", MEMORIES)
def test_proximal_and_learnable_lr(solver: str, memory: str) -> None:
    """Gradients for theta, a learnable scalar lr and a learnable proximal weight."""
    model = mlp()
    x, y, xq, yq = regression_data()
    lr = torch.tensor(0.02, dtype=DT, requires_grad=True)
    mu = torch.tensor(0.7, dtype=DT, requires_grad=True)
    ref = unrolled_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=120, lr=lr, mu=mu,
                             solver=solver, extra=(lr, mu))
    got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=120, lr=lr, proximal=mu,
                          solver=solver, memory=memory, extra=(lr, mu))
    assert rel_err(got, ref) < TOL
    # the lr and mu gradients on their own, so a wrong small term cannot hide in the norm
    assert torch.allclose(got[-2:], ref[-2:], rtol=TOL, atol=0)


@pytest.mark.parametrize("memory", MEMORIES)
def test_per_parameter_lr_meta_sgd(memory: str) -> None:
    model = mlp(hidden=8)
    x, y, xq, yq = regression_data()
    lr = {n: torch.full(p.shape, 0.03, dtype=DT).add_(torch.rand(p.shape, dtype=DT) * 0.01)
          .requires_grad_() for n, p in model.named_parameters()}
    ref = unrolled_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=80, lr=lr, solver="heun",
                             extra=tuple(lr.values()))
    got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=80, lr=lr, solver="heun",
                          memory=memory, extra=tuple(lr.values()))
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("memory", ["store", "checkpoint", "backsolve"])
def test_adapt_batch_equals_adapt_task_by_task(memory: str) -> None:
    import amaml

    model = mlp()
    B = 4
    xs, ys, xq, yq = regression_data(batch=B)
    params = amaml.adapt_batch(model, F.mse_loss, (xs, ys), steps=50, lr=0.01, memory=memory)
    losses = torch.func.vmap(F.mse_loss)(amaml.functional_call_batch(model, params, xq), yq)
    losses.sum().backward()
    batched = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad()
    looped = torch.zeros_like(batched)
    for i in range(B):
        p_i = amaml.adapt(model, F.mse_loss, (xs[i], ys[i]), steps=50, lr=0.01, memory=memory)
        for name in p_i:  # the adapted parameters themselves agree too
            assert torch.allclose(params[name][i], p_i[name], rtol=1e-12, atol=1e-14)
        looped += amaml_meta_grad(model, F.mse_loss, xs[i], ys[i], xq[i], yq[i], steps=50,
                                  lr=0.01, memory=memory)
    assert rel_err(batched, looped) < TOL


def test_float32_close_to_float64() -> None:
    """float32 runs and agrees with float64 to single-precision accuracy."""
    model = mlp()
    x, y, xq, yq = regression_data()
    g64 = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=200, lr=0.01)
    model32 = model.float()
    g32 = amaml_meta_grad(model32, F.mse_loss, x.float(), y.float(), xq.float(), yq.float(),
                          steps=200, lr=0.01)
    assert g32.dtype == torch.float32
    assert rel_err(g32.double(), g64) < 1e-4  # float32 round-off over 200 steps


def test_imaml_matches_unrolled_at_convergence() -> None:
    """With a strong proximal term and a long horizon the inner loop converges, and
    the implicit gradient (I + H/mu)^-1 g equals the unrolled one."""
    import amaml

    model = mlp(hidden=8)
    x, y, xq, yq = regression_data()
    kw = dict(steps=1500, lr=0.1, mu=1.0)
    ref = unrolled_meta_grad(model, F.mse_loss, x, y, xq, yq, **kw)
    got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=1500, lr=0.1, proximal=1.0,
                          adjoint=amaml.Implicit(cg_steps=100))
    # the inner loop is converged to ~1e-12 after T = 150 with contraction mu = 1
    assert rel_err(got, ref) < 1e-8
