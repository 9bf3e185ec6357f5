"""The seam: which model path and which step-VJP kernel a flow takes, and that each is exact.

Tolerance 1e-10 relative in float64 against unrolled autograd (helpers.py), as elsewhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from helpers import DT, amaml_meta_grad, regression_data, rel_err, unrolled_meta_grad
from torch import nn

import amaml
from amaml.flow import AbstractSolver
from amaml.flow.kernels import select_kernel
from amaml.flow.step_maps import is_tableau

TOL = 1e-10


class Net(nn.Module):
    """The paper's MLP as users write it (custom forward, functional activations)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(2, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.relu(self.l1(x)))))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 4), nn.Linear(2, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.a(x) + self.b(x)))


def test_custom_module_takes_the_fused_path_exactly() -> None:
    torch.manual_seed(0)
    model = Net().to(DT)
    x, y, xq, yq = regression_data()
    plan = amaml.explain(model, F.mse_loss, (x, y), steps=5, lr=0.05)
    assert plan.splitlines()[0] == "model: fused MLP (torch.fx chain of Net: 3 linear layers)"
    ref = unrolled_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=30, lr=0.05)
    for memory in ("store", "checkpoint"):
        got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=30, lr=0.05,
                              memory=memory)
        assert rel_err(got, ref) < TOL


def test_experiments_mlp_takes_the_fused_path() -> None:
    from amaml.experiments.models import make_model

    model = make_model(2, (16, 16), dtype=DT)
    x, y, _, _ = regression_data()
    assert "fused MLP (torch.fx chain of MLP" in amaml.explain(model, F.mse_loss, (x, y),
                                                                steps=3, lr=0.1)


def test_generic_path_says_why() -> None:
    x, y, _, _ = regression_data()
    plan = amaml.explain(Branchy().to(DT), F.mse_loss, (x, y), steps=3, lr=0.1)
    assert plan.splitlines()[0].startswith("model: generic: ")
    assert "not fused: the loss has no derivatives of its own" in plan
    bn = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(DT)
    assert "buffers" in amaml.explain(bn, F.mse_loss, (x, y), steps=3, lr=0.1)


@dataclass(frozen=True)
class Ralston(AbstractSolver):
    """Ralston's second-order method: a user's own solver, from its tableau alone."""

    a: ClassVar[tuple[tuple[float, ...], ...]] = ((), (2 / 3,))
    b: ClassVar[tuple[float, ...]] = (0.25, 0.75)
    order: ClassVar[int] = 2
    name: ClassVar[str] = "ralston"


def _ralston_reference(model, x, y, xq, yq, steps, lr):
    names = [n for n, _ in model.named_parameters()]
    theta = list(model.parameters())

    def field(u):
        out = torch.func.functional_call(model, dict(zip(names, u)), (x,))
        return [-lr * g for g in torch.autograd.grad(F.mse_loss(out, y), u, create_graph=True)]

    u = theta
    for _ in range(steps):
        k1 = field(u)
        k2 = field([a + 2 / 3 * b for a, b in zip(u, k1)])
        u = [a + 0.25 * b + 0.75 * c for a, b, c in zip(u, k1, k2)]
    out = torch.func.functional_call(model, dict(zip(names, u)), (xq,))
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.mse_loss(out, yq), theta)])


def test_user_tableau_solver_gets_the_fused_kernel() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    x, y, xq, yq = regression_data()
    assert is_tableau(Ralston())
    plan = amaml.explain(model, F.mse_loss, (x, y), steps=5, lr=0.05, solver=Ralston())
    assert "step VJP kernel: fused" in plan
    ref = _ralston_reference(model, x, y, xq, yq, 20, 0.05)
    got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=20, lr=0.05,
                          solver=Ralston(), memory="revolve")
    assert rel_err(got, ref) < TOL


def test_solver_overriding_advance_is_declined_with_a_reason() -> None:
    @dataclass(frozen=True)
    class Custom(AbstractSolver):
        a: ClassVar[tuple[tuple[float, ...], ...]] = ((),)
        b: ClassVar[tuple[float, ...]] = (1.0,)
        order: ClassVar[int] = 1
        name: ClassVar[str] = "custom"

        def advance(self, field, u):
            return u + field(u)

    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    x, y, _, _ = regression_data()
    plan = amaml.explain(model, F.mse_loss, (x, y), steps=3, lr=0.1, solver=Custom())
    assert "step VJP kernel: autograd" in plan
    assert "solver Custom overrides advance(): its tableau is unknown" in plan
    from amaml.flow import FlowSpec, Objective, Reads

    spec = FlowSpec(Objective(lambda u: (u ** 2).sum()), Custom(), 3)
    reads = Reads(torch.zeros(3, dtype=DT), torch.tensor(0.1, dtype=DT), None)
    choice = select_kernel(spec, reads, (True, False, False))
    assert [k for k, _ in choice.declined] == ["compiled", "fused"]


def test_kernel_is_logged(caplog) -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    x, y, xq, yq = regression_data()
    with caplog.at_level(logging.DEBUG, logger="amaml"):
        p = amaml.adapt(model, F.mse_loss, (x, y), steps=3, lr=0.1, optimizer="adam")
        F.mse_loss(amaml.functional_call(model, p, xq), yq).backward()
    text = caplog.text
    assert "adapt: fused MLP (nn.Sequential" in text
    assert "step VJP kernel: fused" in text


@pytest.mark.parametrize("bad", [
    {"optimizer": "adam", "solver": "heun"},
    {"lr": -1.0},
])
def test_explain_raises_what_adapt_raises(bad) -> None:
    model = nn.Sequential(nn.Linear(2, 1)).to(DT)
    x, y, _, _ = regression_data()
    kw = {"steps": 3, "lr": 0.1, **bad}
    with pytest.raises(ValueError):
        amaml.explain(model, F.mse_loss, (x, y), **kw)
    with pytest.raises(ValueError):
        amaml.adapt(model, F.mse_loss, (x, y), **kw)
