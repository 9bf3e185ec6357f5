"""Few-shot classification with a long inner loop in constant memory (``memory="revolve"``).

5-way 5-shot tasks: points in 20 dimensions whose class means lie in a 2-D subspace shared
by all tasks, buried in noise along the other 18. A network meta-trained with A-MAML
learns an initialisation that adapts to a new task's classes in 100 steps of gradient
descent on the cross-entropy; binomial checkpointing keeps a fixed number of states
(here 8) whatever the number of inner steps.

    python examples/few_shot_classification.py          # about a minute on one CPU core
    python examples/few_shot_classification.py --quick  # a few seconds (a smoke test)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import amaml

WAYS, SHOTS, QUERIES, DIM = 5, 5, 15, 20


def tasks(n_tasks: int, basis: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Support and query sets; each task has its own class means in the shared subspace."""
    means = 3 * torch.randn(n_tasks, WAYS, 2, generator=gen) @ basis  # [T, WAYS, DIM]
    labels = torch.arange(WAYS).repeat_interleave(SHOTS + QUERIES)     # [WAYS * (S + Q)]
    x = means[:, labels] + 2 * torch.randn(n_tasks, labels.numel(), DIM, generator=gen)
    perm = torch.randperm(labels.numel(), generator=gen)
    x, y = x[:, perm], labels[perm].expand(n_tasks, -1)
    k = WAYS * SHOTS
    return x[:, :k], y[:, :k], x[:, k:], y[:, k:]


def accuracy(net: nn.Module, steps: int, batch: tuple[torch.Tensor, ...]) -> float:
    xs, ys, xq, yq = batch
    params = amaml.adapt_batch(net, F.cross_entropy, (xs, ys), steps=steps, lr=0.05)
    with torch.no_grad():
        pred = amaml.functional_call_batch(net, params, xq).argmax(-1)
    return float((pred == yq).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few iterations only")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    iters, steps = (10, 20) if args.quick else (150, 100)

    basis = torch.linalg.qr(torch.randn(DIM, 2, generator=gen))[0].T  # [2, DIM], orthonormal
    net = nn.Sequential(nn.Linear(DIM, 32), nn.Tanh(), nn.Linear(32, WAYS))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    test = tasks(200, basis, gen)
    before = accuracy(net, steps, test)

    for it in range(1, iters + 1):
        xs, ys, xq, yq = tasks(8, basis, gen)
        params = amaml.adapt_batch(net, F.cross_entropy, (xs, ys), steps=steps, lr=0.05,
                                   memory=amaml.Revolve(snapshots=8))
        logits = amaml.functional_call_batch(net, params, xq)
        loss = F.cross_entropy(logits.reshape(-1, WAYS), yq.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % max(1, iters // 10) == 0:
            print(f"iteration {it:4d}: meta-batch query loss {loss.item():.4f}", flush=True)

    after = accuracy(net, steps, test)
    print(f"meta-test accuracy after {steps} inner steps (200 tasks, {WAYS}-way {SHOTS}-shot): "
          f"{before:.3f} from the initial network, {after:.3f} meta-learned")


if __name__ == "__main__":
    main()
