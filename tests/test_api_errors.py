"""Bad input gets a clear error naming the argument, and nothing is changed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DT, mlp, regression_data

import amaml
from amaml.algorithms import make_algorithm


@pytest.fixture
def task():
    model = mlp(hidden=8)
    x, y, _, _ = regression_data()
    return model, x, y


def _adapt(task, **kw):
    model, x, y = task
    args = dict(steps=10, lr=0.01)
    args.update(kw)
    support = args.pop("support", (x, y))
    return amaml.adapt(model, F.mse_loss, support, **args)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, None])
def test_bad_steps(task, steps) -> None:
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        _adapt(task, steps=steps)


@pytest.mark.parametrize("lr", [0.0, -0.1, torch.tensor(-1.0, dtype=DT)])
def test_bad_lr(task, lr) -> None:
    with pytest.raises(ValueError, match="lr must be > 0"):
        _adapt(task, lr=lr)


def test_bad_lr_dict(task) -> None:
    with pytest.raises(ValueError, match="missing"):
        _adapt(task, lr={"0.weight": 0.1})
    model, _, _ = task
    shapes = {n: torch.ones(7, dtype=DT) for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="does not broadcast"):
        _adapt(task, lr=shapes)


def test_bad_proximal(task) -> None:
    with pytest.raises(ValueError, match="proximal must be >= 0"):
        _adapt(task, proximal=-1.0)


def test_mismatched_batch(task) -> None:
    _, x, y = task
    with pytest.raises(ValueError, match=r"same number of examples.*\(20, 2\).*\(19, 1\)"):
        _adapt(task, support=(x, y[:-1]))


def test_mismatched_tasks_batched(task) -> None:
    model, _, _ = task
    xs, ys, _, _ = regression_data(batch=3)
    with pytest.raises(ValueError, match="same number of tasks"):
        amaml.adapt_batch(model, F.mse_loss, (xs, ys[:2]), steps=5, lr=0.01)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_data(task, bad) -> None:
    _, x, y = task
    x = x.clone()
    x[3, 1] = bad
    with pytest.raises(ValueError, match="support x contains NaN or infinite"):
        _adapt(task, support=(x, y))


def test_unknown_names(task) -> None:
    with pytest.raises(ValueError, match=r"Unknown solver 'rk5'; expected one of \['euler'"):
        _adapt(task, solver="rk5")
    with pytest.raises(ValueError, match="Unknown memory strategy 'disk'"):
        _adapt(task, memory="disk")
    with pytest.raises(ValueError, match="Unknown method 'mamlx'"):
        make_algorithm("mamlx", n_steps=5, inner_lr=0.01)


def test_implicit_needs_proximal(task) -> None:
    with pytest.raises(ValueError, match="needs proximal weight mu > 0"):
        _adapt(task, adjoint=amaml.Implicit())


@pytest.mark.parametrize("compile", [True, "reduce-overhead"])
def test_compile_with_adjoint_is_refused(task, compile) -> None:
    """compile= would be silently dropped with an explicit adjoint: refused, naming the fix."""
    fix = r"compile=.*adjoint=.*DiscreteAdjoint\(memory, compile="
    with pytest.raises(ValueError, match=fix):
        _adapt(task, adjoint=amaml.DiscreteAdjoint(amaml.Store()), compile=compile)
    model, x, y = task
    with pytest.raises(ValueError, match=fix):
        amaml.adapt_batch(model, F.mse_loss, (x[None], y[None]), steps=2, lr=0.01,
                          adjoint=amaml.Unrolled(), compile=compile)
    _adapt(task, adjoint=amaml.Unrolled(), compile=False)  # compile left off: accepted


def test_discrete_adjoint_memory_must_be_a_strategy() -> None:
    with pytest.raises(TypeError, match=r"memory=\.\.\.\) must be an AbstractMemory"):
        amaml.DiscreteAdjoint(memory="store")  # type: ignore[arg-type]


def test_not_a_module() -> None:
    x, y, _, _ = regression_data()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        amaml.adapt(lambda z: z, F.mse_loss, (x, y), steps=3, lr=0.1)


@pytest.mark.parametrize("memory", ["store", "checkpoint", "backsolve"])
@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_divergence_names_the_step_and_leaves_model_untouched(task, memory, solver) -> None:
    model, x, y = task
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    y_big = y * 1e3  # huge loss curvature: lr = 1 makes gradient descent blow up
    with pytest.raises(amaml.DivergenceError, match=r"non-finite at step \d+ of 500.*smaller"):
        amaml.adapt(model, F.mse_loss, (x, y_big), steps=500, lr=1.0, memory=memory,
                    solver=solver)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
        assert p.grad is None


def test_divergence_step_is_the_first_bad_one() -> None:
    """The reported step is exactly the first non-finite one (checked by replaying)."""
    model = mlp(hidden=8)
    x, y, _, _ = regression_data()
    y = y * 1e3
    with pytest.raises(amaml.DivergenceError) as info:
        amaml.adapt(model, F.mse_loss, (x, y), steps=500, lr=1.0)
    k = info.value.step
    finite_before = amaml.adapt(model, F.mse_loss, (x, y), steps=k - 1, lr=1.0,
                                adjoint=amaml.FirstOrder()) if k > 1 else None
    if finite_before is not None:
        assert all(bool(torch.isfinite(v).all()) for v in finite_before.values())


def test_loss_must_be_scalar(task) -> None:
    model, x, y = task
    with pytest.raises(ValueError, match="must return a scalar"):
        amaml.adapt(model, lambda p, t: (p - t) ** 2, (x, y), steps=3, lr=0.1)


def test_gradient_flow_validation() -> None:
    theta = torch.zeros(3, dtype=DT)
    loss = lambda u: (u**2).sum()  # noqa: E731
    with pytest.raises(ValueError, match="whole number"):
        amaml.gradient_flow(loss, theta, dt=0.3, t1=1.0)
    with pytest.raises(ValueError, match="either n_steps or t1"):
        amaml.gradient_flow(loss, theta, dt=0.1, t1=1.0, n_steps=10)
    with pytest.raises(ValueError, match="flat floating-point tensor"):
        amaml.gradient_flow(loss, torch.zeros(2, 2), dt=0.1, n_steps=3)
    with pytest.raises(ValueError, match=r"dt must be a scalar or have shape \(3,\)"):
        amaml.gradient_flow(loss, theta, dt=torch.ones(4, dtype=DT), n_steps=3)
