"""Two gloo processes on 127.0.0.1 give the single-process meta-gradient."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import mlp, regression_data, rel_err

from amaml.algorithms import make_algorithm
from amaml.experiments.distributed import (
    DistInfo,
    all_reduce_grads,
    cleanup,
    init_distributed,
    shard_indices,
)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(method: str):
    torch.manual_seed(0)
    model = mlp(hidden=16)
    batch = regression_data(batch=5)
    alg = make_algorithm(method, n_steps=30, inner_lr=0.02)
    return model, batch, alg


METHODS = ("amaml", "reptile")


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    info = init_distributed("cpu")
    assert info.world_size == world and info.backend == "gloo"
    for method in METHODS:
        model, batch, alg = _setup(method)
        mine = shard_indices(list(range(5)), info)
        alg.meta_step(model, F.mse_loss, tuple(t[mine] for t in batch), scale=1 / 5)
        all_reduce_grads(model, info)
        torch.save([p.grad for p in model.parameters()], f"{out}/{method}-rank{rank}.pt")
    cleanup(info)


def test_two_gloo_ranks_equal_single_process(tmp_path) -> None:
    """A-MAML's meta-gradient and Reptile's direction, sharded 3 + 2 over two ranks."""
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for method in METHODS:
        model, batch, alg = _setup(method)
        alg.meta_step(model, F.mse_loss, batch)
        single = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        for rank in range(2):
            grads = torch.load(tmp_path / f"{method}-rank{rank}.pt")
            dist = torch.cat([g.reshape(-1) for g in grads])
            # same sums in a different grouping (3 + 2 tasks): round-off only
            assert rel_err(dist, single) < 1e-12


def test_shard_indices_cover_the_batch() -> None:
    batch = list(range(7))
    shards = [shard_indices(batch, DistInfo(r, 3, "gloo")) for r in range(3)]
    assert shards == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="smaller than the number of processes"):
        shard_indices([0, 1], DistInfo(0, 3, "gloo"))


def test_single_process_is_a_no_op(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo() and info.is_main and not info.active


@pytest.mark.slow
def test_amaml_train_nproc_2_equals_single_process(tmp_path) -> None:
    """`amaml train --nproc 2` (torchrun, gloo) ends at the single-process initialisation."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "amaml", "train", "--family", "sinusoid", "--shots", "5",
            "--queries", "5", "--steps", "10", "--meta-iters", "3", "--meta-batch", "4",
            "--n-train", "10", "--n-test", "4", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, extra in (("single", []), ("two", ["--nproc", "2"])):
        done = subprocess.run([*args, "--out", str(tmp_path / out), *extra], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    single = torch.load(tmp_path / "single" / "init.pt", weights_only=False)["model"]
    two = torch.load(tmp_path / "two" / "init.pt", weights_only=False)["model"]
    assert single.keys() == two.keys()
    for k in single:
        # float32; 3 + 2 task shards sum in another order: ~1e-8 observed after 3 Adam steps
        assert torch.allclose(single[k], two[k], rtol=0, atol=1e-6), k
