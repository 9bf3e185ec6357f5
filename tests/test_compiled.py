"""The compiled solver steps (``compile=True``): the same meta-gradient as unrolled autograd.

Each test compiles a step and its VJP once (tens of seconds on CPU), so the cases are few
and each covers much: proximal term, learnable lr and mu, store and checkpoint (which
reuse the same compiled code), Heun, a batch of tasks, and the eager fallback.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DT, amaml_meta_grad, mlp, regression_data, rel_err, unrolled_meta_grad

import amaml
from amaml import compile_cache
from amaml.flow.kernels import compiled

TOL = 1e-10


def test_compiled_euler_proximal_learnable_lr_store_and_checkpoint() -> None:
    model = mlp(hidden=8)
    x, y, xq, yq = regression_data()
    lr = torch.tensor(0.03, dtype=DT, requires_grad=True)
    mu = torch.tensor(0.5, dtype=DT, requires_grad=True)
    ref = unrolled_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=200, lr=lr, mu=mu,
                             extra=(lr, mu))
    for memory in ("store", "checkpoint"):
        got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=200, lr=lr, proximal=mu,
                              memory=memory, compile=True, extra=(lr, mu))
        assert rel_err(got, ref) < TOL, memory
        assert torch.allclose(got[-2:], ref[-2:], rtol=TOL, atol=0), memory


def test_compiled_heun_batch_equals_eager() -> None:
    model = mlp(hidden=8)
    xs, ys, xq, yq = regression_data(batch=3)

    def meta_grad(**kw: object) -> torch.Tensor:
        model.zero_grad()
        params = amaml.adapt_batch(model, F.mse_loss, (xs, ys), steps=60, lr=0.02,
                                   solver="heun", memory="checkpoint", **kw)
        torch.func.vmap(F.mse_loss)(amaml.functional_call_batch(model, params, xq),
                                    yq).sum().backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    eager = meta_grad()
    assert rel_err(meta_grad(compile=True), eager) < TOL
    # and task by task against unrolled autograd
    looped = sum(unrolled_meta_grad(model, F.mse_loss, xs[i], ys[i], xq[i], yq[i], steps=60,
                                    lr=0.02, solver="heun") for i in range(3))
    assert rel_err(eager, looped) < TOL


def test_compile_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn: object, **kwargs: object) -> object:
        def run(*args: object) -> object:
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(compiled.torch, "compile", broken)
    monkeypatch.setattr(compiled, "_COMPILED", {})  # the failed steps stay in this test
    model = mlp(hidden=8)
    x, y, xq, yq = regression_data()
    ref = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=30, lr=0.05, memory="store")
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*no C\\+\\+ compiler"):
        got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=30, lr=0.05,
                              memory="store", compile=True)
    assert torch.equal(got, ref)


def test_cpp_wrapper_failure_rebuilds_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU the steps are compiled with a C++ wrapper first; if that build fails they are
    compiled again without it (here: a stand-in compiler), silently, with the same result."""
    calls: list[dict[str, object]] = []

    def fake(fn, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs)

        def run(*args: object) -> object:
            if kwargs.get("options", {}).get("cpp_wrapper"):  # type: ignore[union-attr]
                raise RuntimeError("no C++ wrapper here")
            return fn(*args)
        return run

    monkeypatch.setattr(compiled.torch, "compile", fake)
    monkeypatch.setattr(compiled, "_COMPILED", {})
    model = mlp(hidden=8)
    x, y, xq, yq = regression_data()
    ref = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=20, lr=0.05, memory="store")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=20, lr=0.05,
                              memory="store", compile=True)
    assert rel_err(got, ref) < TOL
    assert calls[0] == {"dynamic": False, "options": {"cpp_wrapper": True}}
    assert all("options" not in kw for kw in calls[1:]) and len(calls) >= 3
    (fns,) = compiled._COMPILED.values()
    assert not fns.failed and not fns.cpp_wrapper


def test_compiled_functions_are_shared_by_equal_fused_losses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from amaml.flow import FlowSpec, Objective, Reads
    from amaml.flow.step_maps import RK4, Euler
    from amaml.mlp import Layer, MLPLoss

    monkeypatch.setattr(compiled, "_COMPILED", {})
    layers = [Layer("linear", 2, 4), Layer("tanh"), Layer("linear", 4, 1)]
    theta, lr = torch.zeros(17, dtype=DT), torch.tensor(0.1, dtype=DT)
    reads = Reads(theta, lr, None, (torch.zeros(3, 2, dtype=DT), torch.zeros(3, 1, dtype=DT)))

    def fns(loss_fn: object = F.mse_loss, solver: object = None, tasks: int | None = None):  # type: ignore[no-untyped-def]
        spec = FlowSpec(Objective(MLPLoss(layers, loss_fn), tasks is not None),  # type: ignore[arg-type]
                        solver or Euler(), 5, tasks, 2, compile="default")
        return compiled.CompiledKernel(spec, reads, compiled.AbstractKernel).fns  # type: ignore[arg-type]

    first = fns()
    assert fns() is first  # a new MLPLoss of the same layers and loss function
    assert fns(F.l1_loss) is not first and fns(solver=RK4()) is not first
    assert fns(tasks=3) is not first
    plain = FlowSpec(Objective(lambda u, x, y: (u.sum() * x).sum()), Euler(), 5, compile="default")
    one = compiled.CompiledKernel(plain, reads, compiled.AbstractKernel).fns  # type: ignore[arg-type]
    assert compiled.CompiledKernel(plain, reads, compiled.AbstractKernel).fns is not one  # type: ignore[arg-type]
    for i in range(compiled._COMPILED_SIZE + 3):  # bounded, least recently used dropped
        fns(loss_fn=lambda p, t, i=i: F.mse_loss(p, t) * (i + 1))
    assert len(compiled._COMPILED) == compiled._COMPILED_SIZE
    assert fns() is not first


def test_compile_argument_is_checked() -> None:
    model = mlp(hidden=8)
    x, y, _, _ = regression_data()
    with pytest.raises(ValueError, match="'yes' is not a torch.compile mode"):
        amaml.adapt(model, F.mse_loss, (x, y), steps=2, lr=0.1, compile="yes")
    with pytest.raises(TypeError, match="compile must be True, False or one of"):
        amaml.adapt(model, F.mse_loss, (x, y), steps=2, lr=0.1, compile=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a torch.compile mode"):
        amaml.DiscreteAdjoint(compile="fast")


def test_compile_mode_reduce_overhead_is_exact() -> None:
    """A CUDA-graph mode (on CPU: compiled without graphs) copies its outputs out; same gradient."""
    model = mlp(hidden=8)
    x, y, xq, yq = regression_data()
    ref = unrolled_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=40, lr=0.05)
    got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=40, lr=0.05, memory="store",
                          compile="reduce-overhead")
    assert rel_err(got, ref) < TOL


def test_recommend_compile_break_even() -> None:
    # 100 steps x 5 tasks x 1000 meta-iterations = 5e5 task-steps: well past break-even
    assert compile_cache.recommend_compile(100, 1000, 5, "cpu")
    assert compile_cache.recommend_compile(100, 1000, 5, "cuda:0")
    # 10 steps x 5 tasks x 100 meta-iterations = 5e3: compiling would not pay
    assert not compile_cache.recommend_compile(10, 100, 5, "cpu")
    with pytest.raises(ValueError, match="n_steps must be an int >= 1"):
        compile_cache.recommend_compile(0, 10, 5, "cpu")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        compile_cache.recommend_compile(10, 10, 5, "tpu")


def test_enable_compile_cache_points_inductor_to_the_folder(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    from pathlib import Path

    import torch._inductor.config as inductor_config

    for var in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE",
                "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.delenv(var, raising=False)  # restored after the test
    # Not monkeypatch.setattr: its undo deletes an attribute that torch's config module
    # keeps outside the module's __dict__, which broke every later compilation.
    old = inductor_config.fx_graph_cache
    inductor_config.fx_graph_cache = False
    try:
        base = Path(str(tmp_path))
        monkeypatch.setenv("AMAML_CACHE", str(base / "amaml"))
        path = compile_cache.enable_compile_cache()
        assert path == (base / "amaml" / "torch-compile").resolve() and path.is_dir()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
        assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"
        assert inductor_config.fx_graph_cache is True
        explicit = compile_cache.enable_compile_cache(base / "elsewhere")
        assert explicit == (base / "elsewhere").resolve()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(explicit)
    finally:
        inductor_config.fx_graph_cache = old
