"""Compare meta-learning methods under one budget: ``amaml compare``.

Every method gets the same tasks, the same initialisation, the same meta-batches and
the same number of meta-iterations; all use ``steps`` inner steps except MAML
(``maml_steps``, default ``steps // 10``) and MAML-1 (one step), as in the paper.
Each method's run lives in ``out/<method>/`` (a normal ``amaml train`` directory, so it
resumes the same way). ``out`` also receives::

    results.json   list of records: method, steps, eval_steps, metric, nrmse_mean,
                   nrmse_sem, nrmse_per_task, finetune_final_nrmse, finetune_best_nrmse
                   (classification: accuracy_mean, accuracy_ci95, accuracy_per_task,
                   finetune_final_accuracy, finetune_best_accuracy), final_meta_loss,
                   timings, the fine-tuning curve; then the reference rows ``no-meta``
                   and ``oracle`` (regression synthetic families; ``"reference": true``,
                   see :mod:`.references`)
    results.md     the table (like the paper's Table 1)
    finetune.png   meta-test nRMSE (accuracy) against fine-tuning epochs, one curve per
                   method, ``no-meta`` dashed, the oracle as a dotted level
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from .._extras import import_extra
from ..algorithms import ALGORITHMS, list_algorithms
from .build import build_family
from .checkpoint import atomic_write_json, atomic_write_text
from .config import TrainConfig
from .distributed import DistInfo
from .evaluate import metric_of, paired_difference
from .inner_optimizer import check_methods
from .plots import plot_finetune
from .references import REFERENCES, reference_metrics
from .rundir import CHECKPOINT_FILE, RunDirError, RunDirLock
from .signals import TrainingInterrupted
from .summary import summarize_seeds, write_summary
from .training import train

__all__ = ["DEFAULT_METHODS", "compare", "compare_seeds", "format_table", "paired_difference",
           "parse_methods", "parse_seeds", "setting_title"]

#: Every registered method, in registration order (the paper's: amaml, maml, maml1,
#: fomaml, reptile, imaml).
DEFAULT_METHODS: tuple[str, ...] = tuple(ALGORITHMS)


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """Validate a comma-separated list (or sequence) of method names.

    Raises:
        ValueError: Empty, unknown or repeated names.
    """
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) \
        else [str(m) for m in methods]
    names = [m for m in names if m]
    allowed = [*list_algorithms(), *REFERENCES]
    if not names:
        raise ValueError(f"--methods is empty; give a comma-separated subset of {allowed}.")
    unknown = [m for m in names if m not in allowed]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown} in --methods; expected a comma-separated "
                         f"subset of {allowed}.")
    repeated = sorted({m for m in names if names.count(m) > 1})
    if repeated:
        raise ValueError(f"--methods repeats {repeated}; give each method once.")
    return names


def _record(metrics: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    t = metrics["timings"]
    m = metric_of(metrics)
    ways = {"ways": metrics["ways"]} if "ways" in metrics else {}
    return {
        "reference": bool(metrics.get("reference", False)),
        "method": metrics["method"], "family": metrics["family"], **ways,
        "shots": metrics["shots"], "queries": metrics["queries"], "steps": metrics["steps"],
        "eval_steps": metrics["eval_steps"], "metric": m.name,
        m.mean_key: metrics[m.mean_key], m.spread_key: metrics[m.spread_key],
        m.per_task_key: metrics.get(m.per_task_key),
        f"finetune_final_{m.name}": metrics[f"finetune_final_{m.name}"],
        f"finetune_best_{m.name}": metrics[f"finetune_best_{m.name}"],
        "final_meta_loss": metrics["final_meta_loss"], "meta_iters": metrics["meta_iters"],
        "train_s": t["train_s"], "s_per_meta_iter": t["s_per_meta_iter"],
        "finetune": metrics["finetune"], "run_dir": str(run_dir),
    }


def _fmt(x: float | None, digits: int = 4, scale: float = 1.0) -> str:
    return "diverged" if x is None or x != x else f"{scale * x:.{digits}f}"


def setting_title(config: TrainConfig) -> str:
    """``glyphs, 5-way 1-shot, 15 queries`` or ``cosmixture, 50shot-50val``."""
    if config.kind == "classification":
        return (f"{config.family}, {config.ways}-way {config.shots}-shot, {config.queries} "
                "queries per class")
    return f"{config.family}, {config.shots}shot-{config.queries}val"


def format_table(records: list[dict[str, Any]], config: TrainConfig) -> str:
    """A markdown table of a comparison (best method's score in bold).

    The score is the family kind's metric: nRMSE ± standard error (regression, lower is
    better) or query accuracy ± 95% confidence interval (classification, higher is
    better). Its paired-difference column gives each row's score minus the first
    method's, task by task (mean ± standard error of the paired differences): within
    about two standard errors of zero, no clear difference. The reference rows
    (``no-meta``: nothing meta-learned; ``oracle``: the family's own parameters fitted to
    the support set) come last, in italics.
    """
    epochs = config.finetune_epochs
    m = metric_of(config.kind)
    pick = max if m.higher_is_better else min
    final = f"finetune_final_{m.name}"
    methods = [r for r in records if not r.get("reference")]
    best = pick((r[m.mean_key] for r in methods if r.get(m.mean_key) is not None),
                default=None)
    best_ft = pick((r[final] for r in methods if r.get(final) is not None), default=None)
    lr, wd = config.effective_finetune_lr, config.finetune_weight_decay
    ft = (f"Adam, lr {lr:g}, weight decay {wd:g}" if config.finetune_optimizer == "adam"
          else f"gradient descent, lr {config.effective_finetune_lr:g}")
    spread = "standard error" if m.spread == "sem" else "95% confidence interval"
    label = "accuracy (%)" if m.name == "accuracy" else m.label
    model = f", {config.model} (width {config.conv_width})" if config.model == "conv4" else ""
    lines = [
        f"### {setting_title(config)}",
        "",
        f"protocol {config.protocol}: meta-iterations {config.meta_iters}, meta-batch "
        f"{config.meta_batch}, meta-lr {config.meta_lr} ({config.meta_optimizer}), inner lr "
        f"{config.inner_lr} ({config.inner_description}), seed {config.seed}, "
        f"{config.n_test} meta-test tasks{model}, {config.dtype}; fine-tuning: {ft}. ± is "
        f"the {spread} over the meta-test tasks.",
        "",
        f"| method | inner steps (train / eval) | {label} after adaptation | "
        f"paired difference to {records[0]['method'] if records else '-'} | "
        f"{label} after {epochs} fine-tuning epochs | s / meta-iter |",
        "|---|---|---|---|---|---|",
    ]
    reference = records[0].get(m.per_task_key) if records else None
    # Accuracy in percent, as the field reports it.
    pct: dict[str, Any] = {"digits": 2, "scale": 100.0} if m.name == "accuracy" else {}
    for r in records:
        a = f"{_fmt(r.get(m.mean_key), **pct)} ± {_fmt(r.get(m.spread_key), **pct)}"
        ref = bool(r.get("reference"))
        if not ref and r.get(m.mean_key) is not None and r[m.mean_key] == best:
            a = f"**{a}**"
        f = _fmt(r.get(final), **pct) if r.get("finetune") is not None or not ref else "-"
        if not ref and r.get(final) is not None and r[final] == best_ft:
            f = f"**{f}**"
        d = "-" if r is records[0] else "n/a"
        pair = None if r is records[0] else paired_difference(r.get(m.per_task_key),
                                                              reference)
        if pair is not None:
            d = (f"{100 * pair[0]:+.2f} ± {100 * pair[1]:.2f}" if pct
                 else f"{pair[0]:+.4f} ± {pair[1]:.4f}")
        steps = f"{r['steps']} / {r['eval_steps']}" if not ref else (
            f"- / {r['eval_steps']}" if r.get("eval_steps") else "-")
        spi = r.get("s_per_meta_iter")
        name = f"*{r['method']}*" if ref else r["method"]
        lines.append(f"| {name} | {steps} | {a} | {d} | {f} | "
                     f"{'-' if spi is None else f'{spi:.3f}'} |")
    return "\n".join(lines) + "\n"


def _taken(out_dir: Path, names: Sequence[str]) -> list[str]:
    """The files that show ``out_dir`` already holds (part of) a comparison."""
    return [f for f in ("results.json", *(f"{m}/{CHECKPOINT_FILE}" for m in names))
            if (out_dir / f).exists()]


def compare(config: TrainConfig, methods: Sequence[str], out: str | os.PathLike[str], *,
            resume: bool = False, progress: bool = True,
            dist_info: DistInfo | None = None) -> list[dict[str, Any]]:
    """Meta-train and evaluate several methods under ``config``'s budget.

    Args:
        config: Shared settings (its ``method`` is replaced by each of ``methods``).
        methods: Method names.
        out: Comparison directory; each method's run goes to ``out/<method>``.
        resume: Continue interrupted runs and skip finished ones.
        progress: Show a bar over methods and one per run.
        dist_info: Process group (single process when ``None`` and no torchrun).

    Returns:
        The records written to ``results.json``.

    Raises:
        ValueError: Bad method names, or a method that takes no inner optimiser (iMAML)
            under ``config.inner_optimizer`` other than ``gd``, before any training.
        RunDirError: ``out`` already holds a comparison (without ``resume``) or is in use
            by another process (it is locked while the comparison lasts).
        Everything :func:`amaml.experiments.train` raises.
    """
    names = parse_methods(methods)
    check_methods(config.inner_optimizer, [m for m in names if m not in REFERENCES])
    out_dir = Path(out)
    with _lock(out_dir, dist_info):
        if not resume:
            taken = _taken(out_dir, names)
            if taken:
                raise RunDirError(f"--out {str(out_dir)!r} already holds a comparison "
                                  f"({', '.join(taken)}); pass --resume to continue it, or "
                                  "choose another --out.")
        return _compare(config, names, out_dir, resume=resume, progress=progress,
                        dist_info=dist_info)


def _lock(out_dir: Path, dist_info: DistInfo | None) -> AbstractContextManager[Any]:
    """The comparison directory's lock, held by the main process only (rank 0)."""
    main = dist_info.is_main if dist_info is not None else os.environ.get("RANK", "0") == "0"
    return RunDirLock(out_dir, what="comparison") if main else nullcontext()


def _compare(config: TrainConfig, names: list[str], out_dir: Path, *, resume: bool,
             progress: bool, dist_info: DistInfo | None) -> list[dict[str, Any]]:
    tqdm = import_extra("tqdm.auto", "amaml's progress bars").tqdm

    family = build_family(config)
    records = []
    trained = [m for m in names if m not in REFERENCES]
    bar = tqdm(trained, desc="methods", unit="method", disable=not progress, position=0)
    for name in bar:
        bar.set_postfix(method=name)
        run_dir = out_dir / name
        cfg = config.replace(method=name)
        try:
            result = train(cfg, run_dir, resume=resume and (run_dir / CHECKPOINT_FILE).exists(),
                           family=family, progress=progress, progress_position=1,
                           dist_info=dist_info)
        except TrainingInterrupted as stop:
            raise TrainingInterrupted(stop.out_dir, stop.iteration, stop.signal_name,
                                      resume_hint=f"amaml compare ... --out {out_dir} --resume "
                                                  "(same flags)") from stop
        if result.metrics:
            records.append(_record(result.metrics, run_dir))
    bar.close()
    if records or not trained:
        for name in REFERENCES:
            ref = reference_metrics(name, config, family, out_dir)
            if ref is not None:
                records.append(_record(ref, out_dir / name))
        atomic_write_json(out_dir / "results.json", records)
        atomic_write_text(out_dir / "results.md", format_table(records, config))
        m = metric_of(config.kind)
        plot_finetune({r["method"]: r["finetune"] for r in records if r["finetune"]},
                      out_dir / "finetune.png", title=setting_title(config),
                      references={r["method"]: r[m.mean_key] for r in records
                                  if r["reference"] and not r["finetune"]})
    return records


def parse_seeds(seeds: str | Sequence[int]) -> list[int]:
    """Validate a comma-separated list (or sequence) of seeds: integers, each once.

    Raises:
        ValueError: Empty, non-integer, negative or repeated seeds.
    """
    if isinstance(seeds, str):
        parts = [p.strip() for p in seeds.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, e.g. 0,1,2; got "
                             f"{seeds!r}.") from None
    else:
        values = [int(v) for v in seeds]
    if not values:
        raise ValueError("--seeds is empty; give comma-separated integers, e.g. 0,1,2.")
    if any(v < 0 for v in values):
        raise ValueError(f"--seeds must be >= 0; got {values}.")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"--seeds repeats {repeated}; give each seed once.")
    return values


def compare_seeds(config: TrainConfig, methods: Sequence[str], seeds: str | Sequence[int],
                  out: str | os.PathLike[str], *, resume: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """:func:`compare` once per seed (``out/seed<S>``), then their summary in ``out``.

    Returns:
        What :func:`amaml.experiments.summary.summarize_seeds` returns; ``out`` also
        receives ``summary.json``, ``summary.md`` and ``seeds.png``.

    Raises:
        RunDirError: A seed's directory already holds a comparison (without ``resume``),
            checked for every seed before any training starts; or ``out`` is in use by
            another process.
        Everything :func:`compare` raises.
    """
    values = parse_seeds(seeds)
    names = parse_methods(methods)
    check_methods(config.inner_optimizer, [m for m in names if m not in REFERENCES])
    out_dir = Path(out)
    with RunDirLock(out_dir, what="comparison"):
        return _compare_seeds(config, names, values, out_dir, resume=resume,
                              progress=progress)


def _compare_seeds(config: TrainConfig, names: list[str], values: list[int], out_dir: Path,
                   *, resume: bool, progress: bool) -> dict[str, Any]:
    dirs = [out_dir / f"seed{s}" for s in values]
    if not resume:
        taken = [str(d) for d in dirs if _taken(d, names)]
        if taken:
            raise RunDirError(f"{', '.join(taken)} already hold(s) a comparison; pass --resume "
                              "to continue, or choose another --out.")
    for i, (seed, d) in enumerate(zip(values, dirs), start=1):
        if progress:
            print(f"seed {seed} ({i} of {len(values)}): {d}", flush=True)
        try:
            compare(config.replace(seed=seed), names, d, resume=resume, progress=progress)
        except TrainingInterrupted as stop:
            raise TrainingInterrupted(
                stop.out_dir, stop.iteration, stop.signal_name,
                resume_hint=f"amaml compare ... --seeds {','.join(map(str, values))} "
                            f"--out {out_dir} --resume (same flags)") from stop
    summary = summarize_seeds(dirs)
    write_summary(summary, out_dir)
    return summary
