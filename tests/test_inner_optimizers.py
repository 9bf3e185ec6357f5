"""Inner optimisers: exact meta-gradients through SGD with momentum, Adam, AdamW, RMSprop.

References: torch.optim's update equations unrolled with plain autograd
(``optim_reference.py``), and torch.optim itself for the trajectory. Tolerances (float64):
1e-10 relative for meta-gradients (the adjoint and back-propagation sum the same terms in
another order; round-off is ~1e-14 here, a missing term shows at 1e-3 or more), 1e-12 for
trajectories against torch.optim (same operations, a few of them in another order).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import DT, rel_err
from optim_reference import query_grad, unrolled_optimizer
from torch import nn

import amaml
from amaml.flow import Revolve

TOL = 1e-10

# (name, amaml optimiser, reference kind, reference hyperparameters)
CASES = [
    ("sgd-momentum", amaml.optim.SGD(momentum=0.9), "sgd", {"momentum": 0.9}),
    ("sgd-nesterov-wd", amaml.optim.SGD(momentum=0.8, nesterov=True, weight_decay=0.1), "sgd",
     {"momentum": 0.8, "nesterov": True, "weight_decay": 0.1}),
    ("sgd-dampening", amaml.optim.SGD(momentum=0.5, dampening=0.3), "sgd",
     {"momentum": 0.5, "dampening": 0.3}),
    ("adam", amaml.optim.Adam(), "adam", {}),
    ("adam-wd-amsgrad", amaml.optim.Adam(betas=(0.8, 0.99), weight_decay=0.05, amsgrad=True),
     "adam", {"betas": (0.8, 0.99), "weight_decay": 0.05, "amsgrad": True}),
    ("adamw", amaml.optim.AdamW(), "adamw", {}),
    ("rmsprop", amaml.optim.RMSprop(), "rmsprop", {}),
    ("rmsprop-centered-momentum", amaml.optim.RMSprop(centered=True, momentum=0.7,
                                                      weight_decay=0.02),
     "rmsprop", {"centered": True, "momentum": 0.7, "weight_decay": 0.02}),
]
MEMORIES = ["store", "checkpoint", amaml.Revolve(snapshots=3)]


def _net(seed: int = 0, width: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 1)).to(DT)


def _data(batch: int | None = None, n: int = 12):
    torch.manual_seed(1)
    lead = () if batch is None else (batch,)
    x, xq = torch.randn(*lead, n, 2, dtype=DT), torch.randn(*lead, n, 2, dtype=DT)
    f = lambda z: torch.sin(2 * z).sum(-1, keepdim=True)  # noqa: E731
    return x, f(x), xq, f(xq)


def _amaml_grad(model, opt, memory, x, y, xq, yq, steps, lr, extra=()):
    model.zero_grad()
    for t in extra:
        t.grad = None
    p = amaml.adapt(model, F.mse_loss, (x, y), steps=steps, lr=lr, optimizer=opt,
                    memory=memory)
    F.mse_loss(amaml.functional_call(model, p, xq), yq).backward()
    return torch.cat([t.grad.reshape(-1) for t in [*model.parameters(), *extra]])


def _reference(model, kind, h, x, y, xq, yq, steps, lr, extra=()):
    u = unrolled_optimizer(model, F.mse_loss, lambda k: (x, y), steps=steps, lr=lr, kind=kind,
                           h=h)
    return query_grad(model, F.mse_loss, u, xq, yq, [*model.parameters(), *extra])


@pytest.mark.parametrize("memory", MEMORIES, ids=["store", "checkpoint", "revolve"])
@pytest.mark.parametrize("name,opt,kind,h", CASES, ids=[c[0] for c in CASES])
def test_meta_gradient_matches_unrolled(name, opt, kind, h, memory) -> None:
    """Each optimiser x store/checkpoint/revolve, fused MLP path, a learnable lr too."""
    model = _net()
    x, y, xq, yq = _data()
    lr = torch.tensor(0.02, dtype=DT, requires_grad=True)
    ref = _reference(model, kind, h, x, y, xq, yq, 25, lr, extra=(lr,))
    got = _amaml_grad(model, opt, memory, x, y, xq, yq, 25, lr, extra=(lr,))
    assert torch.isfinite(got).all()
    assert rel_err(got, ref) < TOL
    assert abs(float(got[-1] - ref[-1])) <= TOL * abs(float(ref[-1]))  # lr on its own


class _Custom(nn.Module):
    """The same network as a custom module: the generic (autograd) kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 6), nn.Linear(6, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("name,opt,kind,h", CASES[::2], ids=[c[0] for c in CASES[::2]])
def test_generic_module_matches_unrolled(name, opt, kind, h) -> None:
    torch.manual_seed(0)
    model = _Custom().to(DT)
    x, y, xq, yq = _data()
    ref = _reference(model, kind, h, x, y, xq, yq, 20, 0.03)
    got = _amaml_grad(model, opt, "checkpoint", x, y, xq, yq, 20, 0.03)
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("memory", MEMORIES, ids=["store", "checkpoint", "revolve"])
@pytest.mark.parametrize("name,opt,kind,h", CASES, ids=[c[0] for c in CASES])
def test_adapt_batch_matches_unrolled(name, opt, kind, h, memory) -> None:
    """A meta-batch: the gradient is the sum of the tasks' unrolled meta-gradients."""
    model = _net()
    B, steps = 3, 15
    xs, ys, xq, yq = _data(batch=B)
    model.zero_grad()
    p = amaml.adapt_batch(model, F.mse_loss, (xs, ys), steps=steps, lr=0.02, optimizer=opt,
                          memory=memory)
    torch.func.vmap(F.mse_loss)(amaml.functional_call_batch(model, p, xq), yq).sum().backward()
    got = torch.cat([t.grad.reshape(-1) for t in model.parameters()])
    ref = sum(_reference(model, kind, h, xs[i], ys[i], xq[i], yq[i], steps, 0.02)
              for i in range(B))
    assert rel_err(got, ref) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("name,opt,kind,h", [CASES[0], CASES[3], CASES[5], CASES[6]],
                         ids=["sgd-momentum", "adam", "adamw", "rmsprop"])
def test_long_horizon_revolve(name, opt, kind, h) -> None:
    """N = 1000 under revolve (5 snapshots: every step recomputed several times).

    RMSprop runs at a smaller rate: at lr = 0.002 it reaches the regime where its steps
    are nearly sign-like (+-lr) around the minimum and the trajectory amplifies round-off
    (the reference's and amaml's u_1000 then differ by 2e-4 although every step agrees to
    1e-16 up to N = 300, and store and revolve agree bit for bit): a property of the
    discrete map, not of its adjoint."""
    model = _net(width=4)
    x, y, xq, yq = _data(n=8)
    lr = 0.0005 if kind == "rmsprop" else 0.002
    ref = _reference(model, kind, h, x, y, xq, yq, 1000, lr)
    got = _amaml_grad(model, opt, Revolve(snapshots=5), x, y, xq, yq, 1000, lr)
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("name,opt,cls,kw", [
    ("sgd", amaml.optim.SGD(momentum=0.9, nesterov=True, weight_decay=0.01), torch.optim.SGD,
     {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("sgd-damp", amaml.optim.SGD(momentum=0.9, dampening=0.2), torch.optim.SGD,
     {"momentum": 0.9, "dampening": 0.2}),
    ("adam", amaml.optim.Adam(weight_decay=0.01, amsgrad=True), torch.optim.Adam,
     {"weight_decay": 0.01, "amsgrad": True}),
    ("adamw", amaml.optim.AdamW(), torch.optim.AdamW, {}),
    ("rmsprop", amaml.optim.RMSprop(centered=True, momentum=0.5), torch.optim.RMSprop,
     {"centered": True, "momentum": 0.5}),
])
def test_trajectory_equals_torch_optim(name, opt, cls, kw) -> None:
    """The adapted parameters are torch.optim's own trajectory on a copy of the model."""
    model = _net()
    x, y, _, _ = _data()
    steps, lr = 40, 0.01
    twin = copy.deepcopy(model)
    torch_opt = cls(twin.parameters(), lr=lr, **kw)
    for _ in range(steps):
        torch_opt.zero_grad()
        F.mse_loss(twin(x), y).backward()
        torch_opt.step()
    with torch.no_grad():
        p = amaml.adapt(model, F.mse_loss, (x, y), steps=steps, lr=lr, optimizer=opt)
    for n, t in twin.named_parameters():
        assert torch.allclose(p[n], t, rtol=1e-12, atol=1e-14), n


def test_zero_gradient_is_finite_and_exact() -> None:
    """An input feature that is always 0 on the support set: its weights' gradient is
    exactly 0 at every step, so Adam's v stays 0 there. Naive autograd through Adam gives
    NaN; amaml gives the limit. Exact reference: the same network unrolled with Adam on
    every parameter but the dead column, which never moves (its gradient is 0) and no
    other parameter's trajectory depends on it; the query, whose third feature is not 0,
    reads it (plain autograd, no square root at 0 anywhere)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    x, y, xq, yq = _data()
    x3 = torch.cat([x, torch.zeros(x.shape[0], 1, dtype=DT)], 1)
    xq3 = torch.cat([xq, torch.randn(xq.shape[0], 1, dtype=DT)], 1)
    steps, lr = 20, 0.02
    naive = _reference(model, "adam", {}, x3, y, xq3, yq, steps, lr)
    assert torch.isnan(naive).any()  # what differentiable Adam elsewhere returns
    got = _amaml_grad(model, amaml.optim.Adam(), "revolve", x3, y, xq3, yq, steps, lr)
    assert torch.isfinite(got).all()

    w, b, w2, b2 = model[0].weight, model[0].bias, model[2].weight, model[2].bias
    dead = w[:, 2:]

    def net(ps, inp):
        wa, bb, ww2, bb2 = ps
        return torch.tanh(inp[:, :2] @ wa.T + inp[:, 2:] @ dead.T + bb) @ ww2.T + bb2

    from optim_reference import optimizer_step
    u = [w[:, :2], b, w2, b2]
    state = {key: [torch.zeros_like(t) for t in u] for key in ("m", "v")}
    for k in range(steps):
        g = torch.autograd.grad(F.mse_loss(net(u, x3), y), u, create_graph=True)
        u = optimizer_step("adam", {}, k, u, g, state, lr)
    ref = torch.autograd.grad(F.mse_loss(net(u, xq3), yq), [w, b, w2, b2])
    ref = torch.cat([r.reshape(-1) for r in ref])
    assert torch.isfinite(ref).all()
    assert rel_err(got, ref) < TOL
    assert float(got.reshape(-1)[:15].reshape(5, 3)[:, 2].abs().sum()) > 0  # not trivially 0


@pytest.mark.parametrize("memory", ["store", "revolve"])
def test_learnable_hyperparameters(memory) -> None:
    """betas, eps and weight decay of Adam, momentum and weight decay of SGD, as tensors."""
    model = _net()
    x, y, xq, yq = _data()
    b1 = torch.tensor(0.85, dtype=DT, requires_grad=True)
    b2 = torch.tensor(0.99, dtype=DT, requires_grad=True)
    eps = torch.tensor(1e-3, dtype=DT, requires_grad=True)
    wd = torch.tensor(0.05, dtype=DT, requires_grad=True)
    opt = amaml.optim.Adam(betas=(b1, b2), eps=eps, weight_decay=wd)
    ref = _reference(model, "adam", {"betas": (b1, b2), "eps": eps, "weight_decay": wd},
                     x, y, xq, yq, 15, 0.02, extra=(b1, b2, eps, wd))
    got = _amaml_grad(model, opt, memory, x, y, xq, yq, 15, 0.02, extra=(b1, b2, eps, wd))
    assert rel_err(got, ref) < TOL
    assert rel_err(got[-4:], ref[-4:]) < TOL
    mom = torch.tensor(0.7, dtype=DT, requires_grad=True)
    opt = amaml.optim.SGD(momentum=mom, weight_decay=wd)
    ref = _reference(model, "sgd", {"momentum": mom, "weight_decay": wd}, x, y, xq, yq, 15,
                     0.05, extra=(mom, wd))
    got = _amaml_grad(model, opt, memory, x, y, xq, yq, 15, 0.05, extra=(mom, wd))
    assert rel_err(got[-2:], ref[-2:]) < TOL and rel_err(got, ref) < TOL


def test_names_and_unrolled_adjoint() -> None:
    """``optimizer="adam"`` is Adam(); MAML's Unrolled() runs the same optimiser."""
    model = _net()
    x, y, xq, yq = _data()
    ref = _reference(model, "adam", {}, x, y, xq, yq, 10, 0.02)
    got = _amaml_grad(model, "adam", "store", x, y, xq, yq, 10, 0.02)
    assert rel_err(got, ref) < TOL
    model.zero_grad()
    p = amaml.adapt(model, F.mse_loss, (x, y), steps=10, lr=0.02, optimizer="adam",
                    adjoint=amaml.Unrolled())
    F.mse_loss(amaml.functional_call(model, p, xq), yq).backward()
    unrolled = torch.cat([t.grad.reshape(-1) for t in model.parameters()])
    assert rel_err(unrolled, ref) < TOL


def test_errors() -> None:
    model = _net()
    x, y, _, _ = _data()
    with pytest.raises(ValueError, match="Unknown inner optimizer 'adamax'"):
        amaml.adapt(model, F.mse_loss, (x, y), steps=2, lr=0.1, optimizer="adamax")
    with pytest.raises(ValueError, match="no Runge-Kutta form"):
        amaml.adapt(model, F.mse_loss, (x, y), steps=2, lr=0.1, optimizer="adam", solver="rk4")
    with pytest.raises(ValueError, match="backsolve"):
        amaml.adapt(model, F.mse_loss, (x, y), steps=2, lr=0.1, optimizer="adam",
                    memory="backsolve")
    with pytest.raises(ValueError, match="implicit"):
        amaml.adapt(model, F.mse_loss, (x, y), steps=2, lr=0.1, optimizer="sgd", proximal=1.0,
                    adjoint=amaml.Implicit())
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        amaml.optim.Adam(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="nesterov"):
        amaml.optim.SGD(nesterov=True)
    with pytest.raises(ValueError, match="eps"):
        amaml.optim.RMSprop(eps=0.0)
    with pytest.raises(TypeError, match="betas"):
        amaml.optim.AdamW(betas=0.9)


@pytest.mark.slow
def test_compiled_optimizer_steps_equal_eager() -> None:
    """compile=True: Adam with a learnable per-step schedule, beta1 and distilled inputs,
    and batched SGD with momentum, compiled (one function for every step), equal the eager
    sweep."""
    model = _net()
    x, y, xq, yq = _data()
    x = x.clone().requires_grad_(True)
    steps = 12
    lr = torch.full((steps,), 0.02, dtype=DT, requires_grad=True)
    b1 = torch.tensor(0.85, dtype=DT, requires_grad=True)
    opt = amaml.optim.Adam(betas=(b1, 0.999))
    got = []
    for comp in (False, True):
        got.append(_amaml_grad_kw(model, x, y, xq, yq, (lr, b1, x), steps=steps, lr=lr,
                                  optimizer=opt, memory="checkpoint", compile=comp))
    assert rel_err(got[1], got[0]) < TOL
    assert "step VJP kernel: compiled" in amaml.explain(model, F.mse_loss, (x, y), steps=steps,
                                                        lr=lr, optimizer=opt, compile=True)
    xs, ys, xqs, yqs = _data(batch=2)
    sgd = amaml.optim.SGD(momentum=0.9, nesterov=True)
    out = []
    for comp in (False, True):
        model.zero_grad()
        p = amaml.adapt_batch(model, F.mse_loss, (xs, ys), steps=steps, lr=0.02, optimizer=sgd,
                              memory="revolve", compile=comp)
        torch.func.vmap(F.mse_loss)(amaml.functional_call_batch(model, p, xqs), yqs).sum() \
            .backward()
        out.append(torch.cat([t.grad.reshape(-1) for t in model.parameters()]))
    assert rel_err(out[1], out[0]) < TOL


def _amaml_grad_kw(model, x, y, xq, yq, extra, **kw):
    model.zero_grad()
    for t in extra:
        t.grad = None
    p = amaml.adapt(model, F.mse_loss, (x, y), **kw)
    F.mse_loss(amaml.functional_call(model, p, xq), yq).backward()
    return torch.cat([t.grad.reshape(-1) for t in [*model.parameters(), *extra]])
