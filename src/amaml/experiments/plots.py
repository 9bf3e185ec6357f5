"""Figures of a run (training curve), a comparison (fine-tuning curves) and of seeds.

Matplotlib's non-interactive Agg backend is used; figures are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .._extras import import_extra
from .checkpoint import atomic_write

__all__ = ["draw_finetune", "plot_finetune", "plot_seed_differences", "plot_sweep",
           "plot_training_curve"]


def _figure() -> Any:
    matplotlib = import_extra("matplotlib", "amaml's figures")
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


def _finetune_label(curves: Mapping[str, Mapping[str, Any]]) -> str:
    opt = next((c.get("optimizer") for c in curves.values() if c.get("optimizer")), "gd")
    what = "Adam" if opt == "adam" else "gradient descent"
    return f"fine-tuning epochs ({what} on the support set)"


def plot_finetune(curves: Mapping[str, Mapping[str, Sequence[Any]]],
                  path: str | os.PathLike[str], *, title: str = "",
                  references: Mapping[str, float | None] | None = None) -> None:
    """Meta-test nRMSE (or accuracy) against fine-tuning epochs, one curve per method.

    Args:
        curves: method -> ``{"epochs", "nrmse_mean", "nrmse_sem"}`` (``None`` = diverged),
            or for classification ``{"metric": "accuracy", "epochs", "accuracy_mean",
            "accuracy_ci95"}``: the band is +- the s.e. or the 95% confidence interval.
            A curve named ``no-meta`` (no meta-learning) is drawn dashed and grey.
        path: PNG file.
        title: Figure title.
        references: name -> a level drawn as a horizontal dotted line (e.g. the
            ``oracle``: what the support set allows at best).
    """
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    draw_finetune(ax, curves, references)
    ax.set_xlabel(_finetune_label(curves))
    ax.set_ylabel(f"meta-test {_curve_keys(curves)[0]}")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def _curve_keys(curves: Mapping[str, Mapping[str, Any]]) -> tuple[str, str, str]:
    """(axis label, mean key, spread key) of the curves' metric (nRMSE when unnamed)."""
    metric = next((c.get("metric") for c in curves.values() if c.get("metric")), "nrmse")
    if metric == "accuracy":
        return "accuracy (query set)", "accuracy_mean", "accuracy_ci95"
    return "nRMSE", "nrmse_mean", "nrmse_sem"


def draw_finetune(ax: Any, curves: Mapping[str, Mapping[str, Sequence[Any]]],
                  references: Mapping[str, float | None] | None = None) -> None:
    """Draw fine-tuning curves (shaded +- s.e. or 95% CI) and reference levels on an axis."""
    _, mean_key, spread_key = _curve_keys(curves)
    for method, c in curves.items():
        pts = [(e, m, s) for e, m, s in zip(c["epochs"], c[mean_key], c[spread_key])
               if m is not None and s is not None]
        if not pts:
            continue
        e, m, s = zip(*pts)
        style = {"color": "grey", "ls": "--"} if method == "no-meta" else {}
        line = ax.plot(e, m, label=method, **style)[0]
        ax.fill_between(e, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)],
                        alpha=0.2, color=line.get_color())
    for name, level in (references or {}).items():
        if level is not None and level == level:
            ax.axhline(level, color="black", ls=":", lw=1.2, label=f"{name} ({level:.3f})")


def plot_seed_differences(summary: Mapping[str, Any], path: str | os.PathLike[str], *,
                          title: str = "", label: str = "nRMSE") -> None:
    """Each method's paired nRMSE difference to the reference, one point per seed.

    A bar marks the mean over seeds and two standard errors (over seeds) either side;
    left of zero is lower error than the reference.

    Args:
        summary: What :func:`amaml.experiments.summary.summarize_seeds` returns.
        path: PNG file.
        title: Figure title.
        label: The metric's name on the axis.
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
    ax.set_xlabel(f"{label} minus {summary['reference']}'s, per seed (points); "
                  "mean ± 2 s.e. (diamond)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_sweep(result: Mapping[str, Any], path: str | os.PathLike[str], *,
               title: str = "") -> None:
    """Meta-test nRMSE (left) and one meta-gradient's peak memory (right) against N.

    Args:
        result: What :func:`amaml.experiments.sweep.sweep_steps` returns.
        path: PNG file.
        title: Figure title.
    """
    plt = _figure()
    fig, (ax, mx) = plt.subplots(1, 2, figsize=(11, 4.2))
    budget = result.get("max_memory_mb")
    accuracy = result.get("metric") == "accuracy"
    mean_key, spread_key = ("accuracy_mean", "accuracy_ci95") if accuracy \
        else ("nrmse_mean", "nrmse_sem")
    for method in [*result["methods"], "no-meta"]:
        entries = [e for e in result["summary"] if e["method"] == method]
        pts = [(e["steps"], e[mean_key], e.get(spread_key) or 0.0) for e in entries
               if e.get(mean_key) is not None]
        style = {"color": "grey", "ls": "--"} if method == "no-meta" else {}
        if pts:
            n, m, s = zip(*pts)
            line = ax.errorbar(n, m, yerr=s, marker="o", capsize=3, label=method,
                               **style)[0]
            over = [e["steps"] for e in entries if e["status"].startswith("over budget")]
            if over:
                ax.scatter(over, [m[-1]] * len(over), marker="x", s=60,
                           color=line.get_color(), label=f"{method}: over memory budget")
        mem = [(e["steps"], e["peak_mib"]) for e in entries if e["peak_mib"] is not None]
        if mem:
            mx.plot(*zip(*mem), marker="o", label=method, **style)
    oracle = [v for v in result["references"]["oracle"] if v is not None]
    if oracle:
        level = sum(oracle) / len(oracle)
        ax.axhline(level, color="black", ls=":", lw=1.2, label=f"oracle ({level:.3f})")
    if budget is not None:
        mx.axhline(budget, color="red", ls="--", lw=1, label=f"budget {budget:g} MiB")
    for a in (ax, mx):
        a.set_xscale("log")
        a.set_xlabel("inner steps N")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax.set_ylabel(f"meta-test {'accuracy' if accuracy else 'nRMSE'} after N steps")
    mx.set_ylabel("peak memory of one meta-gradient (MiB)")
    if any(e["peak_mib"] for e in result["summary"] if e["peak_mib"]):
        mx.set_yscale("log")
    ax.set_title(title)
    mx.set_title("memory")
    _save(fig, path)
    plt.close(fig)
