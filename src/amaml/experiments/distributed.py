"""Multi-process meta-training on torch.distributed (gloo on CPU, nccl on CUDA).

Every rank draws the same meta-batch (same seed, same RNG stream), adapts only
its shard of the tasks, and the meta-gradients are summed with ``all_reduce``;
each task is weighted ``1 / global_batch``, so the summed gradient is the
single-process mean and every rank takes the same optimiser step. Start with
``torchrun --nproc-per-node P -m amaml train ...`` (multi-node: add ``--nnodes``,
``--node-rank`` and ``--rdzv-endpoint``) or ``amaml train --nproc P``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistInfo", "all_reduce_grads", "all_reduce_sum", "barrier", "cleanup", "init_distributed",
    "shard_indices",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job.

    Attributes:
        rank: Global rank (0 writes outputs).
        world_size: Number of processes.
        backend: ``"gloo"``/``"nccl"``, or ``None`` for a single process.
    """

    rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes outputs and shows progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether a process group is in use."""
        return self.backend is not None and self.world_size > 1


def init_distributed(device: torch.device | str = "cpu") -> DistInfo:
    """Join the process group described by torchrun's environment, if any.

    With ``WORLD_SIZE`` unset or 1 this is a single process and nothing is
    initialised. Otherwise ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK`` and
    ``WORLD_SIZE`` must be set (torchrun sets them), and the backend is nccl for
    a CUDA device and gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), dist.get_backend())
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), backend)


def shard_indices(indices: Sequence[int], info: DistInfo) -> list[int]:
    """This rank's contiguous share of a meta-batch (sizes differ by at most one)."""
    n, w, r = len(indices), info.world_size, info.rank
    if n < w:
        raise ValueError(f"The meta-batch ({n} tasks) is smaller than the number of processes "
                         f"({w}); use --meta-batch >= {w} or fewer processes.")
    start = r * (n // w) + min(r, n % w)
    stop = start + n // w + (1 if r < n % w else 0)
    return list(indices[start:stop])


def all_reduce_sum(t: Tensor, info: DistInfo) -> Tensor:
    """Sum a tensor over ranks in place (a no-op for a single process); returns it."""
    if info.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_grads(model: nn.Module, info: DistInfo) -> None:
    """Sum every parameter's ``.grad`` over ranks (one flat buffer, one collective)."""
    if not info.active:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op for a single process)."""
    if info.active:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group."""
    if info.active and dist.is_initialized():
        dist.destroy_process_group()
