"""A user's inner step is one class: exact meta-gradients under every strategy, per task and
batched, against a plain unrolled loop written here (autograd through every step).

Two maps: a soft-sign Lion (an optimiser: its update reads the gradient at the parameters,
so the fused MLP kernel transposes it, by autograd on the update and the loss's own H w),
and SGD with Polyak averaging (a step map whose result, row 0, is the running average while
the gradient is read at the iterate, row 1: the fused kernel declines it with a reason and
the autograd kernel transposes it). Float64, 1e-10 relative.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from helpers import DT, mlp, regression_data, rel_err
from torch import Tensor

import amaml
from amaml.flow.reads import StepReads
from amaml.optim import AbstractInnerOptimizer, AbstractStepMap

TOL = 1e-10


@dataclass(frozen=True)
class SoftLion(AbstractInnerOptimizer):
    """Lion (Chen et al. 2023) with tanh(c / tau) for sign(c), so that it has a derivative."""

    betas: tuple[float, float] = (0.9, 0.99)
    tau: float = 0.1
    name: ClassVar[str] = "soft-lion"
    hyper_fields: ClassVar[tuple[str, ...]] = ("betas", "tau")
    n_buffers = 1  # the momentum m

    def update(self, k, u, bufs, g, lr, h: Mapping[str, float]):
        b1, b2, (m,) = h["betas0"], h["betas1"], bufs
        c = b1 * m + (1 - b1) * g
        return u - lr * torch.tanh(c / h["tau"]), [b2 * m + (1 - b2) * g]


@dataclass(frozen=True)
class PolyakSGD(AbstractStepMap):
    """Gradient descent on the iterate (row 1); row 0, the result, its running average."""

    name: ClassVar[str] = "polyak-sgd"
    rows = 2

    def init(self, theta: Tensor, n_tasks: int | None) -> Tensor:
        z = torch.stack([theta, theta])
        return z if n_tasks is None else z.expand(n_tasks, 2, -1).contiguous()

    def step(self, k, z, grad, r):
        x = z[..., 1, :] - r.lr * grad(z[..., 1, :])
        return torch.stack([z[..., 0, :] + (x - z[..., 0, :]) / (k + 2), x], dim=-2)


def _unrolled(step_map: AbstractStepMap, model, x, y, xq, yq, steps: int, lr: float) -> Tensor:
    """The meta-gradient of ``steps`` plain steps, by autograd through all of them."""
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    flat = torch.cat([t.reshape(-1) for t in theta])

    def loss(u: Tensor) -> Tensor:
        ps = dict(zip(names, (t.view_as(p) for t, p in
                              zip(u.split([p.numel() for p in theta]), theta))))
        return F.mse_loss(torch.func.functional_call(model, ps, (x,)), y)

    def grad(v: Tensor) -> Tensor:
        return torch.autograd.grad(loss(v), v, create_graph=True)[0]

    z = step_map.init(flat, None)
    r = StepReads(flat, torch.tensor(lr, dtype=DT), None, (), step_map.hyperparameters())
    for k in range(steps):
        z = step_map.step(k, z, grad, r)
    ps = dict(zip(names, (t.view_as(p) for t, p in
                          zip(z[0].split([p.numel() for p in theta]), theta))))
    out = F.mse_loss(torch.func.functional_call(model, ps, (xq,)), yq)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, theta)])


def _amaml(step_map, model, data, steps: int, lr: float, memory: str, batched: bool) -> Tensor:
    x, y, xq, yq = data
    model.zero_grad()
    if batched:
        p = amaml.adapt_batch(model, F.mse_loss, (x, y), steps=steps, lr=lr, memory=memory,
                              optimizer=step_map)
        out = amaml.functional_call_batch(model, p, xq)
        torch.func.vmap(F.mse_loss)(out, yq).sum().backward()
    else:
        p = amaml.adapt(model, F.mse_loss, (x, y), steps=steps, lr=lr, memory=memory,
                        optimizer=step_map)
        F.mse_loss(amaml.functional_call(model, p, xq), yq).backward()
    return torch.cat([q.grad.reshape(-1) for q in model.parameters()])


@pytest.mark.parametrize("step_map", [SoftLion(), PolyakSGD()], ids=["lion", "polyak"])
@pytest.mark.parametrize("memory", ["store", "checkpoint", "revolve"])
@pytest.mark.parametrize("batched", [False, True])
def test_user_step_map_is_exact(step_map, memory: str, batched: bool) -> None:
    torch.manual_seed(3)
    model, steps, lr = mlp(hidden=8), 13, 0.05
    data = regression_data(batch=2) if batched else regression_data()
    if batched:
        ref = sum(_unrolled(step_map, model, *(t[b] for t in data), steps, lr)
                  for b in range(2))
    else:
        ref = _unrolled(step_map, model, *data, steps, lr)
    got = _amaml(step_map, model, data, steps, lr, memory, batched)
    assert rel_err(got, ref) < TOL


def test_kernels_say_how_each_map_is_transposed() -> None:
    model = mlp(hidden=8)
    x, y, _, _ = regression_data()
    lion = amaml.explain(model, F.mse_loss, (x, y), steps=3, lr=0.1, optimizer=SoftLion())
    assert "inner loop: 3 steps of soft-lion(betas=(0.9, 0.99), tau=0.1)" in lion
    assert "step VJP kernel: fused" in lion
    polyak = amaml.explain(model, F.mse_loss, (x, y), steps=3, lr=0.1, optimizer=PolyakSGD())
    assert "step VJP kernel: autograd" in polyak
    assert "PolyakSGD reads the gradient elsewhere than at row 0" in polyak


def test_the_documented_step_map_runs() -> None:
    """The example of docs/inner-optimizers.md ("Your own inner step") as written."""
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "inner-optimizers.md"
    (block,) = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    ns: dict[str, object] = {}
    exec(compile(block, "inner-optimizers.md", "exec"), ns)
    grads = [p.grad for p in ns["net"].parameters()]  # type: ignore[attr-defined]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
