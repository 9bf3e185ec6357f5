"""Peak memory and time of one meta-gradient on Omniglot's minimal background, against N.

The setting of docs/classification.md's Omniglot runs: Conv-4 (width 64, BatchNorm on
batch statistics), 20-way 1-shot, 1 query per class, meta-batch 4, inner lr 0.1, float32,
one thread. For each method and inner step count N, one meta-gradient of one fixed
meta-batch is measured after a warm-up (CPU: peak resident-set growth in a forked child,
:func:`amaml.experiments.memory.peak_memory_mib`), and timed in this process (median of
``--repeats``). MAML unrolls all N steps; A-MAML uses ``--memory`` (default checkpoint).
A method is not run at an N where the straight line through its last two figures
predicts more than ``--max-mb``.

    python benchmarks/bench_omniglot_memory.py --data-dir ../shared/data/omniglot \\
        --steps 5 20 100 --methods amaml maml --out benchmarks/results/omniglot_memory.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _meta_gradient(model: Any, algorithm: Any, loss: Any, batch: Any) -> Callable[[], None]:
    def run() -> None:
        model.zero_grad(set_to_none=True)
        algorithm.meta_step(model, loss, batch)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="folder with the minimal zips")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 20, 100])
    p.add_argument("--methods", nargs="+", default=["amaml", "maml"])
    p.add_argument("--memory", default="checkpoint", help="A-MAML's memory strategy")
    p.add_argument("--conv-width", type=int, default=64)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-mb", type=float, default=6000.0)
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args()
    torch.set_num_threads(1)

    from amaml.experiments.build import build_algorithm, build_family, build_model, config_loss
    from amaml.experiments.config import TrainConfig
    from amaml.experiments.memory import peak_memory_mib

    base = TrainConfig(family="omniglot-minimal", data_dir=args.data_dir, ways=20, shots=1,
                       queries=1, model="conv4", conv_width=args.conv_width, inner_lr=0.1,
                       meta_batch=args.meta_batch, memory=args.memory, dtype="float32",
                       compile=False)
    family = build_family(base)
    batch = family.train.batch(list(range(args.meta_batch)))
    rows = []
    for method in args.methods:
        seen: list[tuple[int, float]] = []
        for n in sorted(args.steps):
            if len(seen) >= 2:
                (n0, m0), (n1, m1) = seen[-2:]
                predicted = m1 + (m1 - m0) / (n1 - n0) * (n - n1)
                if predicted > args.max_mb:
                    rows.append({"method": method, "n_steps": n, "peak_mib": None,
                                 "predicted_mib": predicted, "seconds": None})
                    print(f"{method:6s} N={n:4d}: skipped, predicted {predicted:.0f} MiB "
                          f"> --max-mb {args.max_mb:.0f}", flush=True)
                    continue
            cfg = base.replace(method=method, steps=n, maml_steps=n)
            model = build_model(cfg, family.input_shape)
            algorithm = build_algorithm(cfg)

            meta_gradient = _meta_gradient(model, algorithm, config_loss(cfg), batch)
            mib = peak_memory_mib(meta_gradient, "cpu")
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                meta_gradient()
                times.append(time.perf_counter() - t0)
            seen.append((n, mib))
            rows.append({"method": method, "n_steps": n, "peak_mib": mib,
                         "seconds": statistics.median(times)})
            print(f"{method:6s} N={n:4d}: {mib:8.1f} MiB  {statistics.median(times):7.2f} s",
                  flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"config": base.to_dict(), "rows": rows},
                                             indent=1))


if __name__ == "__main__":
    main()
