"""Run many cases of the differential suite and print a tally.

    python -m tests.differential.run --examples 2000 [--start 0] [--compile-rate 0.02]

prints each case that did not give its expected outcome (seed, description, detail) as it
goes, then counts by outcome, by model, by kind (model / call / action) and by optimiser
and memory. The exit status is 1 if any case failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time

import torch

from .cases import OUTCOMES, draw, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--start", type=int, default=0, help="first seed")
    ap.add_argument("--compile-rate", type=float, default=0.0,
                    help="chance of compile=True per case (each compiles for seconds)")
    ap.add_argument("--no-fd", action="store_true", help="skip the finite differences")
    ap.add_argument("--json", help="write every result to this JSON-lines file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tally: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures = []
    out = open(args.json, "w") if args.json else None  # noqa: SIM115
    t0 = time.perf_counter()
    for seed in range(args.start, args.start + args.examples):
        case = draw(seed, args.compile_rate)
        res = run(case, fd=not args.no_fd)
        outcome = res.outcome if res.ok else "failed"
        if res.outcome != "failed" and not res.ok:
            res.detail = f"outcome {res.outcome}, expected {case.expected}. {res.detail}"
        tally["outcome"][outcome] += 1
        for key, val in (("model", case.model), ("kind", case.kind),
                         ("optimizer", case.optimizer), ("memory", case.memory),
                         ("call", "adapt_batch" if case.batch else "adapt"),
                         ("action", case.action), ("meta", case.meta),
                         ("compiled", str(case.compiled)), ("lr_shape", case.lr_shape)):
            tally[key][f"{val}: {outcome}"] += 1
        if outcome == "failed":
            failures.append(res)
            print(f"FAILED {case.describe()}\n    {res.detail}", flush=True)
        if out:
            out.write(json.dumps({"seed": seed, "case": case.describe(), "kind": case.kind,
                                  "expected": case.expected, "outcome": res.outcome,
                                  "ok": res.ok, "detail": res.detail, "errors": res.errors,
                                  "seconds": round(res.seconds, 3)}) + "\n")
            out.flush()
    print(f"\n{args.examples} cases, seeds {args.start}..{args.start + args.examples - 1}, "
          f"{time.perf_counter() - t0:.0f} s")
    for key in ("outcome", "model", "call", "action", "meta", "optimizer", "memory", "compiled",
                "lr_shape",
                "kind"):
        print(f"\nby {key}:")
        for k, v in sorted(tally[key].items()):
            print(f"  {k:55s} {v}")
    print("\noutcomes:", ", ".join(f"{o} {tally['outcome'][o]}" for o in OUTCOMES))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
