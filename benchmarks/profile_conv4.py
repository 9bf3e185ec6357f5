#!/usr/bin/env python3
"""Where the time of a Conv-4 meta-gradient goes: the passes each method makes per step.

MAML's Omniglot network (4 x [3x3 conv, BatchNorm with batch statistics, ReLU, 2x2
max-pool], linear to 5 logits; width 64, 28x28, 5-way 1-shot support), float32, one thread.
Measures, for one task and one inner step:

    F+B      forward and gradient, no graph (a forward-sweep step of amaml)
    F+B1     forward and gradient with its graph kept (a step of unrolled MAML)
    B2       the backward pass through that graph (unrolling's backward, per step)
    jvp      forward-over-reverse H v (torch.func.jvp of torch.func.grad) instead of B2

and the methods' costs per step composed from them (what each computes), beside the
batched forms of one step's gradient for B tasks: a loop over tasks, vmap, and the tasks
folded into channels (amaml.folded). `python benchmarks/profile_conv4.py [--tasks 4]`.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn


def conv4(width: int) -> nn.Module:
    layers, c = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(c, width, 3, padding=1),
                   nn.BatchNorm2d(width, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
        c = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width, 5))


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = conv4(a.width)
    names = [n for n, _ in model.named_parameters()]
    x, y = torch.randn(5, 1, 28, 28), torch.arange(5)
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]

    def loss(ps, xb=x, yb=y):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ps)), (xb,)), yb)

    def fb():
        torch.autograd.grad(loss(params), params)

    def fb1():
        return torch.autograd.grad(loss(params), params, create_graph=True)

    def fb1b2():
        g = fb1()
        torch.autograd.grad(g, params, [torch.ones_like(t) for t in g])

    def jvp():
        prm = {n: p.detach() for n, p in zip(names, params)}
        tangent = {n: torch.ones_like(p) for n, p in prm.items()}
        grad = torch.func.grad(lambda q: F.cross_entropy(
            torch.func.functional_call(model, q, (x,)), y))
        torch.func.jvp(grad, (prm,), (tangent,))

    t_fb, t_fb1, t_all, t_jvp = (timed(f, a.repeats) for f in (fb, fb1, fb1b2, jvp))
    b2 = t_all - t_fb1
    print(f"one step, one task (ms): F+B {t_fb:.1f}   F+B1 {t_fb1:.1f}   B2 {b2:.1f}   "
          f"F+B1+B2 (a step VJP by double backward) {t_all:.1f}   "
          f"forward-over-reverse F+B+jvp {t_jvp:.1f}")
    unrolled = t_fb1 + b2
    rows = [
        ("unrolled MAML / Budget with room for every step", "F+B1, B2", t_fb1 + b2),
        ("store", "F+B, F+B1+B2", t_fb + t_all),
        ("checkpoint, graphs not kept (before)", "F+B, F+B, F+B1+B2", 2 * t_fb + t_all),
        ("checkpoint, a segment's graphs kept (now)", "F+B, F+B1, B2", t_fb + t_fb1 + b2),
        ("store with forward-over-reverse H v", "F+B, F+B+jvp", t_fb + t_jvp),
    ]
    print("\nper step, composed from the passes (x unrolled):")
    for name, passes, ms in rows:
        print(f"  {name:50s} {passes:18s} {ms:6.1f} ms  {ms / unrolled:4.2f}x")

    tasks = a.tasks
    xs, ys = torch.randn(tasks, 5, 1, 28, 28), torch.arange(5).repeat(tasks, 1)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    ub = flat.repeat(tasks, 1).requires_grad_()
    from amaml.folded import folded_plan
    from amaml.params import FlatModel

    fm = FlatModel(model)

    def single(u, xb, yb):
        return F.cross_entropy(torch.func.functional_call(model, fm.unflatten(u), (xb,)), yb)

    folded, why = folded_plan(fm, F.cross_entropy, xs, single, lambda d: (d[0], d[1]), "batch")
    assert folded is not None, why
    vm = torch.func.vmap(single)

    def step(total_fn, double: bool):
        def run():
            u = ub.detach().requires_grad_()
            (g,) = torch.autograd.grad(total_fn(u), u, create_graph=double)
            if double:
                torch.autograd.grad(g, u, torch.ones_like(g))
        return run

    def loop_total(u):
        return sum(single(u[b], xs[b], ys[b]) for b in range(tasks))

    print(f"\none step for {tasks} tasks (ms): gradient / step VJP (double backward)")
    for name, fn in [("loop over tasks, one graph", loop_total),
                     ("torch.func.vmap", lambda u: vm(u, xs, ys).sum()),
                     ("tasks folded into channels",
                      lambda u: folded.per_task_batched(u, xs, ys).sum())]:
        print(f"  {name:30s} {timed(step(fn, False), a.repeats):7.1f} / "
              f"{timed(step(fn, True), a.repeats):7.1f}")

    def separate(double: bool):
        def run():
            for b in range(tasks):
                u = flat.detach().requires_grad_()
                (g,) = torch.autograd.grad(single(u, xs[b], ys[b]), u, create_graph=double)
                if double:
                    torch.autograd.grad(g, u, torch.ones_like(g))
        return run

    print(f"  {'separate tasks (as adapt each)':30s} {timed(separate(False), a.repeats):7.1f} / "
          f"{timed(separate(True), a.repeats):7.1f}")


if __name__ == "__main__":
    main()
