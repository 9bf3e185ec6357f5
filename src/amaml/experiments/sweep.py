"""What long inner loops buy: meta-test error against inner steps N under one memory budget.

``amaml sweep-steps`` meta-trains each method at every N of ``--steps-list`` (A-MAML with
its memory strategy, MAML unrolled through all N steps) and evaluates it after N
adaptation steps. Before training at N, one meta-gradient of a meta-batch is measured
(peak memory growth, :func:`amaml.experiments.memory.peak_memory_mib`); a method whose
meta-gradient does not fit ``--max-memory-mb`` is not trained at that N nor at any larger
one, as a run with that much memory would stop there. The reference rows stand beside
every N: ``no-meta`` (the random initialisation adapted with N steps) and the ``oracle``
(the family's parameters fitted to the support set; synthetic regression families).

The score is the family kind's metric: nRMSE (mean ± standard error over seeds) or, for
classification, query accuracy (one seed: mean ± 95% confidence interval over the
meta-test episodes; several seeds: mean over seeds ± 1.96 standard errors over seeds).

``out`` receives ``sweep.json`` (one row per seed, method and N), ``sweep.md`` (mean over
seeds) and ``sweep.png`` (nRMSE and peak memory against N); each training run lives in
``out/seed<S>/<method>-N<N>/`` and resumes like any ``amaml train`` run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .build import build_algorithm, build_family, build_model, config_loss, resolve_compile
from .checkpoint import atomic_write_json, atomic_write_text
from .comparison import parse_methods, parse_seeds
from .config import TrainConfig, describe_inner_fields
from .evaluate import Metric, evaluate_adaptation, metric_of, summarise
from .inner_optimizer import check_methods
from .memory import peak_memory_mib
from .plots import plot_sweep
from .references import oracle_metrics
from .rundir import CHECKPOINT_FILE
from .training import train

__all__ = ["parse_steps_list", "sweep_steps"]


def parse_steps_list(steps: str | Sequence[int]) -> list[int]:
    """Validate a comma-separated list of inner-step counts (each >= 1, once), sorted.

    Raises:
        ValueError: Empty, non-integer, < 1 or repeated values.
    """
    try:
        values = [int(p) for p in steps.split(",") if p.strip()] if isinstance(steps, str) \
            else [int(v) for v in steps]
    except ValueError:
        raise ValueError(f"--steps-list must be comma-separated integers, e.g. 1,10,100,1000; "
                         f"got {steps!r}.") from None
    if not values or any(v < 1 for v in values) or len(set(values)) != len(values):
        raise ValueError(f"--steps-list needs distinct integers >= 1, e.g. 1,10,100,1000; got "
                         f"{steps!r}.")
    return sorted(values)


def _method_config(config: TrainConfig, method: str, n: int, seed: int) -> TrainConfig:
    # MAML unrolls all N steps here: the point is what each method can afford at N.
    return config.replace(method=method, steps=n, seed=seed,
                          maml_steps=n if method == "maml" else None, eval_steps=None)


def _probe(cfg: TrainConfig, family: Any) -> float:
    """Peak memory (MiB) of one meta-gradient of a meta-batch under ``cfg``."""
    model = build_model(cfg, family.input_shape)
    algorithm = build_algorithm(cfg)
    batch = family.train.batch(list(range(cfg.meta_batch)))
    if cfg.pool is not None:
        import torch

        from ..tasks import draw_episode

        batch = draw_episode(batch, cfg.shots, cfg.queries, torch.Generator().manual_seed(0))
    loss = config_loss(cfg)

    def meta_gradient() -> None:
        model.zero_grad(set_to_none=True)
        algorithm.meta_step(model, loss, batch)

    # Compiled steps would compile again in a child process: measure those in-process.
    compiled = resolve_compile(cfg)[0] is not False
    return peak_memory_mib(meta_gradient, cfg.device, isolate=not compiled)


def sweep_steps(config: TrainConfig, methods: str | Sequence[str],
                steps_list: str | Sequence[int], out: str | os.PathLike[str], *,
                max_memory_mb: float | None = None, seeds: str | Sequence[int] | None = None,
                resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Meta-train and evaluate ``methods`` at each N of ``steps_list`` (see the module).

    Args:
        config: Shared settings (method, steps, maml_steps and seed are set per run).
        methods: Method names (e.g. ``"amaml,maml"``).
        steps_list: Inner-step counts N.
        out: Output directory.
        max_memory_mb: Memory budget of one meta-gradient in MiB; ``None``: no limit.
        seeds: Seeds (default: ``config.seed``).
        resume: Reuse finished runs found in ``out`` and continue interrupted ones.
        progress: Show progress.

    Returns:
        ``{"rows": [...], "summary": [...], "references": {...}}`` as in ``sweep.json``.
    """
    names = [m for m in parse_methods(methods) if m not in ("no-meta", "oracle")]
    check_methods(config.inner_optimizer, names)
    ns = parse_steps_list(steps_list)
    values = parse_seeds(seeds) if seeds is not None else [config.seed]
    if max_memory_mb is not None and not (max_memory_mb > 0 and math.isfinite(max_memory_mb)):
        raise ValueError(f"--max-memory-mb must be > 0; got {max_memory_mb!r}.")
    out_dir = Path(out)
    m = metric_of(config.kind)
    rows: list[dict[str, Any]] = []
    references: dict[str, Any] = {"oracle": [], "no-meta": []}
    for seed in values:
        family = build_family(config.replace(seed=seed))
        oracle = oracle_metrics(config.replace(seed=seed), family)
        if oracle is not None:
            references["oracle"].append(oracle["nrmse_mean"])
        base = build_model(config.replace(seed=seed), family.input_shape)
        for n in ns:
            plain = build_algorithm(_method_config(config, "fomaml", n, seed))
            ev = evaluate_adaptation(base, plain, config_loss(config), family.test)
            references["no-meta"].append({"seed": seed, "steps": n,
                                          m.mean_key: ev[m.mean_key],
                                          m.spread_key: ev[m.spread_key]})
        for method in names:
            stopped_at: int | None = None
            for n in ns:
                cfg = _method_config(config, method, n, seed)
                row: dict[str, Any] = {"seed": seed, "method": method, "steps": n,
                                       "memory": cfg.memory if method == "amaml" else None}
                if stopped_at is not None:
                    rows.append({**row, "status": f"over budget (from N = {stopped_at})"})
                    continue
                mib = _probe(cfg, family)
                row["peak_mib"] = mib
                if max_memory_mb is not None and mib > max_memory_mb:
                    stopped_at = n
                    rows.append({**row, "status": "over budget"})
                    if progress:
                        print(f"seed {seed} {method} N={n}: one meta-gradient needs {mib:.1f} "
                              f"MiB > --max-memory-mb {max_memory_mb:g}; stops here",
                              flush=True)
                    continue
                run_dir = out_dir / f"seed{seed}" / f"{method}-N{n}"
                run = train(cfg, run_dir, resume=resume and (run_dir / CHECKPOINT_FILE)
                            .exists(), family=family, progress=progress)
                got = run.metrics
                final = f"finetune_final_{m.name}"
                rows.append({**row, "status": "ok", m.mean_key: got[m.mean_key],
                             m.spread_key: got[m.spread_key], final: got[final],
                             "s_per_meta_iter": got["timings"]["s_per_meta_iter"],
                             "run_dir": str(run_dir)})
                if progress:
                    print(f"seed {seed} {method} N={n}: {m.label} {got[m.mean_key]:.4f}, one "
                          f"meta-gradient {mib:.1f} MiB", flush=True)
    result = {"config": config.to_dict(), "metric": m.name, "methods": names,
              "steps_list": ns, "seeds": values, "max_memory_mb": max_memory_mb, "rows": rows,
              "references": references, "summary": _summary(rows, references, names, ns, m)}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "sweep.json", result)
    atomic_write_text(out_dir / "sweep.md", format_sweep(result))
    plot_sweep(result, out_dir / "sweep.png", title=_title(config.to_dict()))
    return result


def _title(cfg: dict[str, Any]) -> str:
    if cfg.get("ways") is not None:
        return f"{cfg['family']}, {cfg['ways']}-way {cfg['shots']}-shot"
    return f"{cfg['family']}, {cfg['shots']}shot-{cfg['queries']}val"


def _summary(rows: list[dict[str, Any]], references: dict[str, Any], names: list[str],
             ns: list[int], m: Metric) -> list[dict[str, Any]]:
    """Per method and N: the mean over seeds and its spread (see the module)."""
    out = []
    for method in [*names, "no-meta"]:
        for n in ns:
            if method == "no-meta":
                mine = [r for r in references["no-meta"] if r["steps"] == n]
                mib: list[float] = []
                status = "reference"
            else:
                mine = [r for r in rows if r["method"] == method and r["steps"] == n
                        and r["status"] == "ok"]
                everything = [r for r in rows if r["method"] == method and r["steps"] == n]
                mib = [r["peak_mib"] for r in everything if r.get("peak_mib") is not None]
                status = "ok" if mine else (everything[0]["status"] if everything
                                            else "missing")
            vals = [r[m.mean_key] for r in mine]
            mean, sem = summarise(vals) if vals else (None, None)
            spread: float | None
            if len(vals) > 1 and sem is not None:
                spread = sem if m.spread == "sem" else 1.96 * sem
            elif vals and m.spread != "sem":  # one seed: the interval over the episodes
                spread = mine[0].get(m.spread_key)
            else:
                spread = None
            out.append({"method": method, "steps": n, "status": status, "n_seeds": len(vals),
                        m.mean_key: mean, m.spread_key: spread,
                        "peak_mib": max(mib) if mib else None})
    return out


def format_sweep(result: dict[str, Any]) -> str:
    """The sweep as a markdown table: the metric per method and N (see the module)."""
    cfg = result["config"]
    ns = result["steps_list"]
    budget = result["max_memory_mb"]
    oracle = result["references"]["oracle"]
    m = metric_of(result)
    if m.name == "accuracy":
        cell_text = ("query accuracy (%) after N adaptation steps (one seed: mean ± 95% CI "
                     "over the meta-test episodes; several: mean ± 1.96 s.e. over seeds)")
    else:
        cell_text = "nRMSE after N adaptation steps (mean ± s.e. over seeds)"
    scale, digits = (100.0, 2) if m.name == "accuracy" else (1.0, 4)
    lines = [f"### {_title(cfg)}: meta-test {m.label} against inner steps N",
             "",
             f"protocol {cfg['protocol']}, {cfg['meta_iters']} meta-iterations, inner lr "
             f"{cfg['inner_lr']} ({describe_inner_fields(cfg)}), A-MAML memory {cfg['memory']}, "
             "seeds "
             f"{', '.join(map(str, result['seeds']))}; memory budget of one meta-gradient: "
             f"{'none' if budget is None else f'{budget:g} MiB'}. Cells: {cell_text} "
             "[peak MiB of one meta-gradient].",
             "",
             "| method | " + " | ".join(f"N = {n}" for n in ns) + " |",
             "|---|" + "---|" * len(ns)]
    for method in [*result["methods"], "no-meta"]:
        cells = []
        for n in ns:
            e = next(s for s in result["summary"] if s["method"] == method and s["steps"] == n)
            if e.get(m.mean_key) is None:
                cell = e["status"]
            else:
                cell = f"{scale * e[m.mean_key]:.{digits}f}"
                if e.get(m.spread_key) is not None:
                    cell += f" ± {scale * e[m.spread_key]:.{digits}f}"
            if e["peak_mib"] is not None:
                cell += f" [{e['peak_mib']:.1f}]"
            cells.append(cell)
        name = "*no-meta*" if method == "no-meta" else method
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if oracle:
        mean, sem = summarise(oracle)
        lines.append(f"| *oracle* | {mean:.4f}" + (f" ± {sem:.4f}" if len(oracle) > 1 else "")
                     + " (any N) |" + " |" * (len(ns) - 1))
    return "\n".join(lines) + "\n"
