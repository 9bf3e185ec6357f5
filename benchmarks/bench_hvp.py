"""Hessian-vector products of the support loss: which way is fastest here?

On the paper's MLP (2-32-32-1 tanh, 100 support points, flat parameters through
``torch.func.functional_call``, as ``amaml.adapt`` builds them), times one ``H v``:

    double-backward   autograd.grad(grad(L, u, create_graph=True), u, v)  (the core's way:
                      ``amaml.flow.Objective.hvp``)
    fwd-over-rev      torch.func.jvp(torch.func.grad(L), (u,), (v,))
    rev-over-rev      torch.func.vjp(torch.func.grad(L), u)[1](v)
    step-vjp          the core's whole Euler step VJP ``(dPhi/du)^T lam`` (for reference)

on a hand-written MSE loss (``((pred - y) ** 2).mean()``: forward-over-reverse fails on
``F.mse_loss`` in torch 2.13 with "ZeroTensors are immutable", which is also tried and
reported). All variants are checked against each other before timing. Methods are
interleaved; medians of ``--repeats`` rounds of ``--inner`` calls are reported.

Usage::

    python benchmarks/bench_hvp.py [--device cuda] [--out benchmarks/results/hvp.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _workload import machine_info, make_workload, sync, timed
from torch import Tensor

from amaml.flow import Euler, FlowContext, FlowSpec, Objective, Reads


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (median reported)")
    p.add_argument("--inner", type=int, default=20, help="calls per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/hvp.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    wl = make_workload(1, 100, 100, args.seed, args.device, dtype)
    model, x, y = wl.model, wl.xs[0], wl.ys[0]
    names = [n for n, _ in model.named_parameters()]
    shapes = [q.shape for q in model.parameters()]
    sizes = [q.numel() for q in model.parameters()]
    u0 = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    v = torch.randn(u0.shape, generator=torch.Generator().manual_seed(1)).to(u0)

    def unflatten(u: Tensor) -> dict[str, Tensor]:
        return {n: t.reshape(s) for n, t, s in zip(names, u.split(sizes), shapes, strict=True)}

    def manual_mse(u: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        return ((torch.func.functional_call(model, unflatten(u), (xb,)) - yb) ** 2).mean()

    def torch_mse(u: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        return F.mse_loss(torch.func.functional_call(model, unflatten(u), (xb,)), yb)

    objective = Objective(manual_mse)
    spec = FlowSpec(objective, Euler(), 1, n_data=2)
    eta = torch.tensor(1.0, dtype=dtype, device=args.device)

    def double_backward() -> Tensor:
        return objective.hessian(u0, (x, y))(v)

    def fwd_over_rev(loss: Callable[..., Tensor] = manual_mse) -> Tensor:
        return torch.func.jvp(lambda u: torch.func.grad(loss)(u, x, y), (u0,), (v,))[1]

    def rev_over_rev() -> Tensor:
        return torch.func.vjp(lambda u: torch.func.grad(manual_mse)(u, x, y), u0)[1](v)[0]

    flow = FlowContext(spec, Reads(u0, eta, None, (x, y)), (True, False, False, False, False))

    def step_vjp() -> Tensor:
        # Euler with eta = 1: (dPhi/du)^T v = v - H v.
        return v - flow.vjp(u0, v, k=0)

    fns: dict[str, Callable[[], Tensor]] = {
        "double-backward": double_backward,
        "fwd-over-rev": fwd_over_rev,
        "rev-over-rev": rev_over_rev,
        "step-vjp": step_vjp,
    }
    ref = double_backward()
    agree = {k: float((f() - ref).abs().max() / ref.abs().max()) for k, f in fns.items()}
    try:
        fwd_over_rev(torch_mse)
        mse_note = "forward-over-reverse works on F.mse_loss"
    except RuntimeError as err:
        mse_note = f"forward-over-reverse fails on F.mse_loss: {str(err).splitlines()[0]}"

    samples: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(3):
            f()
    for r in range(args.repeats):
        order = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]
        for k in order:
            def rounds(f: Callable[[], Tensor] = fns[k]) -> None:
                for _ in range(args.inner):
                    f()
            samples[k].append(timed(rounds, args.device) / args.inner)
    sync(args.device)
    med = {k: statistics.median(s) for k, s in samples.items()}
    fastest = min((k for k in med if k != "step-vjp"), key=med.__getitem__)
    print(f"H v on the paper's MLP ({u0.numel()} parameters, {x.shape[0]} points, "
          f"{args.dtype}, {args.device}, {torch.get_num_threads()} thread(s)):")
    print("| method | median per call | vs double-backward | max rel. diff |")
    print("|---|---|---|---|")
    for k in fns:
        print(f"| {k} | {med[k] * 1e6:.0f} us | {med[k] / med['double-backward']:.2f}x "
              f"| {agree[k]:.1e} |")
    print(f"fastest HVP: {fastest}; the core uses double-backward "
          f"({'the fastest' if fastest == 'double-backward' else 'NOT the fastest'}).")
    print(mse_note)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "hvp",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(args.device),
        "config": vars(args),
        "median_s": med,
        "samples_s": samples,
        "max_rel_diff": agree,
        "fastest": fastest,
        "mse_loss_note": mse_note,
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
