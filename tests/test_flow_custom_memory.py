"""A memory strategy defined outside the package works through ``amaml.adapt``.

``EveryOther`` keeps ``u_0, u_2, u_4, ...`` and recomputes each odd state from the even
one before it: exact, like every recomputing strategy. Tolerance 1e-10 (relative,
float64), as in test_flow_exactness.py: the adjoint and the unrolled reference sum the
same terms in different orders (round-off ~1e-15); a missing or misplaced state would show
at 1e-3 or above.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from helpers import DT, amaml_meta_grad, mlp, regression_data, rel_err, unrolled_meta_grad
from torch import Tensor

import amaml
from amaml.flow import AbstractMemory, FlowContext

TOL = 1e-10


@dataclass(frozen=True)
class EveryOther(AbstractMemory):
    """Keep every other state; recompute the others from the state just before."""

    name: str = field(default="every-other", init=False)
    log: list[str] = field(default_factory=list, compare=False)  # which methods ran

    def forward(self, flow: FlowContext) -> tuple[Tensor, Tensor]:
        self.log.append("forward")
        u_end, kept = flow.integrate(flow.initial_state(), keep_every=2)
        return u_end, torch.stack(kept)

    def sweep(self, flow: FlowContext, kept: Tensor, lam: Tensor) -> Tensor:
        self.log.append("sweep")
        assert kept.shape[0] == (flow.n_steps + 1) // 2  # u_0, u_2, ... below u_N
        for k in range(flow.n_steps - 1, -1, -1):
            if k % 2 == 0:
                u = kept[k // 2]
            else:  # one step from u_{k-1}
                u, _ = flow.integrate(kept[k // 2], k - 1, k)
            lam = flow.vjp(u, lam)
        return lam


@pytest.mark.parametrize("solver,steps", [("euler", 101), ("rk4", 40)])
def test_custom_memory_adapt_matches_unrolled(solver: str, steps: int) -> None:
    """theta, a learnable lr and a learnable proximal weight, odd and even step counts."""
    model = mlp(hidden=16)
    x, y, xq, yq = regression_data()
    lr = torch.tensor(0.02, dtype=DT, requires_grad=True)
    mu = torch.tensor(0.5, dtype=DT, requires_grad=True)
    memory = EveryOther()
    ref = unrolled_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=steps, lr=lr, mu=mu,
                             solver=solver, extra=(lr, mu))
    got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=steps, lr=lr, proximal=mu,
                          solver=solver, memory=memory, extra=(lr, mu))
    assert memory.log == ["forward", "sweep"]
    assert rel_err(got, ref) < TOL
    assert torch.allclose(got[-2:], ref[-2:], rtol=TOL, atol=0)  # lr and mu on their own


def test_custom_memory_adapt_batch_matches_unrolled() -> None:
    """A batch of tasks: the gradient sums the tasks' unrolled meta-gradients."""
    model = mlp(hidden=16)
    B, steps = 3, 30
    xs, ys, xq, yq = regression_data(batch=B)
    memory = EveryOther()
    params = amaml.adapt_batch(model, F.mse_loss, (xs, ys), steps=steps, lr=0.03,
                               solver="heun", memory=memory)
    torch.func.vmap(F.mse_loss)(amaml.functional_call_batch(model, params, xq), yq) \
        .sum().backward()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    ref = sum(unrolled_meta_grad(model, F.mse_loss, xs[i], ys[i], xq[i], yq[i], steps=steps,
                                 lr=0.03, solver="heun") for i in range(B))
    assert memory.log == ["forward", "sweep"]
    assert rel_err(got, ref) < TOL


def test_custom_memory_in_discrete_adjoint_and_gradient_flow() -> None:
    """The same strategy through the lower layer, against Store, bit for bit."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 4, generator=g, dtype=DT)
    b = torch.randn(6, generator=g, dtype=DT)

    def loss(u: Tensor) -> Tensor:
        return 0.5 * ((A @ u - b) ** 2).sum() + 0.1 * (u ** 4).sum()

    grads = []
    for memory in (EveryOther(), amaml.Store()):
        theta = torch.randn(4, generator=torch.Generator().manual_seed(1), dtype=DT,
                            requires_grad=True)
        u = amaml.gradient_flow(loss, theta, dt=0.05, n_steps=17, solver=amaml.RK4(),
                                adjoint=amaml.DiscreteAdjoint(memory))
        (u ** 2).sum().backward()
        grads.append(theta.grad)
    assert torch.equal(grads[0], grads[1])  # same states, same VJPs, same order
