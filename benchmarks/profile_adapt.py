"""Where the eager time of one ``amaml.adapt`` meta-gradient goes (cProfile and torch.profiler).

The workload of ``../shared/bench/peers.py``: MLP 2-32-32-1 tanh, one task of 100 support
and 100 query points, 0.5 * MSE, inner lr 0.01, float32, one thread. Prints the time of the
forward pass (adaptation) and of the backward pass (the adjoint sweep) per inner step, the
functions with most own time (cProfile) and the torch ops with most self CPU time
(torch.profiler).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_adapt.py --steps 200 --memory store

``--generic`` wraps the MLP in a module of its own, so that ``adapt`` takes the generic path
(``torch.func.functional_call`` and double backward) rather than the fused MLP path.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from torch import Tensor, nn

import amaml


class _Wrapped(nn.Module):
    """The same MLP, not recognised as a plain ``nn.Sequential``: the generic path."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--memory", default="store")
    ap.add_argument("--generic", action="store_true", help="force the generic path")
    ap.add_argument("--batch", type=int, default=0, help="adapt_batch on this many tasks")
    ap.add_argument("--top", type=int, default=18)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net: nn.Module = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                                   nn.Linear(32, 1))
    if args.generic:
        net = _Wrapped(net)
    lead = (args.batch,) if args.batch else ()
    x, xq = torch.rand(*lead, 100, 2) * 2 - 1, torch.rand(*lead, 100, 2) * 2 - 1
    y, yq = torch.sin(3 * x).sum(-1, keepdim=True), torch.sin(3 * xq).sum(-1, keepdim=True)

    def mse_half(pred: Tensor, target: Tensor) -> Tensor:
        return 0.5 * ((pred - target) ** 2).mean()

    def meta_grad() -> tuple[float, float]:
        net.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        if args.batch:
            p = amaml.adapt_batch(net, mse_half, (x, y), steps=args.steps, lr=0.01,
                                  memory=args.memory)
            loss = torch.func.vmap(mse_half)(amaml.functional_call_batch(net, p, xq), yq).sum()
        else:
            p = amaml.adapt(net, mse_half, (x, y), steps=args.steps, lr=0.01, memory=args.memory)
            loss = mse_half(amaml.functional_call(net, p, xq), yq)
        t1 = time.perf_counter()
        loss.backward()
        return t1 - t0, time.perf_counter() - t1

    meta_grad()
    runs = [meta_grad() for _ in range(3)]
    fwd, bwd = sorted(r[0] for r in runs)[1], sorted(r[1] for r in runs)[1]
    print(f"per inner step: forward {1e6 * fwd / args.steps:.0f} us, backward (adjoint) "
          f"{1e6 * bwd / args.steps:.0f} us  (median of 3; memory={args.memory}, "
          f"{'generic' if args.generic else 'automatic'} path, batch={args.batch or 1})")

    prof = cProfile.Profile()
    prof.enable()
    meta_grad()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
    print("\n".join(s.getvalue().splitlines()[:args.top + 12]))

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
        meta_grad()
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
