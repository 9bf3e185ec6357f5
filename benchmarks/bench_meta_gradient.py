"""Time and peak memory of one meta-gradient against the number of inner steps.

The paper's workload (CosMixture, MLP 2-32-32-1 tanh, 100 support + 100 query
points, meta-batch 5, inner lr 0.01): for each number of inner steps ``N`` and each
method, the median wall-clock time of one meta-gradient and its peak memory growth,
both also as a ratio to forward-only adaptation at the same ``N``.

Methods:
    forward      N plain gradient-descent steps per task, no graph (the reference:
                 module forward, ``autograd.grad``, in-place ``_foreach_add_``).
    store        ``amaml.adapt(memory="store")`` + query loss + ``backward()``.
    checkpoint   ``amaml.adapt(memory="checkpoint")`` (the default).
    revolve      ``amaml.adapt(memory="revolve")``: binomial checkpointing, 20 snapshots.
    backsolve    ``amaml.adapt(memory="backsolve")``; ``BacksolveError`` is recorded
                 as "unstable" (expected on long horizons).
    unrolled     ``amaml.adapt(adjoint=amaml.Unrolled())``: second-order MAML.
    batch        ``amaml.adapt_batch`` on the whole meta-batch (checkpoint memory).
    *+compile    the same with ``compile=True`` (steps and their VJPs compiled with
                 ``torch.compile``); ``forward+compile`` is the plain loop with each
                 gradient step compiled, for context (the reference stays ``forward``).
    *+cudagraphs ``compile="reduce-overhead"`` (CUDA graphs; store, checkpoint, batch):
                 not run by default, for GPUs (``--methods`` names them).

Per-task methods back-propagate each task's query loss in turn (gradients
accumulate in ``.grad``), as a meta-training loop would; ``batch`` holds the whole
meta-batch at once.

Timing runs in this process with the methods interleaved (the order rotates each
round) and reports medians; each memory figure comes from a fresh subprocess that
warms up at N = 2 and then measures one meta-gradient (CPU: peak RSS growth; CUDA:
``torch.cuda.max_memory_allocated``). Where a round at some N would exceed
``--budget`` seconds, the subprocess's own timing is the only sample. A method whose
time, extrapolated linearly from the previous N, would exceed ``--time-cap`` seconds
is skipped at that N (marked "skipped").

Also: ``adapt_batch`` for ``--compare-tasks`` tasks against as many separate
``adapt`` calls, at ``--compare-steps`` steps (time ratio).

Usage::

    python benchmarks/bench_meta_gradient.py                       # full run
    python benchmarks/bench_meta_gradient.py --n-steps 1 10 100    # quick
    python benchmarks/bench_meta_gradient.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _workload import PeakMemory, Workload, machine_info, make_workload, sync, timed

import amaml

METHODS = ("forward", "store", "checkpoint", "revolve", "backsolve", "unrolled", "batch",
           "forward+compile", "store+compile", "checkpoint+compile", "revolve+compile",
           "batch+compile")
#: Not run by default: CUDA graphs (``compile="reduce-overhead"``) only pay on a GPU.
EXTRA = ("forward-fcall", "store+cudagraphs", "checkpoint+cudagraphs", "batch+cudagraphs")
REFERENCE = "forward"
MIB = 2.0**20


# ----------------------------------------------------------------------------- methods


def _forward_only(wl: Workload, n_steps: int, lr: float) -> Callable[[], None]:
    """A competent plain inner loop: no graph kept, parameters updated in place."""
    work = [p.detach().clone().requires_grad_(True) for p in wl.model.parameters()]
    names = [n for n, _ in wl.model.named_parameters()]
    theta = [p.detach() for p in wl.model.parameters()]

    def run() -> None:
        for b in range(wl.n_tasks):
            with torch.no_grad():
                torch._foreach_copy_(work, theta)
            params = dict(zip(names, work, strict=True))
            x, y = wl.xs[b], wl.ys[b]
            for _ in range(n_steps):
                loss = F.mse_loss(torch.func.functional_call(wl.model, params, (x,)), y)
                grads = torch.autograd.grad(loss, work)
                with torch.no_grad():
                    torch._foreach_add_(work, grads, alpha=-lr)
            with torch.no_grad():
                F.mse_loss(torch.func.functional_call(wl.model, params, (wl.xq[b],)), wl.yq[b])

    return run


def _forward_only_module(wl: Workload, n_steps: int, lr: float) -> Callable[[], None]:
    """The same loop on a module copy (no functional_call): the cheapest plain loop."""
    import copy

    work_model = copy.deepcopy(wl.model)
    work = list(work_model.parameters())
    theta = [p.detach() for p in wl.model.parameters()]

    def run() -> None:
        for b in range(wl.n_tasks):
            with torch.no_grad():
                torch._foreach_copy_(work, theta)
            x, y = wl.xs[b], wl.ys[b]
            for _ in range(n_steps):
                grads = torch.autograd.grad(F.mse_loss(work_model(x), y), work)
                with torch.no_grad():
                    torch._foreach_add_(work, grads, alpha=-lr)
            with torch.no_grad():
                F.mse_loss(work_model(wl.xq[b]), wl.yq[b])

    return run


def _forward_only_compiled(wl: Workload, n_steps: int, lr: float) -> Callable[[], None]:
    """The plain loop with each gradient step compiled (context for the compiled methods)."""
    names = [n for n, _ in wl.model.named_parameters()]
    theta = {n: p.detach() for n, p in wl.model.named_parameters()}

    def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(torch.func.functional_call(wl.model, params, (x,)), y)

    grad = torch.func.grad(loss)

    def gd_step(params: dict[str, torch.Tensor], x: torch.Tensor,
                y: torch.Tensor) -> dict[str, torch.Tensor]:
        g = grad(params, x, y)
        return {n: params[n] - lr * g[n] for n in names}

    step = torch.compile(gd_step, dynamic=False)

    def run() -> None:
        with torch.no_grad():
            for b in range(wl.n_tasks):
                params = dict(theta)
                for _ in range(n_steps):
                    params = step(params, wl.xs[b], wl.ys[b])
                loss(params, wl.xq[b], wl.yq[b])

    return run


def _per_task(wl: Workload, n_steps: int, lr: float, **kw: object) -> Callable[[], None]:
    model = wl.model

    def run() -> None:
        model.zero_grad(set_to_none=True)
        for b in range(wl.n_tasks):
            params = amaml.adapt(model, F.mse_loss, (wl.xs[b], wl.ys[b]), steps=n_steps,
                                 lr=lr, **kw)  # type: ignore[arg-type]
            F.mse_loss(torch.func.functional_call(model, params, (wl.xq[b],)),
                       wl.yq[b]).backward()

    return run


def _batched(wl: Workload, n_steps: int, lr: float, **kw: object) -> Callable[[], None]:
    model = wl.model

    def run() -> None:
        model.zero_grad(set_to_none=True)
        params = amaml.adapt_batch(model, F.mse_loss, (wl.xs, wl.ys), steps=n_steps, lr=lr,
                                   **kw)  # type: ignore[arg-type]
        # Sum of per-task mean losses, as the per-task methods accumulate.
        pred = amaml.functional_call_batch(model, params, wl.xq)
        ((pred - wl.yq) ** 2).mean(dim=(1, 2)).sum().backward()

    return run


def make_method(name: str, wl: Workload, n_steps: int, lr: float) -> Callable[[], None]:
    """One meta-gradient (or, for ``forward``, one plain adaptation) of the meta-batch."""
    if name == "forward":
        return _forward_only_module(wl, n_steps, lr)
    if name == "forward-fcall":
        return _forward_only(wl, n_steps, lr)
    if name == "forward+compile":
        return _forward_only_compiled(wl, n_steps, lr)
    if name in ("store+compile", "checkpoint+compile", "revolve+compile"):
        return _per_task(wl, n_steps, lr, memory=name.split("+")[0], compile=True)
    if name == "batch+compile":
        return _batched(wl, n_steps, lr, memory="checkpoint", compile=True)
    if name in ("store+cudagraphs", "checkpoint+cudagraphs"):
        return _per_task(wl, n_steps, lr, memory=name.split("+")[0],
                         compile="reduce-overhead")
    if name == "batch+cudagraphs":
        return _batched(wl, n_steps, lr, memory="checkpoint", compile="reduce-overhead")
    if name in ("store", "checkpoint", "revolve", "backsolve"):
        return _per_task(wl, n_steps, lr, memory=name)
    if name == "unrolled":
        return _per_task(wl, n_steps, lr, adjoint=amaml.Unrolled())
    if name == "batch":
        return _batched(wl, n_steps, lr, memory="checkpoint")
    raise ValueError(f"Unknown method {name!r}; expected one of {METHODS + EXTRA}.")


def run_guarded(fn: Callable[[], None]) -> str:
    """Run ``fn``; ``"ok"``, or ``"unstable"`` when backsolve refuses its gradient."""
    try:
        fn()
    except amaml.flow.BacksolveError:
        return "unstable"
    return "ok"


# ----------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> None:
    """One configuration in a fresh process: warm up, then memory and time of one run."""
    torch.set_num_threads(args.threads)
    wl = make_workload(args.tasks, args.shots, args.queries, args.seed, args.device)
    run_guarded(make_method(args.method, wl, 2, args.lr))
    fn = make_method(args.method, wl, args.worker_steps, args.lr)
    status = "ok"
    with PeakMemory(args.device) as mem:
        t0 = time.perf_counter()
        status = run_guarded(fn)
        sync(args.device)
        seconds = time.perf_counter() - t0
    print(json.dumps({"peak_bytes": mem.peak_bytes, "seconds": seconds, "status": status,
                      "memory_method": mem.method}))


def measure_memory(args: argparse.Namespace, method: str, n_steps: int) -> dict[str, object]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--method", method,
           "--worker-steps", str(n_steps)] + _common_flags(args)
    env = dict(os.environ)
    # A fixed threshold (it is otherwise raised on each free) sends every large
    # buffer to mmap, so freed tensors leave the resident set and the high-water
    # mark counts what one run really holds at once.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"status": f"error: {tail[0]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _common_flags(args: argparse.Namespace) -> list[str]:
    return ["--tasks", str(args.tasks), "--shots", str(args.shots), "--queries",
            str(args.queries), "--lr", str(args.lr), "--seed", str(args.seed), "--device",
            args.device, "--threads", str(args.threads)]


# ----------------------------------------------------------------------------- driver


def _fmt(value: float | None, ratio: float | None, unit: str) -> str:
    if value is None:
        return "-"
    text = f"{value:.3g} {unit}"
    return text + (f" ({ratio:.2f}x)" if ratio is not None else "")


def print_tables(records: list[dict[str, object]], methods: list[str], ns: list[int]) -> str:
    lines = []
    for key, unit, title in (("time_s", "s", "time per meta-gradient (median)"),
                             ("peak_mib", "MiB", "peak memory growth")):
        lines.append(f"\n{title}; ratio to {REFERENCE} at the same N")
        header = "| N | " + " | ".join(methods) + " |"
        lines += [header, "|" + "---|" * (len(methods) + 1)]
        for n in ns:
            cells = []
            for m in methods:
                rec = next((r for r in records if r["method"] == m and r["n_steps"] == n), None)
                if rec is None:
                    cells.append("-")
                elif rec["status"] != "ok":
                    cells.append(str(rec["status"]))
                else:
                    cells.append(_fmt(rec.get(key), rec.get(key.split("_")[0] + "_ratio"), unit))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def compare_batch(args: argparse.Namespace) -> dict[str, object]:
    """``adapt_batch`` on B tasks against B separate ``adapt`` calls (meta-gradients)."""
    wl = make_workload(args.compare_tasks, args.shots, args.queries, args.seed + 1, args.device)
    n = args.compare_steps
    fns = {"separate": _per_task(wl, n, args.lr, memory="checkpoint"),
           "batch": _batched(wl, n, args.lr, memory="checkpoint"),
           "separate+compile": _per_task(wl, n, args.lr, memory="checkpoint", compile=True),
           "batch+compile": _batched(wl, n, args.lr, memory="checkpoint", compile=True)}
    for fn in fns.values():
        _per_task(wl, 2, args.lr)()
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(args.repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            times[k].append(timed(fns[k], args.device))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"tasks": args.compare_tasks, "n_steps": n, "separate_s": med["separate"],
           "batch_s": med["batch"], "speedup": med["separate"] / med["batch"],
           "separate_compiled_s": med["separate+compile"],
           "batch_compiled_s": med["batch+compile"],
           "speedup_compiled": med["separate+compile"] / med["batch+compile"],
           "speedup_batch_compiled_vs_separate": med["separate"] / med["batch+compile"],
           "samples": times}
    print(f"\nadapt_batch, {args.compare_tasks} tasks, N={n}: {med['batch']:.3g} s; "
          f"{args.compare_tasks} separate adapt calls: {med['separate']:.3g} s; "
          f"speed-up {out['speedup']:.1f}x", flush=True)
    print(f"compiled: adapt_batch {med['batch+compile']:.3g} s; separate "
          f"{med['separate+compile']:.3g} s; speed-up {out['speedup_compiled']:.1f}x "
          f"({out['speedup_batch_compiled_vs_separate']:.1f}x against separate eager calls)",
          flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-steps", type=int, nargs="+", default=[1, 10, 100, 1000, 10000],
                   help="numbers of inner steps N")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   choices=[*METHODS, *EXTRA])
    p.add_argument("--tasks", type=int, default=5, help="meta-batch size")
    p.add_argument("--shots", type=int, default=100, help="support points per task")
    p.add_argument("--queries", type=int, default=100, help="query points per task")
    p.add_argument("--lr", type=float, default=0.01, help="inner learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: shared CPUs make more threads unreliable)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per N (at most)")
    p.add_argument("--budget", type=float, default=120.0,
                   help="seconds of timed rounds per N; fewer rounds when one is longer")
    p.add_argument("--time-cap", type=float, default=300.0,
                   help="skip a method at N when its extrapolated time exceeds this (s)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--compare-tasks", type=int, default=25)
    p.add_argument("--compare-steps", type=int, default=100)
    p.add_argument("--no-compare", action="store_true", help="skip the batch comparison")
    p.add_argument("--out", default="benchmarks/results/meta_gradient.json",
                   help="JSON output path")
    p.add_argument("--plot", default="benchmarks/results/meta_gradient.png",
                   help="PNG output path ('' for none)")
    p.add_argument("--replot", nargs="+", metavar="JSON",
                   help="only redraw --plot from saved result files (merged)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--worker-steps", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.replot:
        replot(args.replot, Path(args.plot))
        return

    torch.set_num_threads(args.threads)
    methods = [REFERENCE] + [m for m in args.methods if m != REFERENCE]
    ns = sorted(set(args.n_steps))
    wl = make_workload(args.tasks, args.shots, args.queries, args.seed, args.device)
    for m in methods:  # warm-up: kernels, vmap caches, allocator
        run_guarded(make_method(m, wl, 2, args.lr))
    records: list[dict[str, object]] = []
    last: dict[str, tuple[int, float]] = {}
    unstable: set[str] = set()  # a longer horizon is no more stable: not run again
    for n in ns:
        active, skipped = [], []
        for m in methods:
            est = last[m][1] * n / last[m][0] if m in last else 0.0
            (skipped if m != REFERENCE and (est > args.time_cap or m in unstable)
             else active).append(m)
        fns = {m: make_method(m, wl, n, args.lr) for m in active}
        status = {m: "ok" for m in active}
        samples: dict[str, list[float]] = {m: [] for m in active}
        mem: dict[str, dict[str, object]] = {}
        if not args.no_memory:
            for m in active:
                mem[m] = measure_memory(args, m, n)
                if mem[m].get("status") != "ok":
                    status[m] = str(mem[m].get("status"))
        est_round = sum(float(mem[m].get("seconds", 0.0)) for m in mem) or sum(
            last[m][1] * n / last[m][0] for m in active if m in last)
        rounds = args.repeats if est_round <= 0 else int(min(args.repeats,
                                                             args.budget // est_round))
        if rounds == 0 and not mem:
            rounds = 1
        if est_round < 1.0:  # cheap: one untimed pass more, in this process
            for m in active:
                run_guarded(fns[m])
        for r in range(rounds):
            shift = r % len(active)
            for m in active[shift:] + active[:shift]:
                if status[m] != "ok":
                    continue
                t = timed(lambda m=m, fn=fns[m], st=status: st.__setitem__(m, run_guarded(fn)),
                          args.device)
                if status[m] == "ok":
                    samples[m].append(t)
        for m in active:
            if not samples[m] and mem.get(m, {}).get("status") == "ok":
                samples[m].append(float(mem[m]["seconds"]))  # the subprocess's run
        for m in methods:
            rec: dict[str, object] = {"method": m, "n_steps": n}
            if m in skipped:
                rec["status"] = "unstable (at smaller N)" if m in unstable else "skipped (time cap)"
            else:
                rec["status"] = status[m]
                if status[m] == "unstable":
                    unstable.add(m)
                rec["samples_s"] = samples[m]
                if samples[m] and status[m] == "ok":
                    rec["time_s"] = statistics.median(samples[m])
                    last[m] = (n, float(rec["time_s"]))
                if m in mem and "peak_bytes" in mem[m]:
                    rec["peak_mib"] = float(mem[m]["peak_bytes"]) / MIB  # type: ignore[arg-type]
                    rec["memory_method"] = mem[m].get("memory_method")
            records.append(rec)
        ref = next(r for r in records if r["method"] == REFERENCE and r["n_steps"] == n)
        for rec in records:
            if rec["n_steps"] != n:
                continue
            for key in ("time", "peak"):
                v, v0 = rec.get(f"{key}_{'s' if key == 'time' else 'mib'}"), ref.get(
                    f"{key}_{'s' if key == 'time' else 'mib'}")
                if isinstance(v, float) and isinstance(v0, float) and v0 > 0:
                    rec[f"{key}_ratio"] = v / v0
        print(f"N={n}: " + ", ".join(
            f"{r['method']} {r.get('time_s', r['status'])}" for r in records
            if r["n_steps"] == n), flush=True)

    table = print_tables(records, methods, ns)
    result: dict[str, object] = {
        "benchmark": "meta_gradient",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(args.device),
        "config": {k: v for k, v in vars(args).items()
                   if k not in ("worker", "method", "worker_steps")},
        "reference": REFERENCE,
        "records": records,
        "table": table,
    }
    if not args.no_compare:
        result["batch_compare"] = compare_batch(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    if args.plot:
        plot(records, methods, Path(args.plot))
        print(f"wrote {args.plot}")


_COLOURS = {"forward": "black", "store": "tab:orange", "checkpoint": "tab:green",
            "revolve": "tab:olive", "backsolve": "tab:red", "unrolled": "tab:purple",
            "batch": "tab:blue"}


def plot(records: list[dict[str, object]], methods: list[str], path: Path) -> None:
    """Time and memory against N, log-log, one line per method (the paper's figure).

    A method keeps its colour in both panels; its ``+compile`` variant is dashed.
    Zero memory growth (below what RSS resolves) cannot be drawn on a log axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "time_s", "seconds per meta-gradient"),
                           (axes[1], "peak_mib", "peak memory growth (MiB)")):
        for m in methods:
            pts = [(r["n_steps"], r[key]) for r in records
                   if r["method"] == m and r.get("status") == "ok" and r.get(key)]
            base = m.split("+")[0]
            if pts:
                xs, ys = zip(*pts, strict=True)
                style = {"compile": "--", "cudagraphs": ":"}.get(m.partition("+")[2], "-")
                ax.plot(xs, ys, marker="o", label=m, color=_COLOURS.get(base), linestyle=style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("inner steps N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(files: list[str], path: Path) -> None:
    """Redraw the figure from saved JSON results (records merged; the first file wins)."""
    records: list[dict[str, object]] = []
    seen: set[tuple[object, object]] = set()
    methods: list[str] = []
    for f in files:
        for r in json.loads(Path(f).read_text())["records"]:
            k = (r["method"], r["n_steps"])
            if k not in seen:
                seen.add(k)
                records.append(r)
                if r["method"] not in methods:
                    methods.append(str(r["method"]))
    plot(records, methods, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
