"""Draw a ``../shared/bench/peers.py --json`` run: time and memory of one meta-gradient
beside TorchOpt, per method and number of inner steps.

Left panel: time as a ratio to TorchOpt's (unrolled second-order MAML, ``MetaSGD``) at the
same N, log scale, one bar per N; right panel: peak RSS growth of one meta-gradient at the
largest N, log scale. Also prints the ratios as a markdown table. A second ``--before``
file draws its ratios as hollow markers on the same bars, to show a change.

    python benchmarks/plot_peers.py after.json --before before.json \
        --out docs/figures/peers-cpu.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: Display names, in drawing order (methods absent from a run are skipped).
LABELS = {
    "forward": "forward-only\n(no meta-gradient)",
    "torchopt": "TorchOpt\n(unrolled)",
    "higher": "higher\n(unrolled)",
    "unrolled": "autograd\n(unrolled)",
    "torchmaml": "torch-maml\n(checkpointed)",
    "adjoint": "hand-written\nadjoint",
    "amaml-store": "amaml\nstore",
    "amaml-checkpoint": "amaml\ncheckpoint\n(default)",
    "amaml-revolve": "amaml\nrevolve",
    "amaml-batch": "amaml\nadapt_batch",
    "amaml-store-compiled": "amaml store\ncompiled",
    "amaml-checkpoint-compiled": "amaml ckpt\ncompiled",
    "amaml-batch-compiled": "amaml batch\ncompiled",
}
REFERENCE = "torchopt"


def load(path: str) -> dict[tuple[str, int], dict[str, Any]]:
    """``{(method, N): result}`` of one float32 run (the first dtype found)."""
    raw: dict[str, dict[str, Any]] = json.loads(Path(path).read_text())
    out: dict[tuple[str, int], dict[str, Any]] = {}
    dtype = None
    for key, res in raw.items():
        dt, method, n = key.split("|")
        dtype = dtype or dt
        if dt == dtype and res.get("status", "ok") == "ok" and "median" in res:
            out[(method, int(n))] = res
    if not out:
        raise SystemExit(f"{path}: no finished results")
    return out


def ratios(run: dict[tuple[str, int], dict[str, Any]]) -> dict[tuple[str, int], float]:
    """Each method's time over the reference's at the same N."""
    out = {}
    for (method, n), res in run.items():
        ref = run.get((REFERENCE, n))
        if ref is not None:
            out[(method, n)] = res["median"] / ref["median"]
    if not out:
        raise SystemExit(f"the run has no {REFERENCE!r} rows to compare with")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", help="a peers.py --json file")
    ap.add_argument("--before", help="an earlier run, drawn as hollow markers")
    ap.add_argument("--out", default="peers.png", help="PNG to write")
    ap.add_argument("--title", default="One meta-gradient beside TorchOpt (CPU, 1 thread)")
    args = ap.parse_args()

    run = load(args.json)
    rat = ratios(run)
    before = ratios(load(args.before)) if args.before else {}
    ns = sorted({n for _, n in rat})
    methods = [m for m in LABELS if any((m, n) in rat for n in ns)]

    print("| method | " + " | ".join(f"N = {n}" for n in ns) + " |")
    print("|---|" + "---|" * len(ns))
    for m in methods:
        cells = []
        for n in ns:
            cell = f"{rat[(m, n)]:.3f}x" if (m, n) in rat else "-"
            if (m, n) in before:
                cell += f" (before {before[(m, n)]:.3f}x)"
            cells.append(cell)
        print(f"| {m} | " + " | ".join(cells) + " |")

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(15, 5.2),
                                     gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / len(ns)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, n in enumerate(ns):
        xs = [i + (j - (len(ns) - 1) / 2) * width for i in range(len(methods))]
        ys = [rat.get((m, n), float("nan")) for m in methods]
        ax_t.bar(xs, ys, width, label=f"N = {n}", color=colors[j % len(colors)])
        for x, m in zip(xs, methods):
            if (m, n) in before:
                ax_t.plot(x, before[(m, n)], marker="o", mfc="none", color="black", ms=5)
    if before:
        ax_t.plot([], [], marker="o", mfc="none", color="black", ls="none", label="before")
    ax_t.axhline(1.0, color="grey", lw=1, ls="--")
    ax_t.set_yscale("log")
    ticks = [t for t in (0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 10)
             if min(v for v in rat.values()) * 0.8 <= t <= max(rat.values()) * 1.6]
    ax_t.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_t.set_yticks(ticks, [f"{t:g}x" for t in ticks])
    ax_t.set_xticks(range(len(methods)), [LABELS[m] for m in methods], fontsize=8)
    ax_t.set_ylabel("time / TorchOpt's time (same N)")
    ax_t.legend(fontsize=8)
    ax_t.set_title("time (lower is faster)")

    big = ns[-1]
    mem = [(m, run[(m, big)].get("growth", 0) / 2**20) for m in methods if (m, big) in run]
    ax_m.barh([LABELS[m].replace("\n", " ") for m, _ in mem],
              [max(v, 0.05) for _, v in mem], color=colors[len(ns) % len(colors)])
    ax_m.set_xscale("log")
    ax_m.invert_yaxis()
    ax_m.tick_params(axis="y", labelsize=8)
    ax_m.set_xlabel(f"peak RSS growth, N = {big} (MiB)")
    ax_m.set_title("memory")
    fig.suptitle(args.title)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
