"""One meta-gradient through an inner optimiser: amaml beside TorchOpt's unrolled MetaSGD/MetaAdam.

The paper's workload (``_workload.py``: CosMixture, 5 tasks of 100 support + 100 query
points, MLP 2-32-32-1 tanh, 0.5 * MSE), with the inner loop ``N`` steps of SGD with momentum
0.9, Adam, AdamW or RMSprop (torch.optim's defaults) at learning rate ``--lr``. Methods:

    forward       the N optimiser steps of every task without any graph (the floor)
    torchopt      TorchOpt's MetaSGD(momentum=0.9) / MetaAdam / MetaAdamW / MetaRMSProp,
                  unrolled, one backward per task
    store, checkpoint, revolve
                  amaml.adapt(..., optimizer=...) per task, each memory strategy
    store-compiled, revolve-compiled
                  the same with compile=True (the warm-up pays the compilation)

Every (optimiser, method, N) runs in its own subprocess: one warm-up meta-gradient, then
the median of timed repeats (at least one, up to ``--budget`` seconds); peak memory is the
growth of the resident set over one meta-gradient (after the warm-up), as
``amaml.experiments.memory.PeakMemory`` measures it. A row that would exceed ``--max-mb``
(estimated from the smaller N) or ``--max-s`` is skipped and says so. Meta-gradients are
compared with TorchOpt's (relative difference; float32 unless ``--dtype float64``).

    python benchmarks/bench_inner_optimizers.py --N 100 1000 10000 --json opt.json
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

import torch

METHODS = ["forward", "torchopt", "store", "checkpoint", "revolve", "store-compiled",
           "revolve-compiled"]
OPTIMIZERS = ["sgd", "adam", "adamw", "rmsprop"]


def _child(opt_name: str, method: str, n: int, dtype: str, budget: float, lr: float,
           tasks: int) -> dict:
    import torch.nn.functional as F
    from _workload import PeakMemory, make_workload

    import amaml

    torch.set_num_threads(1)
    w = make_workload(n_tasks=tasks, dtype=getattr(torch, dtype))
    model = w.model
    opt = {"sgd": amaml.optim.SGD(momentum=0.9), "adam": amaml.optim.Adam(),
           "adamw": amaml.optim.AdamW(), "rmsprop": amaml.optim.RMSprop()}[opt_name]

    def half_mse(p, t):
        return 0.5 * F.mse_loss(p, t)

    def run_forward() -> None:
        with torch.no_grad():
            for b in range(w.n_tasks):
                amaml.adapt(model, half_mse, (w.xs[b], w.ys[b]), steps=n, lr=lr, optimizer=opt)

    memory, _, compiled = method.partition("-")

    def run_amaml() -> None:
        model.zero_grad(set_to_none=True)
        for b in range(w.n_tasks):
            p = amaml.adapt(model, half_mse, (w.xs[b], w.ys[b]), steps=n, lr=lr, optimizer=opt,
                            memory=memory, compile=bool(compiled))
            (half_mse(amaml.functional_call(model, p, w.xq[b]), w.yq[b]) / w.n_tasks).backward()

    def run_torchopt() -> None:
        import torchopt

        model.zero_grad(set_to_none=True)
        meta = {"sgd": lambda: torchopt.MetaSGD(model, lr=lr, momentum=0.9),
                "adam": lambda: torchopt.MetaAdam(model, lr=lr),
                "adamw": lambda: torchopt.MetaAdamW(model, lr=lr, weight_decay=0.01),
                "rmsprop": lambda: torchopt.MetaRMSProp(model, lr=lr, alpha=0.99, eps=1e-8),
                }[opt_name]()
        for b in range(w.n_tasks):
            net_state = torchopt.extract_state_dict(model)
            opt_state = torchopt.extract_state_dict(meta)
            for _ in range(n):
                meta.step(half_mse(model(w.xs[b]), w.ys[b]))
            (half_mse(model(w.xq[b]), w.yq[b]) / w.n_tasks).backward()
            torchopt.recover_state_dict(model, net_state)
            torchopt.recover_state_dict(meta, opt_state)

    fn = {"forward": run_forward, "torchopt": run_torchopt}.get(method, run_amaml)
    fn()  # warm-up
    with PeakMemory("cpu") as peak:
        t0 = time.perf_counter()
        fn()
        times = [time.perf_counter() - t0]
    while sum(times) < budget and len(times) < 20:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    grad = [] if method == "forward" else torch.cat(
        [p.grad.reshape(-1) for p in model.parameters()]).double().tolist()
    return {"seconds": statistics.median(times), "repeats": len(times),
            "peak_mib": peak.peak_bytes / 2**20, "grad": grad}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--N", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=OPTIMIZERS)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    ap.add_argument("--lr", type=float, default=0.001)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--budget", type=float, default=10.0, help="seconds of repeats a row")
    ap.add_argument("--max-mb", type=float, default=4000.0, help="skip rows estimated above")
    ap.add_argument("--max-s", type=float, default=240.0, help="skip rows estimated slower")
    ap.add_argument("--tasks", type=int, default=5, help="tasks a meta-gradient")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        opt_name, method, n, out = args.child
        res = _child(opt_name, method, int(n), args.dtype, args.budget, args.lr, args.tasks)
        with open(out, "w") as fh:
            json.dump(res, fh)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows: list[dict] = []
    print(f"torch {torch.__version__}, {args.dtype}, lr {args.lr}, {args.tasks} tasks; x fwd = "
          "time / forward-only, x TO = time / TorchOpt (same N, same run)")
    for opt_name in args.optimizers:
        last: dict[str, dict] = {}
        print(f"\n{opt_name}: {'N':>6} {'method':>16} {'seconds':>9} {'x fwd':>7} {'x TO':>7} "
              f"{'peak MiB':>9} {'grad diff':>9}")
        for n in sorted(args.N):
            here: dict[str, dict] = {}
            for method in args.methods:
                prev = last.get(method)
                if prev is not None:
                    scale = n / prev["n"]
                    est_s = prev["seconds"] * scale * (1.3 if "revolve" in method else 1.0)
                    est_mb = prev["peak_mib"] * (scale if method in ("torchopt", "store",
                                                                     "store-compiled") else 1)
                    if est_s > args.max_s or est_mb > args.max_mb:
                        print(f"{'':5} {n:>6} {method:>16}   skipped: estimated {est_s:.0f} s, "
                              f"{est_mb:.0f} MiB")
                        continue
                fd, out = tempfile.mkstemp(suffix=".json")
                os.close(fd)
                cmd = [sys.executable, __file__, "--child", opt_name, method, str(n), out,
                       "--dtype", args.dtype, "--budget", str(args.budget), "--lr",
                       str(args.lr), "--tasks", str(args.tasks)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{'':5} {n:>6} {method:>16}   failed: "
                          f"{proc.stderr.strip().splitlines()[-1:]}")
                    continue
                with open(out) as fh:
                    res = json.load(fh)
                os.remove(out)
                res.update(optimizer=opt_name, method=method, n=n)
                here[method] = last[method] = res
            fwd = here.get("forward", {}).get("seconds")
            to = here.get("torchopt")
            for method, res in here.items():
                diff = ""
                if to is not None and res["grad"] and method != "torchopt":
                    a, b = torch.tensor(res["grad"]), torch.tensor(to["grad"])
                    diff = f"{float((a - b).norm() / b.norm()):.1e}"
                xf = f"{res['seconds'] / fwd:.2f}" if fwd else ""
                xt = f"{res['seconds'] / to['seconds']:.2f}" if to else ""
                print(f"{'':5} {n:>6} {method:>16} {res['seconds']:>9.3f} {xf:>7} {xt:>7} "
                      f"{res['peak_mib']:>9.1f} {diff:>9}")
                rows.append({k: v for k, v in res.items() if k != "grad"})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "dtype": args.dtype, "lr": args.lr,
                       "tasks": args.tasks, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
