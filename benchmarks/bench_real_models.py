#!/usr/bin/env python3
"""Real-size models: time and peak memory of one meta-gradient, measured and predicted.

One task, inner loop ``N`` steps of Adam (lr ``--lr``), cross-entropy, float32, for:

- ``mlp``: an MLP 64-1024-1024-10 with ReLU (1.1M parameters; a kept Adam state, three
  parameter vectors, is 12.9 MB), 64 support and 64 query points;
- ``resnet18``: a CIFAR ResNet-18 written here (3x3 stem, 4 stages of 2 basic blocks of
  widths 64-128-256-512, BatchNorm with batch statistics, global average pool; 11.2M
  parameters, a state 134 MB), ``--images`` 32x32 images per set;
- ``bert``: a BERT encoder from a ``transformers.BertConfig`` (``--bert-layers``,
  hidden 768, 12 heads; sequences of 32 tokens) with a linear head on the first token, when
  ``transformers`` is installed (skipped otherwise).

Rows: ``forward`` (N steps of ``torch.optim.Adam`` on the module, no graph: the floor),
``unrolled`` (``amaml.adapt(adjoint=amaml.Unrolled())``: back-propagation through the N
steps), ``store``, ``checkpoint``, ``revolve`` (20 snapshots) and ``auto`` (the default,
``memory="auto"``); ``--methods budget`` adds ``Budget`` with room for every step's graph.
Each row runs in its own subprocess: a one-step warm-up, then ``--repeats``
meta-gradients; time is the fastest, peak memory the growth of the resident set's
high-water mark over the first (``/proc/self/clear_refs`` resets it; CUDA:
``torch.cuda.max_memory_allocated``). ``pred`` is the peak :func:`amaml.explain` predicts
from step 0 (``docs/memory.md``); a row whose predicted peak exceeds ``--max-mem-gb`` is
skipped, not run. Gradients are compared with the unrolled row where both ran.

    python benchmarks/bench_real_models.py --models mlp --N 10 100 1000
    python benchmarks/bench_real_models.py --models resnet18 --N 10 100 --images 4
    python benchmarks/bench_real_models.py --device cuda --models mlp resnet18 bert --N 10 100 1000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ["forward", "unrolled", "store", "checkpoint", "revolve", "auto"]
EXTRA_METHODS = ["budget"]  # every step's graph kept: Budget with room for all
MODELS = ["mlp", "resnet18", "bert"]


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(c_out)
        self.c2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(c_out)
        self.short = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                       nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(h)) + self.short(x))


class ResNet18(nn.Module):
    """The CIFAR variant of ResNet-18 (He et al. 2016): 11.2M parameters at 10 classes."""

    def __init__(self, classes: int = 10, width: int = 64) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0]),
                                  nn.ReLU())
        blocks, c = [], w[0]
        for i, c_out in enumerate(w):
            for j in range(2):
                blocks.append(BasicBlock(c, c_out, 2 if (i > 0 and j == 0) else 1))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class _Bert(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig(num_hidden_layers=layers, vocab_size=1000,
                         attn_implementation="eager")
        self.encoder = BertModel(cfg, add_pooling_layer=False)
        self.head = nn.Linear(cfg.hidden_size, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids=ids).last_hidden_state[:, 0])


def build(a: argparse.Namespace, dev: str) -> tuple[nn.Module, tuple, tuple]:
    torch.manual_seed(0)
    if a.model == "mlp":
        model: nn.Module = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                                         nn.ReLU(), nn.Linear(1024, 10))
        make = lambda: torch.randn(64, 64)  # noqa: E731
        k = 64
    elif a.model == "resnet18":
        model = ResNet18(width=a.width)
        make = lambda: torch.randn(a.images, 3, 32, 32)  # noqa: E731
        k = a.images
    else:
        model = _Bert(a.bert_layers)
        make = lambda: torch.randint(0, 1000, (a.images, 32))  # noqa: E731
        k = a.images
    support = (make().to(dev), torch.randint(0, 10, (k,)).to(dev))
    query = (make().to(dev), torch.randint(0, 10, (k,)).to(dev))
    return model.to(dev), support, query


def _hwm_reset() -> float:
    """Reset the resident set's high-water mark; return the resident set now (MiB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(key)


def child(a: argparse.Namespace) -> dict:
    import amaml

    if a.tune_allocator:
        amaml.tune_cpu_allocator()

    dev = a.device
    model, (x, y), (xq, yq) = build(a, dev)
    if a.method == "predict":
        text = amaml.explain(model, F.cross_entropy, (x, y), steps=a.n, lr=a.lr,
                             optimizer="adam")
        line = next(t for t in text.splitlines() if t.startswith("predicted peak"))
        peaks = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.e+]+)", line.split(":", 1)[1])}
        choice = next(t for t in text.splitlines() if t.startswith("memory: "))
        return {"pred": peaks, "auto": choice[len("memory: auto: "):].split(":")[0]}

    def meta_gradient(n: int = a.n) -> list[torch.Tensor]:
        if a.method == "forward":
            params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
            names = [n for n, _ in model.named_parameters()]
            opt = torch.optim.Adam(params, lr=a.lr)
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                out = torch.func.functional_call(model, dict(zip(names, params)), (x,))
                F.cross_entropy(out, y).backward()
                opt.step()
            return [p.detach() for p in params]
        special = {"revolve": amaml.Revolve(snapshots=20), "budget": amaml.Budget(1e9)}
        kw = ({"adjoint": amaml.Unrolled()} if a.method == "unrolled"
              else {"memory": special.get(a.method, a.method)})
        p = amaml.adapt(model, F.cross_entropy, (x, y), steps=n, lr=a.lr, optimizer="adam",
                        **kw)
        q = F.cross_entropy(amaml.functional_call(model, p, xq), yq)
        return list(torch.autograd.grad(q, list(model.parameters())))

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    # Warm-up with one step (imports, kernels): a full-length warm-up would leave freed
    # memory in the process that the measured run then reuses unseen.
    meta_gradient(1)
    sync()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _hwm_reset()
    t0 = time.perf_counter()
    grads = meta_gradient()
    sync()
    times = [time.perf_counter() - t0]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else _status("VmHWM"))
    cpu0 = os.times()
    for _ in range(a.repeats - 1):
        if sum(times) > a.max_time:
            break
        t0 = time.perf_counter()
        meta_gradient()
        sync()
        times.append(time.perf_counter() - t0)
    flat = torch.cat([g.reshape(-1) for g in grads]).float().cpu()
    fingerprint = flat[:: max(1, flat.numel() // 4096)].tolist()
    cpu1 = os.times()
    user, system = cpu1.user - cpu0.user, cpu1.system - cpu0.system
    return {"s": min(times), "mib": peak - base, "finite": bool(torch.isfinite(flat).all()),
            "sys_share": system / max(user + system, 1e-9) if len(times) > 1 else None,
            "fingerprint": fingerprint}


def _run(a: argparse.Namespace, model: str, n: int, method: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--n", str(n), "--method",
           method, "--device", a.device, "--lr", str(a.lr), "--images", str(a.images),
           "--width", str(a.width), "--bert-layers", str(a.bert_layers), "--repeats",
           str(a.repeats), "--max-time", str(a.max_time)] + (
               ["--tune-allocator"] if a.tune_allocator else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        why = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        return {"error": why[:200]}
    out: dict = json.loads(lines[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "resnet18"], choices=MODELS)
    ap.add_argument("--N", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + EXTRA_METHODS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--images", type=int, default=4, help="support and query images/sequences")
    ap.add_argument("--width", type=int, default=64, help="ResNet-18's first width")
    ap.add_argument("--bert-layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-time", type=float, default=60.0, help="seconds of repeats per row")
    ap.add_argument("--max-mem-gb", type=float, default=6.0,
                    help="skip rows whose predicted peak is larger")
    ap.add_argument("--tune-allocator", action="store_true",
                    help="call amaml.tune_cpu_allocator() first in each row")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", default="")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.child:
        print(json.dumps(child(a)))
        return
    rows = []
    print(f"{'model':9s} {'N':>5s} {'method':11s} {'s':>8s} {'x fwd':>6s} {'peak MiB':>9s} "
          f"{'pred MiB':>9s} {'meas/pred':>9s}  notes", flush=True)
    for model in a.models:
        if model == "bert":
            try:
                import transformers  # noqa: F401
            except ImportError:
                print("bert: skipped (transformers is not installed)", flush=True)
                continue
        for n in a.N:
            pred = _run(a, model, n, "predict")
            peaks, choice = pred.get("pred", {}), pred.get("auto", pred.get("error", ""))
            fwd = ref = None
            for m in a.methods:
                p_mib = peaks.get("unrolled" if m == "budget" else m)
                row = {"model": model, "N": n, "method": m, "pred_mib": p_mib}
                if p_mib is not None and p_mib > a.max_mem_gb * 1024:
                    row["error"] = f"skipped: predicted {p_mib / 1024:.1f} GiB"
                else:
                    row.update(_run(a, model, n, m))
                notes = row.get("error", "")
                if "s" in row:
                    fp = torch.tensor(row.pop("fingerprint"))
                    if m == "forward":
                        fwd = row["s"]
                    elif m == "unrolled":
                        ref = fp
                    elif ref is not None:
                        err = float((fp - ref).norm() / ref.norm().clamp_min(1e-30))
                        row["err"] = err
                        notes = f"rel err vs unrolled {err:.1e}"
                    if row.get("sys_share") is not None:
                        notes = (notes + "; " if notes else "") + \
                            f"system time {100 * row['sys_share']:.0f}%"
                    if m == "auto":
                        notes = (notes + "; " if notes else "") + choice
                    if not row["finite"]:
                        notes += " NON-FINITE"
                ratio = f"{row['s'] / fwd:6.2f}" if "s" in row and fwd else "     -"
                meas_pred = (f"{row['mib'] / p_mib:9.2f}" if "mib" in row and p_mib
                             else "        -")
                s = f"{row['s']:8.2f}" if "s" in row else "       -"
                mib = f"{row['mib']:9.1f}" if "mib" in row else "        -"
                pm = f"{p_mib:9.1f}" if p_mib is not None else "        -"
                print(f"{model:9s} {n:5d} {m:11s} {s} {ratio} {mib} {pm} {meas_pred}  {notes}",
                      flush=True)
                rows.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
