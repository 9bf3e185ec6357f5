"""Figures of a run (training curve), a comparison (fine-tuning curves) and of seeds.

Matplotlib's non-interactive Agg backend is used; figures are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .checkpoint import atomic_write

__all__ = ["plot_finetune", "plot_seed_differences", "plot_training_curve"]


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_training_curve(iterations: Sequence[int], meta_loss: Sequence[float],
                        path: str | os.PathLike[str], *, title: str = "") -> None:
    """Meta-loss (mean query loss of the meta-batch) against meta-iterations, log scale."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(iterations), list(meta_loss), lw=0.8, alpha=0.5, label="meta-batch")
    if len(meta_loss) >= 10:
        w = max(1, len(meta_loss) // 20)
        smooth = [sum(meta_loss[max(0, i - w + 1):i + 1]) / len(meta_loss[max(0, i - w + 1):i + 1])
                  for i in range(len(meta_loss))]
        ax.plot(list(iterations), smooth, lw=1.5, label=f"running mean ({w})")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("query loss (MSE, standardised)")
    if all(v > 0 for v in meta_loss):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_finetune(curves: Mapping[str, Mapping[str, Sequence[Any]]],
                  path: str | os.PathLike[str], *, title: str = "") -> None:
    """Meta-test nRMSE against fine-tuning epochs, one curve (mean +- s.e.) per method.

    Args:
        curves: method -> ``{"epochs", "nrmse_mean", "nrmse_sem"}`` (``None`` = diverged).
        path: PNG file.
        title: Figure title.
    """
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, c in curves.items():
        pts = [(e, m, s) for e, m, s in zip(c["epochs"], c["nrmse_mean"], c["nrmse_sem"])
               if m is not None and s is not None]
        if not pts:
            continue
        e, m, s = zip(*pts)
        ax.plot(e, m, label=method)
        ax.fill_between(e, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)],
                        alpha=0.2)
    ax.set_xlabel("fine-tuning epochs (gradient descent on the support set)")
    ax.set_ylabel("meta-test nRMSE")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_seed_differences(summary: Mapping[str, Any], path: str | os.PathLike[str], *,
                          title: str = "") -> None:
    """Each method's paired nRMSE difference to the reference, one point per seed.

    A bar marks the mean over seeds and two standard errors (over seeds) either side;
    left of zero is lower error than the reference.

    Args:
        summary: What :func:`amaml.experiments.summary.summarize_seeds` returns.
        path: PNG file.
        title: Figure title.
    """
    plt = _figure()
    rows = [e for e in summary["methods"] if e["diff_per_seed"] is not None]
    fig, ax = plt.subplots(figsize=(6, 1.2 + 0.5 * max(1, len(rows))))
    for i, e in enumerate(rows):
        y = len(rows) - 1 - i
        pts = [v for v in e["diff_per_seed"] if v is not None]
        ax.scatter(pts, [y] * len(pts), s=18, color="tab:blue", alpha=0.7, zorder=3)
        if e["diff_mean"] is not None:
            err = 0.0 if e["diff_sem"] is None else 2 * e["diff_sem"]
            ax.errorbar([e["diff_mean"]], [y], xerr=[err], fmt="D", color="black", ms=5,
                        capsize=4, zorder=4)
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_yticks(range(len(rows)), [e["method"] for e in reversed(rows)])
    ax.set_xlabel(f"nRMSE minus {summary['reference']}'s, per seed (points); "
                  "mean ± 2 s.e. (diamond)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    plt.close(fig)
