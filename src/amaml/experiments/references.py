"""Reference rows that make a comparison readable: ``no-meta`` and ``oracle``.

* ``no-meta``: the same network from its random initialisation (the one every method
  starts meta-training from), adapted with the plain inner loop of ``steps`` steps and
  fine-tuned exactly as the methods are. What meta-learning must beat: a method within
  noise of it learned nothing.
  For classification, the random Conv-4 adapted with ``steps`` steps on each support set:
  the accuracy training from scratch on the support set gives.
* ``oracle`` (synthetic regression families only): the family's own parameters fitted
  to each support set by least squares (several restarts), scored on the same test
  grid. What the support set allows at best; the distance to it is what is left to learn.

Both are computed on the same meta-test tasks as the methods, so paired differences
apply to them too. Each is written like a method's run, to ``out/<name>/`` (config.json
and metrics.json), so that ``amaml summarize`` reads it the same way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..tasks import TaskFamily, oracle_nrmse, supports_oracle
from .build import build_algorithm, build_model
from .checkpoint import atomic_write_json
from .config import TrainConfig
from .evaluate import evaluate_run, evaluation_fields, summarise

__all__ = ["REFERENCES", "no_meta_metrics", "oracle_metrics", "reference_metrics"]

#: Reference rows, in the order they are added to a comparison.
REFERENCES: tuple[str, ...] = ("no-meta", "oracle")


def _base(config: TrainConfig, name: str) -> dict[str, Any]:
    kind = {"ways": config.ways, "model": config.model} if config.kind == "classification" \
        else {}
    return {"family": config.family, "kind": config.kind, **kind, "method": name,
            "config_steps": config.steps,
            "shots": config.shots, "queries": config.queries, "inner_lr": config.inner_lr,
            "meta_iters": 0, "meta_batch": config.meta_batch, "meta_lr": config.meta_lr,
            "seed": config.seed, "final_meta_loss": None,
            "meta_loss": {"iterations": [], "values": []}, "world_size": 1, "resumes": 0,
            "amaml_version": __version__, "reference": True}


def no_meta_metrics(config: TrainConfig, family: TaskFamily) -> dict[str, Any]:
    """Metrics of the random initialisation, adapted and fine-tuned as the methods are."""
    model = build_model(config, family.input_shape)
    # FOMAML's inner loop: `steps` plain steps, no proximal term, nothing meta-learned.
    algorithm = build_algorithm(config.replace(method="fomaml"))
    ev = evaluate_run(config, model, family, algorithm)
    return {**_base(config, "no-meta"), "steps": 0, "eval_steps": ev["eval_steps"],
            **evaluation_fields(ev),
            "timings": {"train_s": 0.0, "s_per_meta_iter": None, "eval_s": ev["eval_s"],
                        "finetune_s": ev["finetune_s"]}}


def oracle_metrics(config: TrainConfig, family: TaskFamily, *,
                   restarts: int = 8) -> dict[str, Any] | None:
    """Metrics of the least-squares fit of the family's own parameters; ``None`` where the
    family has no parametric form (collaborative filtering)."""
    if not supports_oracle(family):
        return None
    t0 = time.perf_counter()
    per_task = oracle_nrmse(family, restarts=restarts, seed=config.seed)
    mean, sem = summarise(per_task)
    return {**_base(config, "oracle"), "metric": "nrmse", "steps": 0, "eval_steps": None,
            "nrmse_mean": mean,
            "nrmse_sem": sem, "nrmse_per_task": per_task, "n_test_tasks": len(per_task),
            "finetune": None, "finetune_final_nrmse": mean, "finetune_best_nrmse": mean,
            "restarts": restarts,
            "timings": {"train_s": 0.0, "s_per_meta_iter": None,
                        "eval_s": time.perf_counter() - t0, "finetune_s": 0.0}}


def reference_metrics(name: str, config: TrainConfig, family: TaskFamily,
                      out_dir: Path | None = None) -> dict[str, Any] | None:
    """One reference row's metrics, written to ``out_dir/<name>/`` when given.

    Raises:
        ValueError: Unknown reference name.
    """
    metrics: dict[str, Any] | None
    if name == "no-meta":
        metrics = no_meta_metrics(config, family)
    elif name == "oracle":
        metrics = oracle_metrics(config, family)
    else:
        raise ValueError(f"Unknown reference {name!r}; expected one of {list(REFERENCES)}.")
    if metrics is not None and out_dir is not None:
        d = out_dir / name
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(d / "config.json", {**config.to_dict(), "method": name,
                                              "meta_iters": 0, "amaml_version": __version__,
                                              "reference": True})
        atomic_write_json(d / "metrics.json", metrics)
    return metrics
