"""The fused MLP path (:mod:`amaml.mlp`): chosen only where exact, and exact.

``amaml.adapt`` computes a plain perceptron's gradient and Hessian-vector products with
hand-written matrix products (no autograd graph), and transposes each solver step from them.
Every case compares against plain unrolled autograd (``helpers.unrolled_meta_grad``) at
1e-10 relative in float64: the two differ only by round-off (different summation orders, and
``H v`` by forward-mode R-operator rather than reverse-over-reverse), about 1e-15 measured.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DT,
    amaml_meta_grad,
    classification_data,
    mlp,
    regression_data,
    rel_err,
    unrolled_meta_grad,
)
from torch import Tensor, nn

import amaml
from amaml.fastpath import fused_loss as _fused_loss
from amaml.mlp import Layer, MLPLoss
from amaml.params import FlatModel as _FlatModel

TOL = 1e-10  # round-off of a few hundred float64 steps is ~1e-14; 1e-10 leaves room


def _net(act: type[nn.Module], bias: bool = True, hidden: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(2, hidden, bias=bias), act(), nn.Linear(hidden, hidden),
                         act(), nn.Linear(hidden, 1, bias=bias)).to(DT)


class _Wrapped(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _MySequential(nn.Sequential):
    pass


def _fused(model: nn.Module, x: Tensor, batched: bool = False) -> MLPLoss | None:
    return _fused_loss(_FlatModel(model), F.mse_loss, x, batched)


def test_fast_path_is_chosen_only_for_plain_perceptrons() -> None:
    x, _, _, _ = regression_data()
    assert isinstance(_fused(mlp(hidden=8), x), MLPLoss)
    assert isinstance(_fused(_net(nn.ReLU, bias=False), x), MLPLoss)
    xb, _, _, _ = regression_data(batch=2)
    assert isinstance(_fused(mlp(hidden=8), xb, batched=True), MLPLoss)
    assert _fused(mlp(hidden=8), xb) is None  # [B, n, d] to adapt: generic broadcasting
    assert _fused(mlp(hidden=8), x.float()) is None  # dtype mismatch: generic path's error
    # A module whose traced forward is a chain of such layers takes the path too (its real
    # forward is what torch.fx traced, overridden or not): see tests/test_kernels.py.
    assert isinstance(_fused(_Wrapped(mlp(hidden=8)), x), MLPLoss)
    assert isinstance(_fused(_MySequential(*mlp(hidden=8)), x), MLPLoss)
    assert _fused(nn.Sequential(nn.Linear(2, 4), nn.GELU(), nn.Linear(4, 1)).to(DT), x) is None
    shared = nn.Linear(2, 2).to(DT)
    assert _fused(nn.Sequential(shared, nn.Tanh(), shared), x) is None
    frozen = mlp(hidden=8)
    frozen[0].bias.requires_grad_(False)
    assert _fused(frozen, x) is None
    hooked = mlp(hidden=8)
    hooked[1].register_forward_hook(lambda m, i, o: o * 2)
    assert _fused(hooked, x) is None
    bn = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(DT)
    assert _fused(bn, x) is None


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU, nn.Sigmoid, nn.Identity])
@pytest.mark.parametrize("bias", [True, False])
def test_grad_and_hvp_equal_autograd(act: type[nn.Module], bias: bool) -> None:
    torch.manual_seed(0)
    model = _net(act, bias)
    flat = _FlatModel(model)
    for batch in (None, 3):
        x, y, _, _ = regression_data(batch=batch)
        fused = _fused_loss(flat, F.mse_loss, x, batch is not None)
        assert fused is not None
        u0 = flat.theta().detach()
        u = u0 if batch is None else u0.expand(batch, -1) + 0.1 * torch.randn(batch, u0.numel(),
                                                                               dtype=DT)
        v = torch.randn_like(u)
        one = torch.func.vmap(fused) if batch is not None else fused
        uu = u.clone().requires_grad_(True)
        (g_ref,) = torch.autograd.grad(one(uu, x, y).sum(), uu, create_graph=True)
        (hv_ref,) = torch.autograd.grad(g_ref, uu, v)
        g, hv = fused.grad_hvp(u, v, (x, y))
        assert g is not None
        assert rel_err(fused.grad(u, (x, y)), g_ref) < TOL
        assert rel_err(g, g_ref) < TOL
        assert rel_err(hv, hv_ref) < TOL
        assert fused.grad_hvp(u, v, (x, y), with_grad=False)[0] is None


@pytest.mark.parametrize("memory", ["store", "checkpoint", "revolve"])
@pytest.mark.parametrize("solver,steps", [("euler", 60), ("heun", 20), ("rk4", 10)])
def test_meta_gradient_equals_unrolled(memory: str, solver: str, steps: int) -> None:
    torch.manual_seed(1)
    model = mlp(hidden=8)
    x, y, xq, yq = regression_data()
    lr = torch.tensor(0.03, dtype=DT, requires_grad=True)
    mu = torch.tensor(0.5, dtype=DT, requires_grad=True)
    ref = unrolled_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=steps, lr=lr, mu=mu,
                             solver=solver, extra=(lr, mu))
    got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=steps, lr=lr, proximal=mu,
                          solver=solver, memory=memory, extra=(lr, mu))
    assert rel_err(got, ref) < TOL
    assert torch.allclose(got[-2:], ref[-2:], rtol=TOL, atol=0)


@pytest.mark.parametrize("solver", ["euler", "heun", "rk4"])
@pytest.mark.parametrize("batched", [False, True])
def test_checkpoint_tapes_give_the_store_gradient_bit_for_bit(solver: str, batched: bool) -> None:
    """A segment's step VJPs reuse its recomputed steps' tapes: every VJP but the
    segment's last, and the gradient (theta, lr, mu) identical to store's."""
    from amaml.flow import (
        SOLVERS,
        Checkpoint,
        DiscreteAdjoint,
        FlowContext,
        FlowSpec,
        Objective,
        Reads,
        Store,
        adjoint_sweep,
        forward_kept,
    )

    torch.manual_seed(4)
    model = _net(nn.Sigmoid, bias=True)
    x, y, _, _ = regression_data(batch=3) if batched else regression_data()
    fused = _fused_loss(_FlatModel(model), F.mse_loss, x, batched)
    assert fused is not None
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    dt, mu = torch.tensor(0.04, dtype=DT), torch.tensor(0.3, dtype=DT)
    steps = 23
    grads, stats = {}, {}
    for name, memory in (("store", Store()), ("tapes", Checkpoint(every=5, tapes=True)),
                         ("plain", Checkpoint(every=5))):
        spec = FlowSpec(Objective(fused, batched), SOLVERS[solver](), steps,
                        x.shape[0] if batched else None, 2)
        adjoint = DiscreteAdjoint(memory=memory)
        flow = FlowContext(spec, Reads(theta, dt, mu, (x, y)), (True, True, True, False, False))
        u_end, kept = forward_kept(adjoint, flow)
        lam = torch.linspace(-1, 1, u_end.numel(), dtype=DT).reshape(u_end.shape)
        back = flow.backward_flow(flow.reads.tensors(), flow.need)
        grads[name] = adjoint_sweep(adjoint, back, kept, lam)[:3]
        stats[name] = back.stats
    for name in ("tapes", "plain"):
        for got, ref in zip(grads[name], grads["store"]):
            assert torch.equal(got, ref), name
    assert stats["tapes"].taped_steps == steps - 5  # 5 segments: all but their last step
    assert stats["plain"].taped_steps == 0 and stats["store"].taped_steps == 0


def test_taped_hvp_equals_untaped() -> None:
    torch.manual_seed(5)
    model = _net(nn.Tanh, bias=True)
    x, y, _, _ = regression_data()
    fused = _fused_loss(_FlatModel(model), F.mse_loss, x, False)
    assert fused is not None and fused.tape_numel((x, y)) > 0
    u = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    v = torch.randn_like(u)
    tape: list = []
    g = fused.grad(u, (x, y), tape=tape)
    assert len(tape) == 1
    g_ref, hv_ref = fused.grad_hvp(u, v, (x, y))
    g_t, hv_t = fused.grad_hvp(u, v, (x, y), tape=tape[0])
    assert torch.equal(g, g_ref) and g_t is g and torch.equal(hv_t, hv_ref)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Sigmoid, nn.Identity])
def test_other_activations_and_no_bias(act: type[nn.Module]) -> None:
    torch.manual_seed(2)
    model = _net(act, bias=False)
    x, y, xq, yq = regression_data()
    ref = unrolled_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=40, lr=0.05)
    got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=40, lr=0.05, memory="store")
    assert rel_err(got, ref) < TOL


def test_meta_sgd_per_parameter_lr() -> None:
    torch.manual_seed(3)
    model = mlp(hidden=8)
    x, y, xq, yq = regression_data()
    lr = {n: (0.01 + 0.04 * torch.rand(p.shape, dtype=DT)).requires_grad_(True)
          for n, p in model.named_parameters()}
    extra = tuple(lr.values())
    ref = unrolled_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=30, lr=lr, extra=extra)
    got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=30, lr=lr, memory="store",
                          extra=extra)
    assert rel_err(got, ref) < TOL


def test_cross_entropy_classifier() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).to(DT)
    x, y, xq, yq = classification_data()
    ref = unrolled_meta_grad(model, F.cross_entropy, x, y, xq, yq, steps=30, lr=0.1,
                             solver="heun")
    got = amaml_meta_grad(model, F.cross_entropy, x, y, xq, yq, steps=30, lr=0.1,
                          solver="heun", memory="checkpoint")
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("memory", ["store", "checkpoint"])
def test_adapt_batch_equals_unrolled_task_by_task(memory: str) -> None:
    torch.manual_seed(5)
    model = mlp(hidden=8)
    xs, ys, xq, yq = regression_data(batch=3)
    lr = torch.tensor(0.02, dtype=DT, requires_grad=True)
    mu = torch.tensor(0.3, dtype=DT, requires_grad=True)
    ref = sum(unrolled_meta_grad(model, F.mse_loss, xs[i], ys[i], xq[i], yq[i], steps=40,
                                 lr=lr, mu=mu, extra=(lr, mu)) for i in range(3))
    for t in [*model.parameters(), lr, mu]:
        t.grad = None
    params = amaml.adapt_batch(model, F.mse_loss, (xs, ys), steps=40, lr=lr, proximal=mu,
                               memory=memory)
    torch.func.vmap(F.mse_loss)(amaml.functional_call_batch(model, params, xq), yq).sum() \
        .backward()
    got = torch.cat([t.grad.reshape(-1) for t in [*model.parameters(), lr, mu]])
    assert isinstance(ref, Tensor)
    assert rel_err(got, ref) < TOL


def test_fused_equals_generic_path() -> None:
    torch.manual_seed(6)
    model = mlp(hidden=8)
    wrapped = _Wrapped(model)  # same parameters, generic path
    x, y, xq, yq = regression_data()
    fast = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=50, lr=0.05, memory="store")
    generic = amaml_meta_grad(wrapped, F.mse_loss, x, y, xq, yq, steps=50, lr=0.05,
                              memory="store")
    assert rel_err(fast, generic) < TOL


def test_unrolled_and_first_order_adjoints_use_the_same_loss() -> None:
    model = mlp(hidden=8)
    x, y, xq, yq = regression_data()
    ref = unrolled_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=20, lr=0.05)
    got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=20, lr=0.05,
                          adjoint=amaml.flow.Unrolled())
    assert rel_err(got, ref) < TOL


def test_non_scalar_loss_is_refused_on_the_fast_path() -> None:
    model = mlp(hidden=8)
    x, y, _, _ = regression_data()
    with pytest.raises(ValueError, match="must return a scalar"):
        amaml.adapt(model, lambda p, t: (p - t) ** 2, (x, y), steps=2, lr=0.1, memory="store")


def test_layer_kind_is_checked() -> None:
    with pytest.raises(ValueError, match="Unknown layer kind 'gelu'"):
        Layer("gelu")
    with pytest.raises(ValueError, match="at least one linear layer"):
        MLPLoss([Layer("tanh")], F.mse_loss)


def test_loss_gradient_through_the_engine_equals_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused loss calls the autograd engine directly; the public ``torch.autograd.grad``
    (used for tensor subclasses and other torch versions) gives the same numbers."""
    from amaml import mlp as fused_mod

    p = torch.randn(7, 1, dtype=DT, requires_grad=True)
    y = torch.randn(7, 1, dtype=DT)
    r = torch.randn(7, 1, dtype=DT)
    with torch.enable_grad():
        e = fused_mod._autograd_grad(F.mse_loss(p, y), p, create_graph=True)
        assert e is not None
        r_e = fused_mod._autograd_grad(e, p, r)
        (e_ref,) = torch.autograd.grad(F.mse_loss(p, y), p, create_graph=True)
        (r_ref,) = torch.autograd.grad(e_ref, p, r)
    assert r_e is not None and torch.equal(e, e_ref) and torch.equal(r_e, r_ref)
    # an output that does not depend on the input: None, as allow_unused=True gives
    q = torch.randn(3, dtype=DT, requires_grad=True)
    with torch.enable_grad():
        assert fused_mod._autograd_grad((q * 2).sum(), p) is None
    monkeypatch.setattr(fused_mod, "_ENGINE", None)  # the public path
    with torch.enable_grad():
        e_pub = fused_mod._autograd_grad(F.mse_loss(p, y), p)
    assert e_pub is not None and torch.equal(e_pub, e_ref.detach())


def _tape_bytes(record, skip: set[int]) -> int:
    """Bytes of the distinct storages a step's record holds, ``skip`` left out."""
    seen, total = set(skip), 0
    stack = list(record)
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            ptr = item.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += item.untyped_storage().nbytes()
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "__dataclass_fields__"):
            stack.extend(getattr(item, f) for f in item.__dataclass_fields__)
    return total


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_tape_numel_is_what_a_step_records(batched: bool, solver: str) -> None:
    """The memory model's count of one step's fused record (``memory="auto"`` weighs it
    against the budget) is what the step's record holds: the layers' outputs and
    cotangents, the prediction, the gradient itself (missed before: on a 1M-parameter MLP
    store with tapes held 1.3x its prediction), and Heun's second point."""
    from amaml.flow import SOLVERS, FlowContext, FlowSpec, Objective, Reads

    torch.manual_seed(4)
    model = _net(nn.Tanh, bias=True, hidden=12)
    x, y, _, _ = regression_data(batch=3) if batched else regression_data()
    fused = _fused_loss(_FlatModel(model), F.mse_loss, x, batched)
    assert fused is not None
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    spec = FlowSpec(Objective(fused, batched), SOLVERS[solver](), 4,
                    x.shape[0] if batched else None, 2)
    flow = FlowContext(spec, Reads(theta, torch.tensor(0.04, dtype=DT),
                                   torch.tensor(0.0, dtype=DT), (x, y)),
                       (True, False, False, False, False))
    z0 = flow.initial_state()
    tapes: list = []
    flow.integrate(z0, 0, 1, tapes=tapes)
    skip = {t.untyped_storage().data_ptr() for t in (z0, x, y)}
    held = _tape_bytes(tapes[0], skip)
    assert held == flow.tape_numel() * z0.element_size()


def test_grad_flops_counts_the_layers_products() -> None:
    """The fused MLP's count of one gradient's arithmetic (what ``memory="auto"`` weighs a
    tape's bytes against): 6 n w for n points and w weights, per task."""
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    x = torch.randn(7, 3, dtype=DT)
    fused = _fused_loss(_FlatModel(model), F.mse_loss, x, False)
    assert fused is not None
    assert fused.grad_flops((x, torch.randn(7, 2, dtype=DT))) == 6 * 7 * (3 * 5 + 5 * 2)
    xb = torch.randn(4, 7, 3, dtype=DT)
    fused_b = _fused_loss(_FlatModel(model), F.mse_loss, xb, True)
    assert fused_b is not None
    assert fused_b.grad_flops((xb, torch.randn(4, 7, 2, dtype=DT))) == 6 * 7 * (3 * 5 + 5 * 2)
