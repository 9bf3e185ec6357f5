"""amaml against TorchOpt MetaSGD, interleaved in one process, in thread CPU time.

``../shared/bench/peers.py`` runs each method in its own subprocess, one after the other: on
a machine shared with other jobs the load changes between methods and the ratios move by
2x. This script runs the same workload (MLP 2-32-32-1 tanh, 5 tasks of 100 + 100 points,
0.5 * MSE, lr 0.01, float32, one thread) with the methods interleaved round by round and
timed with ``time.thread_time`` (CPU time of this thread: time-slicing by other processes
is not counted), and prints each method's median as a ratio to TorchOpt's and to
forward-only adaptation. TorchOpt (``pip install torchopt``) is a peer, not a dependency.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_interleaved.py --N 100 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor, nn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--N", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--methods", nargs="+", default=[
        "forward", "torchopt", "store", "checkpoint", "revolve", "batch"])
    args = ap.parse_args()
    import torchopt

    import amaml

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 1))
    xs, xq = torch.rand(5, 100, 2) * 2 - 1, torch.rand(5, 100, 2) * 2 - 1
    ys, yq = torch.sin(3 * xs).sum(-1, keepdim=True), torch.sin(3 * xq).sum(-1, keepdim=True)
    n, h = args.N, 0.01
    metasgd = torchopt.MetaSGD(model, lr=h)

    def mse_half(pred: Tensor, y: Tensor) -> Tensor:
        return 0.5 * ((pred - y) ** 2).mean()

    def forward() -> None:
        for i in range(5):
            u = [p.detach() for p in model.parameters()]
            for _ in range(n):
                u = [t.requires_grad_() for t in u]
                out = torch.func.functional_call(model, dict(zip(
                    [k for k, _ in model.named_parameters()], u)), (xs[i],))
                g = torch.autograd.grad(mse_half(out, ys[i]), u)
                u = [t.detach() - h * gt for t, gt in zip(u, g)]

    def torchopt_run() -> None:
        model.zero_grad(set_to_none=True)
        for i in range(5):
            net_state = torchopt.extract_state_dict(model)
            opt_state = torchopt.extract_state_dict(metasgd)
            for _ in range(n):
                metasgd.step(mse_half(model(xs[i]), ys[i]))
            (mse_half(model(xq[i]), yq[i]) / 5).backward()
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(metasgd, opt_state)

    def amaml_run(memory: str) -> None:
        model.zero_grad(set_to_none=True)
        for i in range(5):
            p = amaml.adapt(model, mse_half, (xs[i], ys[i]), steps=n, lr=h, memory=memory)
            (mse_half(amaml.functional_call(model, p, xq[i]), yq[i]) / 5).backward()

    def batch() -> None:
        model.zero_grad(set_to_none=True)
        p = amaml.adapt_batch(model, mse_half, (xs, ys), steps=n, lr=h, memory="store")
        pred = amaml.functional_call_batch(model, p, xq)
        (0.5 * ((pred - yq) ** 2).mean(dim=(1, 2)).sum() / 5).backward()

    runs = {"forward": forward, "torchopt": torchopt_run, "batch": batch,
            **{m: (lambda m=m: amaml_run(m)) for m in ("store", "checkpoint", "revolve")}}
    chosen = {m: runs[m] for m in args.methods}
    times: dict[str, list[float]] = {m: [] for m in chosen}
    for fn in chosen.values():
        fn()  # warm-up
    for _ in range(args.rounds):
        for m, fn in chosen.items():
            t0 = time.thread_time()
            fn()
            times[m].append(time.thread_time() - t0)
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"N = {n}, 5 tasks, {args.rounds} interleaved rounds, thread CPU time (median)")
    print("| method | s / meta-grad | x forward | x TorchOpt |")
    print("|---|---:|---:|---:|")
    for m, t in med.items():
        fwd = f"{t / med['forward']:.2f}x" if "forward" in med else ""
        to = f"{t / med['torchopt']:.2f}x" if "torchopt" in med else ""
        print(f"| {m} | {t:.4g} | {fwd} | {to} |")


if __name__ == "__main__":
    main()
