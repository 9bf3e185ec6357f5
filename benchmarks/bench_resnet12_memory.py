#!/usr/bin/env python3
"""Where unrolled MAML runs out of memory and A-MAML does not: ResNet-12 on 84x84 images.

One task of 5-way 1-shot classification with 15 queries per class on ResNet-12 (4 residual
blocks of 3 x [3x3 conv, BatchNorm with batch statistics, LeakyReLU 0.1] with a 1x1
convolution shortcut, 2x2 max-pool after each; widths 64, 160, 320, 640; global average
pool; linear to 5 logits), inner SGD step 0.01. For each N: unrolled MAML (plain autograd
through N steps with create_graph) and ``amaml.adapt`` (checkpoint, and revolve), one
meta-gradient each, peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak RSS
growth in a subprocess) and time; an out-of-memory error is a row of its own. Gradients
are compared with unrolled where both ran.

    python benchmarks/bench_resnet12_memory.py --device cuda --N 1 5 10 20 40 80 160
    python benchmarks/bench_resnet12_memory.py --device cpu --scale 0.125 --image 20 --N 1 2

``--scale`` multiplies the widths, ``--image`` sets the side (a quick CPU check of the
script). ``--json FILE`` keeps the rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.c2, self.b2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.c3, self.b3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.cs, self.bs = nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)

    def forward(self, x):
        h = F.leaky_relu(self.b1(self.c1(x)), 0.1)
        h = F.leaky_relu(self.b2(self.c2(h)), 0.1)
        h = self.b3(self.c3(h))
        return F.max_pool2d(F.leaky_relu(h + self.bs(self.cs(x)), 0.1), 2)


class ResNet12(nn.Module):
    def __init__(self, scale: float = 1.0, ways: int = 5) -> None:
        super().__init__()
        widths = [max(1, round(w * scale)) for w in (64, 160, 320, 640)]
        chans = [3, *widths]
        self.blocks = nn.Sequential(*(Block(a, b) for a, b in zip(chans, chans[1:])))
        self.head = nn.Linear(widths[-1], ways)

    def forward(self, x):
        return self.head(self.blocks(x).mean((2, 3)))


def _peak(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def child(a: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    dev = a.device
    model = ResNet12(a.scale).to(dev)
    x = torch.randn(5, 3, a.image, a.image, device=dev)
    y = torch.arange(5, device=dev)
    xq = torch.randn(75, 3, a.image, a.image, device=dev)
    yq = torch.arange(5, device=dev).repeat_interleave(15)
    names = [n for n, _ in model.named_parameters()]
    import amaml

    def unrolled():
        u = list(model.parameters())
        for _ in range(a.n):
            out = amaml.functional_call(model, dict(zip(names, u)), x)
            g = torch.autograd.grad(F.cross_entropy(out, y), u, create_graph=True)
            u = [p - a.lr * d for p, d in zip(u, g)]
        q = F.cross_entropy(amaml.functional_call(model, dict(zip(names, u)), xq), yq)
        return torch.autograd.grad(q, list(model.parameters()))

    def adjoint(memory):
        def run():
            p = amaml.adapt(model, F.cross_entropy, (x, y), steps=a.n, lr=a.lr, memory=memory)
            q = F.cross_entropy(amaml.functional_call(model, p, xq), yq)
            return torch.autograd.grad(q, list(model.parameters()))
        return run

    fn = {"unrolled": unrolled, "checkpoint": adjoint("checkpoint"),
          "revolve": adjoint("revolve")}[a.method]
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _peak(dev)
    t0 = time.perf_counter()
    try:
        grads = fn()
    except torch.OutOfMemoryError:
        return {"oom": True}
    if dev == "cuda":
        torch.cuda.synchronize()
    flat = torch.cat([g.reshape(-1) for g in grads]).cpu()
    torch.save(flat, a.grad_out)
    return {"oom": False, "s": time.perf_counter() - t0, "mib": _peak(dev) - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, nargs="+", default=[1, 5, 10, 20, 40, 80])
    ap.add_argument("--methods", nargs="+", default=["unrolled", "checkpoint", "revolve"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--image", type=int, default=84)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", default="")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--grad-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.child:
        print(json.dumps(child(a)))
        return
    rows = []
    import tempfile

    tmp = tempfile.mkdtemp()
    for n in a.N:
        ref = None
        for m in a.methods:
            out = f"{tmp}/{m}-{n}.pt"
            cmd = [sys.executable, __file__, "--child", "--method", m, "--n", str(n),
                   "--device", a.device, "--scale", str(a.scale), "--image", str(a.image),
                   "--lr", str(a.lr), "--grad-out", out]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            except subprocess.TimeoutExpired:
                rows.append({"N": n, "method": m, "result": "timeout"})
                print(f"N={n:5d} {m:10s} timeout", flush=True)
                continue
            lines = p.stdout.strip().splitlines()
            if p.returncode not in (0, -9):  # -9: killed by the kernel for memory
                why = (p.stderr.strip().splitlines() or [str(p.returncode)])[-1]
                rows.append({"N": n, "method": m, "result": f"failed: {why}"})
                print(f"N={n:5d} {m:10s} failed: {why}", flush=True)
                continue
            r = json.loads(lines[-1]) if p.returncode == 0 and lines else {"oom": True}
            if r.get("oom"):  # CUDA out of memory, or the process killed for memory
                rows.append({"N": n, "method": m, "result": "out of memory"})
                print(f"N={n:5d} {m:10s} out of memory", flush=True)
                continue
            g = torch.load(out)
            err = ""
            if m == "unrolled":
                ref = g
            elif ref is not None:
                err = f"rel err vs unrolled {float((g - ref).norm() / ref.norm()):.1e}"
            rows.append({"N": n, "method": m, "s": r["s"], "mib": r["mib"], "err": err})
            print(f"N={n:5d} {m:10s} {r['s']:8.2f} s  peak +{r['mib']:9.1f} MiB  {err}", flush=True)
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
