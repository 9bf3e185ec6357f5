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
