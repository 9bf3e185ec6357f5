"""Algorithms by name: A-MAML equals MAML with the same Euler steps; the baselines' directions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import mlp, regression_data, rel_err, unrolled_meta_grad

from amaml.algorithms import list_algorithms, make_algorithm


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_registry_names() -> None:
    assert list_algorithms() == ["amaml", "fomaml", "imaml", "maml", "maml1", "reptile"]
    assert make_algorithm("maml", n_steps=50, inner_lr=0.01).n_steps == 5  # paper: N/10
    assert make_algorithm("maml", n_steps=50, inner_lr=0.01, maml_steps=7).n_steps == 7
    assert make_algorithm("maml1", n_steps=50, inner_lr=0.01).n_steps == 1
    assert make_algorithm("imaml", n_steps=50, inner_lr=0.01).proximal == 1.0


def test_amaml_meta_step_equals_maml_same_steps() -> None:
    """A-MAML with Euler and N steps gives MAML's meta-gradient with N steps."""
    model = mlp()
    batch = regression_data(batch=3)
    make_algorithm("amaml", n_steps=60, inner_lr=0.02).meta_step(model, F.mse_loss, batch)
    g_amaml = _grads(model)
    model.zero_grad()
    make_algorithm("maml", n_steps=60, inner_lr=0.02, maml_steps=60).meta_step(
        model, F.mse_loss, batch)
    assert rel_err(g_amaml, _grads(model)) < 1e-10
    ref = sum(unrolled_meta_grad(model, F.mse_loss, *(t[i] for t in batch), steps=60, lr=0.02)
              for i in range(3)) / 3
    assert rel_err(g_amaml, ref) < 1e-10


def test_fomaml_is_query_gradient_at_adapted_point() -> None:
    model = mlp(hidden=8)
    xs, ys, xq, yq = regression_data(batch=2)
    alg = make_algorithm("fomaml", n_steps=20, inner_lr=0.05)
    alg.meta_step(model, F.mse_loss, (xs, ys, xq, yq))
    got = _grads(model)
    params = alg.adapt(model, F.mse_loss, (xs, ys))
    expect = 0
    for i in range(2):
        leaves = {n: v[i].clone().requires_grad_() for n, v in params.items()}
        loss = F.mse_loss(torch.func.functional_call(model, leaves, (xq[i],)), yq[i])
        expect = expect + torch.cat([g.reshape(-1) for g in
                                     torch.autograd.grad(loss, list(leaves.values()))]) / 2
    assert rel_err(got, expect) < 1e-12


def test_reptile_direction() -> None:
    model = mlp(hidden=8)
    xs, ys, xq, yq = regression_data(batch=2)
    alg = make_algorithm("reptile", n_steps=10, inner_lr=0.05)
    alg.meta_step(model, F.mse_loss, (xs, ys, xq, yq))
    params = alg.adapt(model, F.mse_loss, (xs, ys))
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, (p.detach() - params[n]).mean(0), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["amaml", "maml", "maml1", "fomaml", "reptile", "imaml"])
def test_scale_weights_tasks(name: str) -> None:
    """scale = 1/B_global on a shard: two halves summed equal the whole batch."""
    model = mlp(hidden=8)
    batch = regression_data(batch=4)
    alg = make_algorithm(name, n_steps=10, inner_lr=0.05)
    alg.meta_step(model, F.mse_loss, batch)
    whole = _grads(model)
    model.zero_grad()
    for half in (slice(0, 2), slice(2, 4)):
        alg.meta_step(model, F.mse_loss, tuple(t[half] for t in batch), scale=0.25)
    assert rel_err(_grads(model), whole) < 1e-12


@pytest.mark.parametrize("name,arg,value", [
    ("maml", "memory", "revolve"), ("reptile", "proximal", 0.5), ("fomaml", "compile", True),
    ("amaml", "maml_steps", 3), ("maml1", "cg_steps", 5), ("imaml", "proximal_in_query", True),
])
def test_an_argument_the_method_does_not_use_is_refused(name: str, arg: str,
                                                        value: object) -> None:
    with pytest.raises(ValueError, match=rf"Method '{name}' does not use {arg} "):
        make_algorithm(name, n_steps=10, inner_lr=0.05, **{arg: value})  # type: ignore[arg-type]


def test_defaults_of_unused_arguments_are_accepted() -> None:
    # The neutral values, as a caller passing every setting for every method gives them.
    for name in list_algorithms():
        make_algorithm(name, n_steps=10, inner_lr=0.05, memory="checkpoint",
                       proximal=None if name == "imaml" else 0.0,
                       maml_steps=None, cg_steps=20, compile=False, proximal_in_query=False)


def test_imaml_with_proximal_zero_warns_and_uses_one() -> None:
    with pytest.warns(UserWarning, match=r"proximal=0, using proximal=1\.0"):
        assert make_algorithm("imaml", n_steps=5, inner_lr=0.01, proximal=0).proximal == 1.0
    assert make_algorithm("imaml", n_steps=5, inner_lr=0.01, proximal=0.3).proximal == 0.3


@pytest.mark.parametrize("kwargs,match", [
    ({"n_steps": 0}, "n_steps must be an int >= 1"),
    ({"n_steps": True}, "n_steps must be an int >= 1"),
    ({"maml_steps": 0}, "maml_steps must be an int >= 1"),
])
def test_step_counts_are_checked(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_algorithm("maml", **{"n_steps": 10, "inner_lr": 0.01, **kwargs})  # type: ignore[arg-type]


def test_maml_default_steps_is_one_rule() -> None:
    from amaml.algorithms import maml_default_steps
    from amaml.experiments import TrainConfig

    for steps in (1, 9, 10, 55, 1000):
        assert TrainConfig(steps=steps).effective_maml_steps == maml_default_steps(steps)
        assert make_algorithm("maml", n_steps=steps, inner_lr=0.01).n_steps == \
            maml_default_steps(steps)
