"""Every tensor the inner loss reads gets its exact meta-gradient (or the call refuses).

References: the inner loop written out with plain autograd (``optim_reference.py``: gradient
descent is torch.optim's SGD without momentum), on the same batches, then back-propagation
of the query loss to every tensor that requires grad. Tolerance 1e-10 relative in float64
(round-off ~1e-14; a missing term shows at 1e-3 or more).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DT, rel_err
from optim_reference import query_grad, unrolled_optimizer
from torch import nn

import amaml

TOL = 1e-10
MEMORIES = ["store", "checkpoint", amaml.Revolve(snapshots=3)]
IDS = ["store", "checkpoint", "revolve"]


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT)


def _data(n: int = 12, batch: int | None = None):
    torch.manual_seed(1)
    lead = () if batch is None else (batch,)
    x, xq = torch.randn(*lead, n, 2, dtype=DT), torch.randn(*lead, n, 2, dtype=DT)
    f = lambda z: torch.cos(2 * z).sum(-1, keepdim=True)  # noqa: E731
    return x, f(x), xq, f(xq)


def _grads(tensors):
    return torch.cat([t.grad.reshape(-1) for t in tensors])


def _zero(tensors):
    for t in tensors:
        t.grad = None


def _run(model, loss_fn, support, wrt, xq, yq, **kw):
    _zero(wrt)
    p = amaml.adapt(model, loss_fn, support, **kw)
    F.mse_loss(amaml.functional_call(model, p, xq), yq).backward()
    return _grads(wrt)


@pytest.mark.parametrize("memory", MEMORIES, ids=IDS)
@pytest.mark.parametrize("optimizer,kind,h", [(None, "sgd", {}),
                                              ("adam", "adam", {})], ids=["gd", "adam"])
def test_captured_loss_weight_and_data(memory, optimizer, kind, h) -> None:
    """The bug of the issue: a loss weight in a closure and a support set requiring grad
    had no gradient (``None``). Now both match unrolled autograd."""
    model = _net()
    x, y, xq, yq = _data()
    x = x.clone().requires_grad_(True)
    w = torch.tensor(0.7, dtype=DT, requires_grad=True)

    def loss_fn(p, t):
        return w * F.mse_loss(p, t)

    wrt = [*model.parameters(), x, w]
    u = unrolled_optimizer(model, loss_fn, lambda k: (x, y), steps=20, lr=0.05, kind=kind, h=h)
    ref = query_grad(model, F.mse_loss, u, xq, yq, wrt)
    got = _run(model, loss_fn, (x, y), wrt, xq, yq, steps=20, lr=0.05, memory=memory,
               optimizer=optimizer)
    assert x.grad is not None and w.grad is not None
    assert rel_err(got, ref) < TOL
    assert rel_err(x.grad.reshape(-1), ref[-25:-1]) < TOL
    # Adam's step is invariant to the loss's scale but for eps, so under Adam dJ/dw (1.5e-7
    # here) is what is left of terms the size of the other gradients: its round-off is
    # relative to those (the whole gradient's norm), not to itself.
    scale = abs(float(ref[-1])) if kind != "adam" else float(ref.norm())
    assert abs(float(w.grad - ref[-1])) <= TOL * scale


class _WeightedLoss(nn.Module):
    """A learned loss: per-example weights (learning to reweight) and a scale."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.linspace(-1, 1, n, dtype=DT))
        self.scale = nn.Parameter(torch.tensor(1.3, dtype=DT))

    def forward(self, p, t):
        return self.scale * (torch.softmax(self.logits, 0) * ((p - t) ** 2).sum(-1)).sum()


@pytest.mark.parametrize("memory", MEMORIES, ids=IDS)
def test_loss_module_parameters_and_targets(memory) -> None:
    model = _net()
    x, y, xq, yq = _data()
    y = y.clone().requires_grad_(True)
    loss = _WeightedLoss(x.shape[0])
    wrt = [*model.parameters(), y, *loss.parameters()]
    u = unrolled_optimizer(model, loss, lambda k: (x, y), steps=15, lr=0.05, kind="sgd",
                           h={"momentum": 0.9})
    ref = query_grad(model, F.mse_loss, u, xq, yq, wrt)
    got = _run(model, loss, (x, y), wrt, xq, yq, steps=15, lr=0.05, memory=memory,
               optimizer=amaml.optim.SGD(momentum=0.9))
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("memory", MEMORIES, ids=IDS)
@pytest.mark.parametrize("optimizer,kind", [(None, "sgd"), ("rmsprop", "rmsprop")],
                         ids=["gd", "rmsprop"])
def test_per_step_learning_rate_schedule(memory, optimizer, kind) -> None:
    """``lr`` of shape (steps,), learnable: Maclaurin et al.'s hyperparameter schedules."""
    model = _net()
    x, y, xq, yq = _data()
    steps = 18
    lr = torch.linspace(0.08, 0.01, steps, dtype=DT).requires_grad_(True)
    wrt = [*model.parameters(), lr]
    u = unrolled_optimizer(model, F.mse_loss, lambda k: (x, y), steps=steps,
                           lr=lambda k: lr[k], kind=kind, h={})
    ref = query_grad(model, F.mse_loss, u, xq, yq, wrt)
    got = _run(model, F.mse_loss, (x, y), wrt, xq, yq, steps=steps, lr=lr, memory=memory,
               optimizer=optimizer)
    assert rel_err(got, ref) < TOL
    assert rel_err(lr.grad, ref[-steps:]) < TOL


def test_per_step_per_parameter_schedule() -> None:
    """A dict of per-parameter rates with a leading step dimension (one rate per step and
    output unit for the first layer's weight, per step for the others)."""
    model = _net()
    x, y, xq, yq = _data()
    steps = 10
    names = [n for n, _ in model.named_parameters()]
    lr = {n: torch.full((steps, *([1] * p.ndim)), 0.04, dtype=DT) for n, p in
          model.named_parameters()}
    lr["0.weight"] = torch.rand(steps, 6, 1, dtype=DT) * 0.05 + 0.01
    for t in lr.values():
        t.requires_grad_(True)
    wrt = [*model.parameters(), *lr.values()]
    u = unrolled_optimizer(model, F.mse_loss, lambda k: (x, y), steps=steps,
                           lr=lambda k: [lr[n][k] for n in names], kind="sgd", h={})
    ref = query_grad(model, F.mse_loss, u, xq, yq, wrt)
    got = _run(model, F.mse_loss, (x, y), wrt, xq, yq, steps=steps, lr=lr, memory="checkpoint")
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("memory", MEMORIES, ids=IDS)
def test_mini_batches_with_distilled_data(memory) -> None:
    """``amaml.MiniBatches`` over a set that requires grad: the gradient of every example
    sums over the steps whose batch read it; the same batches in the reference."""
    model = _net()
    x, y, xq, yq = _data(n=20)
    x = x.clone().requires_grad_(True)
    batches = amaml.MiniBatches(x, y, batch_size=6, seed=3)
    wrt = [*model.parameters(), x]
    u = unrolled_optimizer(model, F.mse_loss, batches, steps=14, lr=0.05, kind="adam", h={})
    ref = query_grad(model, F.mse_loss, u, xq, yq, wrt)
    got = _run(model, F.mse_loss, batches, wrt, xq, yq, steps=14, lr=0.05, memory=memory,
               optimizer="adam")
    assert rel_err(got, ref) < TOL
    assert not torch.equal(batches.indices(0), batches.indices(1))
    assert torch.equal(batches.indices(2), batches.indices(2))  # deterministic


def test_callable_support_and_batched() -> None:
    """Any deterministic ``k -> (x_k, y_k)``; and adapt_batch with a batched schedule."""
    model = _net()
    xs, ys, xq, yq = _data(n=16, batch=3)
    x0 = xs[0]

    def support(k):
        i = (3 * k) % 10
        return x0[i:i + 6], ys[0, i:i + 6]

    u = unrolled_optimizer(model, F.mse_loss, support, steps=12, lr=0.05, kind="sgd", h={})
    ref = query_grad(model, F.mse_loss, u, xq[0], yq[0], list(model.parameters()))
    got = _run(model, F.mse_loss, support, list(model.parameters()), xq[0], yq[0], steps=12,
               lr=0.05)
    assert rel_err(got, ref) < TOL
    xs = xs.clone().requires_grad_(True)
    batches = amaml.MiniBatches(xs, ys, batch_size=5, seed=0, batched=True)
    model.zero_grad()
    p = amaml.adapt_batch(model, F.mse_loss, batches, steps=9, lr=0.05, memory="revolve",
                          optimizer=amaml.optim.SGD(momentum=0.5))
    torch.func.vmap(F.mse_loss)(amaml.functional_call_batch(model, p, xq), yq).sum().backward()
    got = torch.cat([t.grad.reshape(-1) for t in [*model.parameters(), xs]])
    ref = 0
    wrt = [*model.parameters(), xs]
    for b in range(3):
        sched = lambda k, b=b: (batches(k)[0][b], batches(k)[1][b])  # noqa: E731
        u = unrolled_optimizer(model, F.mse_loss, sched, steps=9, lr=0.05, kind="sgd",
                               h={"momentum": 0.5})
        ref = ref + query_grad(model, F.mse_loss, u, xq[b], yq[b], wrt)
    assert rel_err(got, ref) < TOL


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 5), nn.Linear(3, 5)
        self.out = nn.Linear(5, 1)

    def forward(self, x, z=None, *, scale=None):
        h = torch.tanh(self.a(x) + self.b(z))
        return self.out(h) * (1.0 if scale is None else scale)


def test_tuple_and_dict_inputs() -> None:
    torch.manual_seed(0)
    model = _TwoInputs().to(DT)
    x, y, xq, yq = _data()
    z = torch.randn(x.shape[0], 3, dtype=DT, requires_grad=True)
    zq = torch.randn(x.shape[0], 3, dtype=DT)
    names = [n for n, _ in model.named_parameters()]
    theta = list(model.parameters())
    u = list(theta)
    for _ in range(10):
        g = torch.autograd.grad(F.mse_loss(torch.func.functional_call(
            model, dict(zip(names, u)), (x, z)), y), u, create_graph=True)
        u = [a - 0.05 * b for a, b in zip(u, g)]
    out = torch.func.functional_call(model, dict(zip(names, u)), (xq, zq))
    wrt = [*theta, z]
    ref = torch.autograd.grad(F.mse_loss(out, yq), wrt)
    ref = torch.cat([r.reshape(-1) for r in ref])
    for support in [((x, z), y), ({"x": x, "z": z}, y)]:
        _zero(wrt)
        p = amaml.adapt(model, F.mse_loss, support, steps=10, lr=0.05, memory="checkpoint")
        F.mse_loss(amaml.functional_call(model, p, (xq, zq)), yq).backward()
        assert rel_err(_grads(wrt), ref) < TOL


def test_rk4_with_captured_weight() -> None:
    """Gradient-flow solvers other than Euler take the autograd kernel for meta-parameters."""
    from helpers import unrolled_meta_grad
    model = _net()
    x, y, xq, yq = _data()
    w = torch.tensor(0.6, dtype=DT, requires_grad=True)

    def loss_fn(p, t):
        return w * F.mse_loss(p, t)

    # the reference evaluates the query with loss_fn too: so does this call
    ref = unrolled_meta_grad(model, loss_fn, x, y, xq, yq, steps=8, lr=0.05, solver="rk4",
                             extra=(w,))
    wrt = [*model.parameters(), w]
    _zero(wrt)
    p = amaml.adapt(model, loss_fn, (x, y), steps=8, lr=0.05, solver="rk4", memory="revolve")
    loss_fn(amaml.functional_call(model, p, xq), yq).backward()
    got = _grads(wrt)
    assert rel_err(got, ref) < TOL


def _dropout_reference(model, loss_fn, x, y, xq, yq, steps, lr, kind, h, seed):
    """A plain seeded loop: the masks drawn in order, step after step, then the query's."""
    torch.manual_seed(seed)
    u = unrolled_optimizer(model, loss_fn, lambda k: (x, y), steps=steps, lr=lr, kind=kind,
                           h=h)
    return query_grad(model, F.mse_loss, u, xq, yq, list(model.parameters()))


@pytest.mark.parametrize("memory", [*MEMORIES, amaml.Budget(megabytes=0.01)],
                         ids=[*IDS, "budget"])
@pytest.mark.parametrize("optimizer,kind,h", [(None, "sgd", {}), ("adam", "adam", {})],
                         ids=["gd", "adam"])
def test_dropout_is_replayed_exactly(memory, optimizer, kind, h) -> None:
    """Dropout in training mode: each step's random state is recorded and replayed, so the
    meta-gradient is unrolled autograd's with the same masks (a seeded plain loop draws
    them in the same order), bit for bit here; the random state after adapt is the loop's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    x, y, xq, yq = _data()
    ref = _dropout_reference(model, F.mse_loss, x, y, xq, yq, 12, 0.05, kind, h, seed=7)
    after_ref = torch.get_rng_state()
    torch.manual_seed(7)
    model.zero_grad()
    p = amaml.adapt(model, F.mse_loss, (x, y), steps=12, lr=0.05, memory=memory,
                    optimizer=optimizer)
    q = F.mse_loss(amaml.functional_call(model, p, xq), yq)  # the query's own mask
    assert torch.equal(torch.get_rng_state(), after_ref)
    q.backward()
    got = _grads(list(model.parameters()))
    assert rel_err(got, ref) < TOL


def test_random_loss_on_the_fused_mlp_is_replayed() -> None:
    """Noise drawn inside the loss (the network is a plain MLP): replayed too."""
    model = _net()
    x, y, xq, yq = _data()

    def noisy(p, t):
        return F.mse_loss(p + 0.1 * torch.randn_like(p), t)

    ref = _dropout_reference(model, noisy, x, y, xq, yq, 10, 0.05, "sgd", {}, seed=3)
    torch.manual_seed(3)
    got = _run(model, noisy, (x, y), list(model.parameters()), xq, yq, steps=10, lr=0.05,
               memory="checkpoint")
    assert rel_err(got, ref) < TOL
    assert "the loss draws random numbers" in amaml.explain(model, noisy, (x, y), steps=3,
                                                            lr=0.05)


def test_random_loss_refused_where_it_cannot_be_replayed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    x, y, xq, yq = _data()
    with pytest.raises(ValueError, match="dropout"):
        amaml.adapt(model, F.mse_loss, (x, y), steps=3, lr=0.05, proximal=1.0,
                    adjoint=amaml.Implicit())
    with pytest.raises(ValueError, match="dropout"):
        amaml.adapt(model, F.mse_loss, (x, y), steps=3, lr=0.05, memory="backsolve")
    p = amaml.adapt(model, F.mse_loss, (x, y), steps=3, lr=0.05, adjoint=amaml.Unrolled())
    F.mse_loss(amaml.functional_call(model, p, xq), yq).backward()
    assert model[0].weight.grad is not None
    model.eval()  # no random draws: the deterministic path
    assert "random" not in amaml.explain(model, F.mse_loss, (x, y), steps=3, lr=0.05)


def test_non_leaf_captured_tensor_refused() -> None:
    model = _net()
    x, y, _, _ = _data()
    raw = torch.tensor(0.1, dtype=DT, requires_grad=True)
    w = raw.exp()  # made outside the loss

    def loss_fn(p, t):
        return w * F.mse_loss(p, t)

    with pytest.raises(ValueError, match="not a leaf.*Compute it inside loss_fn"):
        amaml.adapt(model, loss_fn, (x, y), steps=3, lr=0.05)

    def inside(p, t):
        return raw.exp() * F.mse_loss(p, t)

    p = amaml.adapt(model, inside, (x, y), steps=3, lr=0.05)
    F.mse_loss(amaml.functional_call(model, p, x), y).backward()
    assert raw.grad is not None and torch.isfinite(raw.grad)


def test_schedule_and_support_errors() -> None:
    model = _net()
    x, y, _, _ = _data()
    with pytest.raises(ValueError, match="batch_size"):
        amaml.MiniBatches(x, y, batch_size=100)
    with pytest.raises(ValueError, match="per-step schedule"):
        amaml.adapt(model, F.mse_loss, (x, y), steps=4, lr=torch.full((5,), 0.1, dtype=DT))
    with pytest.raises(TypeError, match="pair"):
        amaml.adapt(model, F.mse_loss, lambda k: x, steps=2, lr=0.1)
    with pytest.raises(TypeError, match="tensor, a tuple or a dict"):
        amaml.adapt(model, F.mse_loss, ("x", y), steps=2, lr=0.1)


@pytest.mark.parametrize("memory", MEMORIES, ids=IDS)
@pytest.mark.parametrize("optimizer,kind,h", [(None, "sgd", {}), ("adam", "adam", {}),
                                              ("rmsprop", "rmsprop", {})],
                         ids=["gd", "adam", "rmsprop"])
def test_distilled_inputs_on_the_fused_kernel(memory, optimizer, kind, h) -> None:
    """Support inputs alone requiring grad keep the fused MLP kernel (its mixed derivative
    d/dx (g . w) from the same R-pass), per task and batched."""
    model = _net()
    x, y, xq, yq = _data()
    x = x.clone().requires_grad_(True)
    assert "step VJP kernel: fused" in amaml.explain(model, F.mse_loss, (x, y), steps=3,
                                                     lr=0.05, optimizer=optimizer)
    wrt = [*model.parameters(), x]
    u = unrolled_optimizer(model, F.mse_loss, lambda k: (x, y), steps=20, lr=0.05, kind=kind,
                           h=h)
    ref = query_grad(model, F.mse_loss, u, xq, yq, wrt)
    got = _run(model, F.mse_loss, (x, y), wrt, xq, yq, steps=20, lr=0.05, memory=memory,
               optimizer=optimizer)
    assert rel_err(got, ref) < TOL
    xs, ys, xqs, yqs = _data(batch=2)
    xs = xs.clone().requires_grad_(True)
    _zero([*model.parameters(), xs])
    p = amaml.adapt_batch(model, F.mse_loss, (xs, ys), steps=10, lr=0.05, memory=memory,
                          optimizer=optimizer)
    torch.func.vmap(F.mse_loss)(amaml.functional_call_batch(model, p, xqs), yqs).sum().backward()
    got = _grads([*model.parameters(), xs])
    ref = 0
    for b in range(2):
        u = unrolled_optimizer(model, F.mse_loss, lambda k, b=b: (xs[b], ys[b]), steps=10,
                               lr=0.05, kind=kind, h=h)
        ref = ref + query_grad(model, F.mse_loss, u, xqs[b], yqs[b], [*model.parameters(), xs])
    assert rel_err(got, ref) < TOL


def test_meta_parameters_read_only_by_later_steps() -> None:
    """A tensor only later steps read (here: a schedule scaling the inputs from step 1 on)
    is invisible at the first step; listing it in meta_parameters= gives its gradient."""
    model = _net()
    x, y, xq, yq = _data()
    w = torch.tensor(1.3, dtype=DT, requires_grad=True)

    def support(k):
        return (x * w if k > 0 else x), y

    wrt = [*model.parameters(), w]
    u = unrolled_optimizer(model, F.mse_loss, support, steps=8, lr=0.05, kind="sgd", h={})
    ref = query_grad(model, F.mse_loss, u, xq, yq, wrt)
    got = _run(model, F.mse_loss, support, wrt, xq, yq, steps=8, lr=0.05, memory="revolve",
               meta_parameters=[w])
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("memory", MEMORIES, ids=IDS)
@pytest.mark.parametrize("optimizer,kind,h", [(None, "sgd", {}), ("adamw", "adamw", {})],
                         ids=["gd", "adamw"])
def test_batched_captured_module_and_schedule(memory, optimizer, kind, h) -> None:
    """adapt_batch with a loss module's parameters, a per-step schedule and targets that
    require grad: the sum over tasks of each task's unrolled meta-gradient."""
    model = _net()
    xs, ys, xq, yq = _data(batch=2)
    ys = ys.clone().requires_grad_(True)
    steps = 9
    lr = torch.linspace(0.06, 0.02, steps, dtype=DT).requires_grad_(True)
    scale = torch.tensor(0.8, dtype=DT, requires_grad=True)

    def loss_fn(p, t):
        return scale * F.mse_loss(p, t)

    wrt = [*model.parameters(), ys, lr, scale]
    _zero(wrt)
    p = amaml.adapt_batch(model, loss_fn, (xs, ys), steps=steps, lr=lr, memory=memory,
                          optimizer=optimizer)
    torch.func.vmap(F.mse_loss)(amaml.functional_call_batch(model, p, xq), yq).sum().backward()
    got = _grads(wrt)
    ref = 0
    for b in range(2):
        u = unrolled_optimizer(model, loss_fn, lambda k, b=b: (xs[b], ys[b]), steps=steps,
                               lr=lambda k: lr[k], kind=kind, h=h)
        ref = ref + query_grad(model, F.mse_loss, u, xq[b], yq[b], wrt)
    assert rel_err(got, ref) < TOL


def test_dropout_batched_is_replayed_exactly() -> None:
    """adapt_batch(tasks="batched") with dropout (each task its own masks, vmap
    randomness='different'): revolve's replayed sweep equals MAML's unrolled graph, which
    kept the masks it drew (tasks="auto" runs a random model's tasks as a loop)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    xs, ys, xq, yq = _data(batch=3)
    grads = []
    for adjoint, memory in ((None, amaml.Revolve(snapshots=2)), (amaml.Unrolled(), "store")):
        model.zero_grad()
        torch.manual_seed(5)
        p = amaml.adapt_batch(model, F.mse_loss, (xs, ys), steps=8, lr=0.05, optimizer="adam",
                              adjoint=adjoint, memory=memory, tasks="batched")
        torch.func.vmap(F.mse_loss)(amaml.functional_call_batch(model, p, xq), yq).sum() \
            .backward()
        grads.append(_grads(list(model.parameters())))
    assert rel_err(grads[0], grads[1]) < TOL
