"""CUDA: the device follows the model and the data (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import amaml_meta_grad, mlp, regression_data, rel_err

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("memory", ["store", "checkpoint", "backsolve"])
def test_cuda_matches_cpu(memory: str) -> None:
    model = mlp()
    data = regression_data()
    cpu = amaml_meta_grad(model, F.mse_loss, *data, steps=100, lr=0.002, memory=memory)
    gpu_model = model.cuda()
    gpu = amaml_meta_grad(gpu_model, F.mse_loss, *(t.cuda() for t in data), steps=100,
                          lr=0.002, memory=memory)
    assert gpu.device.type == "cuda"
    assert rel_err(gpu.cpu(), cpu) < 1e-10  # float64 on both; kernels differ only in rounding


def test_cuda_adapt_batch() -> None:
    import amaml

    model = mlp().cuda()
    xs, ys, xq, yq = (t.cuda() for t in regression_data(batch=3))
    params = amaml.adapt_batch(model, F.mse_loss, (xs, ys), steps=20, lr=0.01)
    assert all(v.device.type == "cuda" and v.shape[0] == 3 for v in params.values())
    torch.func.vmap(F.mse_loss)(amaml.functional_call_batch(model, params, xq), yq).sum().backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in model.parameters())


@pytest.mark.parametrize("kw", [{"memory": "revolve"}, {"memory": "store", "compile": True},
                                {"memory": "checkpoint", "compile": True, "solver": "heun"},
                                {"memory": "store", "compile": "reduce-overhead"}],
                         ids=["revolve", "store-compiled", "checkpoint-compiled-heun",
                              "store-cudagraphs"])
def test_cuda_exact_against_unrolled(kw: dict[str, object]) -> None:
    """On the GPU too (compiled: Triton kernels) the gradient is the unrolled one, float64."""
    from helpers import unrolled_meta_grad

    model = mlp(hidden=8).cuda()
    x, y, xq, yq = (t.cuda() for t in regression_data())
    solver = str(kw.get("solver", "euler"))
    ref = unrolled_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=120, lr=0.01, solver=solver)
    got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=120, lr=0.01, **kw)
    assert got.is_cuda
    assert rel_err(got, ref) < 1e-10


def test_cuda_checkpoint_memory_does_not_grow_like_store() -> None:
    """Peak CUDA memory of one meta-gradient: checkpoint holds ~2 sqrt(N) states, store N + 1."""
    model = mlp().cuda()
    x, y, xq, yq = (t.cuda() for t in regression_data())
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peaks = {}
    for memory in ("store", "checkpoint"):
        amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=5, lr=0.01, memory=memory)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=1600, lr=0.01, memory=memory)
        torch.cuda.synchronize()
        peaks[memory] = (torch.cuda.max_memory_allocated() - base) / state_bytes
    assert peaks["store"] > 1600  # at least the trajectory, in units of one state
    assert peaks["checkpoint"] < 200  # 2 sqrt(1600) = 80 states, plus working buffers
