"""Compile cost with and without the persistent cache, and the per-step saving of compile=True.

Runs itself twice in fresh subprocesses sharing one empty cache folder
(``amaml.compile_cache.enable_compile_cache``): the first process compiles from scratch and
fills the cache, the second loads from it. Each child times its first compiled ``adapt``
meta-gradient (the compilation), then the steady per-inner-step time of eager and compiled
store (thread CPU time, medians). Workload: MLP 2-32-32-1 tanh, 100 support/query points,
0.5 * MSE, lr 0.01, float32, one thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_compile_cache.py [--steps 20] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def child(steps: int, cache: str) -> dict[str, float]:
    from amaml.compile_cache import enable_compile_cache

    enable_compile_cache(cache)
    import torch
    from torch import nn

    import amaml

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                        nn.Linear(32, 1))
    x, xq = torch.rand(100, 2) * 2 - 1, torch.rand(100, 2) * 2 - 1
    y, yq = torch.sin(3 * x).sum(-1, keepdim=True), torch.sin(3 * xq).sum(-1, keepdim=True)

    def mse_half(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((pred - target) ** 2).mean()

    def meta_grad(n: int, compile: bool) -> None:
        net.zero_grad(set_to_none=True)
        p = amaml.adapt(net, mse_half, (x, y), steps=n, lr=0.01, memory="store",
                        compile=compile)
        mse_half(amaml.functional_call(net, p, xq), yq).backward()

    t0 = time.perf_counter()
    meta_grad(steps, True)
    first = time.perf_counter() - t0
    out = {"first_compiled_call_s": first}
    for compile in (False, True):
        meta_grad(steps, compile)
        per = []
        for _ in range(5):
            t0 = time.thread_time()
            meta_grad(200, compile)
            per.append((time.thread_time() - t0) / 200)
        out[f"{'compiled' if compile else 'eager'}_store_s_per_step"] = statistics.median(per)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default="")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.steps, args.child)))
        return
    results = []
    with tempfile.TemporaryDirectory() as cache:
        for label in ("empty cache", "warm cache (second process)"):
            env = dict(os.environ, OMP_NUM_THREADS="1")
            run = subprocess.run([sys.executable, __file__, "--child", cache, "--steps",
                                  str(args.steps)], capture_output=True, text=True, env=env,
                                 check=True)
            res = json.loads(run.stdout.strip().splitlines()[-1])
            res["label"] = label
            results.append(res)
            print(f"{label:28s} first compiled meta-gradient {res['first_compiled_call_s']:.1f} s;"
                  f" per inner step: eager store {1e3 * res['eager_store_s_per_step']:.3f} ms,"
                  f" compiled store {1e3 * res['compiled_store_s_per_step']:.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
