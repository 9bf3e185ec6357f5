"""Several seeds of one comparison, summarised: ``amaml summarize DIR [DIR ...]``.

One ``amaml compare`` run is one draw of the whole experiment: the seed picks the
meta-training and meta-test tasks, the initialisation and the meta-batches. Differences
between methods that are small against the spread between seeds are not findings. This
module reads the ``results.json`` of several comparisons of the same setting (differing
only in ``--seed``) and reports, for each method:

- its mean nRMSE in each seed, their mean over seeds and its standard error over seeds;
- its paired difference to the reference method (the first one), task by task within each
  seed, then averaged over seeds with a standard error over seeds;
- in how many seeds it had the lowest mean nRMSE.

Output: ``summary.json``, ``summary.md`` and ``seeds.png`` (the per-seed paired
differences, with their mean and two standard errors).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_json, atomic_write_text
from .config import INNER_DEFAULTS, RESULT_FIELDS, describe_inner_fields
from .evaluate import metric_of, paired_difference, summarise

__all__ = ["SETTING_KEYS", "format_summary", "load_comparison", "summarize_seeds",
           "write_summary"]

#: Config keys that must agree between the comparisons summarised: every field that
#: changes results (:data:`~amaml.experiments.config.RESULT_FIELDS`) but the seed, which
#: is what differs, and the method, which differs within each comparison.
SETTING_KEYS: tuple[str, ...] = tuple(k for k in RESULT_FIELDS if k not in ("seed", "method"))


#: :data:`~amaml.experiments.config.INNER_DEFAULTS` as ``config.json`` writes them (lists).
_INNER_DEFAULTS_JSON: dict[str, Any] = json.loads(json.dumps(INNER_DEFAULTS))


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"{str(path)!r} does not exist: is {str(path.parent)!r} the --out "
                         f"directory of a finished `amaml compare`? ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not readable JSON ({type(err).__name__}: "
                         f"{err}).") from None


def load_comparison(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read one comparison directory: its records and each method's run config.

    Returns:
        ``{"dir", "seed", "records": [...], "configs": {method: config}}``.

    Raises:
        ValueError: No such directory, no or malformed ``results.json``, a method's
            ``config.json`` missing, or methods whose seeds differ.
    """
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"{str(d)!r} is not a directory; give the --out directories of "
                         f"`amaml compare` runs.")
    records = _read_json(d / "results.json", "results.json missing")
    if (not isinstance(records, list) or not records
            or not all(isinstance(r, dict) and isinstance(r.get("method"), str)
                       and metric_of(r).mean_key in r for r in records)):
        raise ValueError(f"{str(d / 'results.json')!r} is not a list of method records "
                         f"(method, nrmse_mean or accuracy_mean, ...) as `amaml compare` "
                         "writes.")
    configs: dict[str, dict[str, Any]] = {}
    for r in records:
        cfg = _read_json(d / r["method"] / "config.json", f"run of {r['method']!r}")
        if not isinstance(cfg, dict) or "seed" not in cfg:
            raise ValueError(f"{str(d / r['method'] / 'config.json')!r} has no seed.")
        # Runs saved before the inner optimiser existed adapted with its defaults (gd).
        configs[r["method"]] = {**_INNER_DEFAULTS_JSON, **cfg}
    seeds = {int(c["seed"]) for c in configs.values()}
    if len(seeds) != 1:
        raise ValueError(f"{str(d)!r} mixes seeds {sorted(seeds)} between its methods.")
    return {"dir": str(d), "seed": seeds.pop(), "records": records, "configs": configs}


def _check_same_setting(runs: list[dict[str, Any]]) -> None:
    first = runs[0]
    methods = [r["method"] for r in first["records"]]
    for run in runs[1:]:
        other = [r["method"] for r in run["records"]]
        if other != methods:
            raise ValueError(f"{run['dir']!r} compares {other}, {first['dir']!r} {methods}: "
                             f"summarise comparisons of the same methods.")
        for m in methods:
            a, b = first["configs"][m], run["configs"][m]
            for key in SETTING_KEYS:
                if a.get(key) != b.get(key):
                    raise ValueError(
                        f"{run['dir']!r} and {first['dir']!r} differ in {key} ({b.get(key)!r} "
                        f"vs {a.get(key)!r}, method {m}); only --seed may differ between the "
                        f"comparisons summarised.")
    seen: dict[int, str] = {}
    for run in runs:
        if run["seed"] in seen:
            raise ValueError(f"{run['dir']!r} and {seen[run['seed']]!r} both have seed "
                             f"{run['seed']}: each comparison should be another seed.")
        seen[run["seed"]] = run["dir"]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _mean_sem(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean, sem = summarise(values)
    return mean, (sem if len(values) > 1 else None)


def summarize_seeds(directories: Sequence[str | os.PathLike[str]], *,
                    reference: str | None = None) -> dict[str, Any]:
    """Summarise comparisons of one setting that differ only in their seed.

    Args:
        directories: ``--out`` directories of ``amaml compare`` runs.
        reference: Method the paired differences are taken against (default: the
            first method of the comparisons).

    Returns:
        ``{"setting", "seeds", "dirs", "metric", "reference", "methods": [...]}``; each
        method's entry has ``nrmse_per_seed``, ``nrmse_mean``, ``nrmse_sem`` (over seeds;
        ``None`` for one seed), ``diff_per_seed``, ``diff_mean``, ``diff_sem``,
        ``lowest_in`` (number of seeds in which its mean nRMSE was the lowest); for
        classification ``accuracy_per_seed``, ``accuracy_mean``, ``accuracy_sem`` and
        ``highest_in`` instead and ``steps`` (inner
        steps in training / evaluation, as ``compare`` records them). A diverged method has
        ``None`` where it has no finite value.

    Raises:
        ValueError: No directories, unreadable ones, settings that differ in more than
            the seed, a seed given twice, or an unknown ``reference``.
    """
    if not directories:
        raise ValueError("Give at least one `amaml compare` --out directory.")
    runs = sorted((load_comparison(d) for d in directories), key=lambda r: r["seed"])
    _check_same_setting(runs)
    methods = [r["method"] for r in runs[0]["records"]]
    ref = methods[0] if reference is None else reference
    if ref not in methods:
        raise ValueError(f"--reference {ref!r} is not among the methods compared {methods}.")
    by_seed = [{r["method"]: r for r in run["records"]} for run in runs]
    metric = metric_of(runs[0]["records"][0])
    key, per_task = metric.mean_key, metric.per_task_key
    pick = max if metric.higher_is_better else min
    best_key = "highest_in" if metric.higher_is_better else "lowest_in"
    best_count: dict[str, int] = dict.fromkeys(methods, 0)
    # The reference rows (no-meta, oracle) are bounds, not contenders.
    is_ref = {m: bool(by_seed[0][m].get("reference")) for m in methods}
    for recs in by_seed:
        finite = {m: r[key] for m, r in recs.items() if _finite(r.get(key)) and not is_ref[m]}
        if finite:
            best = pick(finite.values())
            for m, v in finite.items():
                best_count[m] += v == best
    entries = []
    for m in methods:
        per_seed = [recs[m][key] if _finite(recs[m].get(key)) else None for recs in by_seed]
        diffs: list[float | None] = []
        for recs in by_seed:
            pair = None if m == ref else paired_difference(recs[m].get(per_task),
                                                           recs[ref].get(per_task))
            diffs.append(None if pair is None else pair[0])
        mean, sem = _mean_sem([v for v in per_seed if v is not None]) \
            if all(v is not None for v in per_seed) else (None, None)
        dmean, dsem = _mean_sem([v for v in diffs if v is not None]) \
            if m != ref and all(v is not None for v in diffs) else (None, None)
        first = by_seed[0][m]
        steps = f"{first.get('steps', '?')} / {first.get('eval_steps', '?')}"
        if is_ref[m]:
            steps = f"- / {first['eval_steps']}" if first.get("eval_steps") else "-"
        entries.append({"method": m, "reference": is_ref[m], "steps": steps,
                        f"{metric.name}_per_seed": per_seed,
                        key: mean, f"{metric.name}_sem": sem,
                        "diff_per_seed": None if m == ref else diffs, "diff_mean": dmean,
                        "diff_sem": dsem, best_key: best_count[m]})
    cfg = runs[0]["configs"][ref]
    return {"setting": {k: cfg.get(k) for k in SETTING_KEYS},
            "seeds": [r["seed"] for r in runs], "dirs": [r["dir"] for r in runs],
            "metric": metric.name, "reference": ref, "methods": entries}


def _f(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a markdown table (best mean over seeds in bold)."""
    s, seeds, ref = summary["setting"], summary["seeds"], summary["reference"]
    metric = metric_of(summary)
    key = metric.mean_key
    accuracy = metric.name == "accuracy"
    fmt, dfmt = (".2f", "+.2f") if accuracy else (".4f", "+.4f")
    scale = 100.0 if accuracy else 1.0
    best_key = "highest_in" if metric.higher_is_better else "lowest_in"

    def f(x: float | None, spec: str = fmt) -> str:
        return _f(None if x is None else scale * x, spec)

    n = len(seeds)
    means = [e[key] for e in summary["methods"] if e[key] is not None
             and not e.get("reference")]
    best = (max if metric.higher_is_better else min)(means, default=None)
    seed_cols = " / ".join(str(k) for k in seeds)
    label = "accuracy (%)" if accuracy else metric.label
    setting = (f"{s['ways']}-way {s['shots']}-shot, {s['queries']} queries per class"
               if s.get("ways") is not None else f"{s['shots']}shot-{s['queries']}val")
    lines = [
        f"### {s['family']}, {setting}, {n} seed{'s' * (n != 1)}",
        "",
        f"meta-iterations {s['meta_iters']}, meta-batch {s['meta_batch']}, meta-lr "
        f"{s['meta_lr']} ({s.get('meta_optimizer') or 'adam'}), inner lr {s['inner_lr']}"
        f"{' (' + describe_inner_fields(s) + ')' if s.get('solver') else ''}, seeds "
        f"{', '.join(map(str, seeds))}; "
        f"± is the standard error over seeds.",
        "",
        f"| method | inner steps (train / eval) | {label}, seeds {seed_cols} | mean over seeds "
        f"| paired difference to {ref}, seeds {seed_cols} | mean over seeds | "
        f"{'highest' if metric.higher_is_better else 'lowest'} in |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in summary["methods"]:
        per = " / ".join(f(v) for v in e[f"{metric.name}_per_seed"])
        mean = f(e[key]) + ("" if e[f"{metric.name}_sem"] is None
                            else f" ± {f(e[f'{metric.name}_sem'])}")
        if best is not None and e[key] == best:
            mean = f"**{mean}**"
        if e["diff_per_seed"] is None:
            dper, dmean = "-", "-"
        else:
            dper = " / ".join(f(v, dfmt) for v in e["diff_per_seed"])
            dmean = f(e["diff_mean"], dfmt) + ("" if e["diff_sem"] is None
                                               else f" ± {f(e['diff_sem'])}")
        ref_row = bool(e.get("reference"))
        name = f"*{e['method']}*" if ref_row else e["method"]
        wins = "-" if ref_row else f"{e[best_key]} of {n}"
        lines.append(f"| {name} | {e['steps']} | {per} | {mean} | {dper} | {dmean} | {wins} |")
    return "\n".join(lines) + "\n"


def write_summary(summary: dict[str, Any], out: str | os.PathLike[str]) -> str:
    """Write ``summary.json``, ``summary.md`` and ``seeds.png`` into ``out``; the table."""
    from .plots import plot_seed_differences

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    table = format_summary(summary)
    atomic_write_json(d / "summary.json", summary)
    atomic_write_text(d / "summary.md", table)
    s = summary["setting"]
    plot_seed_differences(summary, d / "seeds.png",
                          title=f"{s['family']}, {s['shots']}shot-{s['queries']}val, "
                          f"{s['meta_iters']} meta-iterations, {len(summary['seeds'])} seeds",
                          label="accuracy" if summary.get("metric") == "accuracy" else "nRMSE")
    return table
