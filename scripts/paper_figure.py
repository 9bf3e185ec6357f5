"""The paper's figure from `amaml compare --seeds` runs: nRMSE against fine-tuning epochs.

One panel per setting (each argument is the --out directory of one `amaml compare ...
--seeds S1,S2,...` run), one curve per method: the mean over seeds of the meta-test
nRMSE, shaded +- one standard error over seeds; the oracle as a dotted level. Also prints
a markdown table of the nRMSE at a few epochs (mean ± s.e. over seeds).

    python scripts/paper_figure.py runs/paper/cosmixture-paper-50 runs/paper/alpine-50 \
        --out docs/figures/paper-protocol.png --epochs 100 1000
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from amaml.experiments.plots import draw_finetune


def _mean_sem(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))


def load_setting(directory: Path) -> tuple[str, dict[str, Any], dict[str, float], int]:
    """Curves averaged over the seed directories of one comparison."""
    runs = [json.loads(p.read_text()) for p in sorted(directory.glob("seed*/results.json"))]
    if not runs:
        raise SystemExit(f"{directory}: no seed*/results.json (run amaml compare --seeds)")
    curves: dict[str, Any] = {}
    levels: dict[str, float] = {}
    for method in [r["method"] for r in runs[0]]:
        rows = [next(r for r in run if r["method"] == method) for run in runs]
        if rows[0]["finetune"] is None:
            levels[method] = _mean_sem([r["nrmse_mean"] for r in rows])[0]
            continue
        epochs = rows[0]["finetune"]["epochs"]
        stats = [_mean_sem([r["finetune"]["nrmse_mean"][i] for r in rows])
                 for i in range(len(epochs))]
        curves[method] = {"epochs": epochs, "nrmse_mean": [s[0] for s in stats],
                          "nrmse_sem": [s[1] for s in stats],
                          "optimizer": rows[0]["finetune"].get("optimizer")}
    first = runs[0][0]
    title = f"{first['family']}, {first['shots']}shot-{first['queries']}val"
    cfg_path = Path(first["run_dir"]) / "config.json"
    if cfg_path.exists():  # say how the initialisations were meta-trained
        cfg = json.loads(cfg_path.read_text())
        title += (f"\n{cfg.get('meta_optimizer', 'adam')} meta-lr {cfg['meta_lr']:g}, "
                  f"{cfg['meta_iters']} meta-updates")
    return title, curves, levels, len(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, nargs="+", default=[100, 1000],
                    help="epochs reported in the table")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [load_setting(d) for d in args.dirs]
    cols = min(2, len(settings))
    rows = (len(settings) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 4.4 * rows), squeeze=False)
    for ax in axes.flat[len(settings):]:
        ax.set_visible(False)
    for ax, (title, curves, levels, n_seeds) in zip(axes.flat, settings):
        draw_finetune(ax, curves, levels)
        ax.set_title(f"{title} ({n_seeds} seed{'s' * (n_seeds != 1)})", fontsize=10)
        ax.set_xlabel("fine-tuning epochs (Adam on the support set)")
        ax.set_ylabel("meta-test nRMSE")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90, bbox_inches="tight")
    for title, curves, levels, n_seeds in settings:
        print(f"\n{title}, {n_seeds} seeds: meta-test nRMSE after E fine-tuning epochs "
              "(mean ± s.e. over seeds)\n")
        print("| method | " + " | ".join(f"E = {e}" for e in [0, *args.epochs]) + " |")
        print("|---|" + "---|" * (1 + len(args.epochs)))
        for method, c in curves.items():
            cells = []
            for e in [0, *args.epochs]:
                if e in c["epochs"]:
                    i = c["epochs"].index(e)
                    cells.append(f"{c['nrmse_mean'][i]:.3f} ± {c['nrmse_sem'][i]:.3f}")
                else:
                    cells.append("-")
            print(f"| {method} | " + " | ".join(cells) + " |")
        for method, level in levels.items():
            print(f"| {method} | " + " | ".join([f"{level:.3f}"] * (1 + len(args.epochs)))
                  + " |")


if __name__ == "__main__":
    main()
