"""Score a meta-learned initialisation on Omniglot's own one-shot test (``amaml lake-runs``).

Each of the 20 runs of :func:`amaml.tasks.read_lake_runs` is one 20-way 1-shot episode:
the method's own inner loop adapts the initialisation on the run's 20 training images
(labels ``0 .. 19`` in the order ``class01 .. class20``), then classifies its 20 test
images, BatchNorm normalising the test batch with its own statistics (as every
classification evaluation here, the MAML convention). The score is the error over the 400
test images, with its 95% Wilson interval (a binomial interval that treats the 400 images
as independent; they are 20 runs of 20, so it is a lower bound on the uncertainty).

Beside it, every report carries:

* ``no-meta``: the config's random initialisation (seed ``2 * seed``), adapted the same way;
* ``pixel-nn``: nearest neighbour on the 28 x 28 pixels (no learning);
* ``mhd``: modified Hausdorff distance on the ink pixels (no learning; published 38.8%);
* optionally the accuracy on random N-way 1-shot episodes of the family's held-out
  alphabets (``ways`` 5 and 20), each query batch holding ``20 // ways`` images per class
  (20 images, as the runs' test batch); a network trained 20-way keeps the first ``ways``
  rows of its head there.

The published error rates on the same runs are :data:`PUBLISHED`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._types import Params
from ..algorithms import AbstractAlgorithm
from ..api import functional_call_batch
from ..tasks import (
    LakeRun,
    make_family,
    mhd_predictions,
    pixel_nn_predictions,
)
from .build import build_algorithm, build_model, config_loss
from .checkpoint import CheckpointError, load_state_file
from .config import TrainConfig
from .evaluate import ci95

__all__ = ["PUBLISHED", "PUBLISHED_SMALL2", "RUN_INPUT_SHAPE", "format_lake_report",
           "lake_report", "load_initialisation", "run_errors", "wilson_interval"]

#: Shape of one image as the network sees it: the runs are resized as the background is.
RUN_INPUT_SHAPE = (1, 28, 28)

#: Published error rates (%) on the 20 runs: (row, background it learned from, error).
#: Lake, Salakhutdinov & Tenenbaum, Science 2015, and Lake, Salakhutdinov & Tenenbaum,
#: "The Omniglot challenge: a 3-year progress report", 2019.
PUBLISHED: tuple[tuple[str, str, float], ...] = (
    ("people", "-", 4.5),
    ("Bayesian program learning", "30 alphabets", 3.3),
    ("Siamese ConvNet", "30 alphabets", 8.0),
    ("deep ConvNet", "30 alphabets", 13.5),
    ("hierarchical deep model", "30 alphabets", 34.8),
    ("modified Hausdorff distance (pixels)", "none", 38.8),
    ("Bayesian program learning", "small1 / small2", 4.3),  # 4.3 / 4.0
    ("deep ConvNet", "small1 / small2", 24.0),  # 24.0 / 22.3
)
#: The second figure of the minimal-background rows (small2), by row name.
PUBLISHED_SMALL2: dict[str, float] = {"Bayesian program learning": 4.0, "deep ConvNet": 22.3}


def wilson_interval(errors: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``errors / n`` (95% by default)."""
    if n < 1 or not 0 <= errors <= n:
        raise ValueError(f"need 0 <= errors <= n and n >= 1; got errors={errors}, n={n}.")
    p = errors / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def load_initialisation(path: str | Path) -> tuple[TrainConfig, nn.Module]:
    """The config and the model (its parameters the initialisation) of ``init.pt`` or
    ``checkpoint.pt``.

    Raises:
        CheckpointError: The file is missing, damaged, or does not fit its config.
    """
    state = load_state_file(path)
    try:
        config = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r} holds an invalid config ({err}).") from err
    model = _model_with_state(config, state["model"], path)
    return config, model


def _model_with_state(config: TrainConfig, state: dict[str, Tensor], path: str | Path,
                      ways: int | None = None) -> nn.Module:
    """The config's model with ``state`` loaded; ``ways`` below the trained ways keeps the
    first ``ways`` rows of every tensor whose leading size is the trained ways (the head)."""
    trained = int(config.ways or 0)
    try:
        target = build_model(config.replace(ways=ways) if ways else config, RUN_INPUT_SHAPE)
    except ValueError as err:
        raise CheckpointError(f"{str(path)!r} holds a {config.model} for {config.family}; "
                              f"the runs need a network of {RUN_INPUT_SHAPE} images "
                              f"({err}).") from err
    if ways is not None and ways != trained:
        shapes = {k: v.shape for k, v in target.state_dict().items()}
        state = {k: v[:ways] if v.dim() and v.shape != shapes.get(k) and v.shape[0] == trained
                 else v for k, v in state.items()}
    try:
        target.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{str(path)!r} does not fit the model of its config "
                              f"({type(err).__name__}).") from err
    return target


def _accuracy(model: nn.Module, params: Params, xq: Tensor, yq: Tensor) -> np.ndarray:
    with torch.no_grad():
        logits = functional_call_batch(model, params, xq)
    return (logits.argmax(dim=-1) == yq).double().mean(dim=1).cpu().numpy()


def run_errors(model: nn.Module, algorithm: AbstractAlgorithm, config: TrainConfig,
               runs: Sequence[LakeRun], n_steps: int) -> np.ndarray:
    """Each run's error after the method's own ``n_steps``-step adaptation on its 20
    training images, ``[len(runs)]``.

    Raises:
        ValueError: The model does not output one logit per class of a run (20).
    """
    ways = len(runs[0].labels)
    if int(config.ways or 0) != ways:
        raise ValueError(f"The runs are {ways}-way; this initialisation was meta-trained "
                         f"{config.ways}-way (its head has {config.ways} outputs): meta-train "
                         f"with --ways {ways}.")
    dtype, device = config.torch_dtype, torch.device(config.device)

    def stack(arrays: list[np.ndarray]) -> Tensor:
        return torch.from_numpy(np.stack(arrays)).to(device=device, dtype=dtype)

    xs = stack([r.support() for r in runs])
    xq = stack([r.query() for r in runs])
    ys = torch.arange(ways, device=device).expand(len(runs), -1).clone()
    yq = torch.from_numpy(np.stack([r.labels for r in runs])).to(device)
    params = algorithm.adapt(model, config_loss(config), (xs, ys), n_steps=n_steps)
    return 1.0 - _accuracy(model, params, xq, yq)


def _episodes(config: TrainConfig, ways: int, n: int) -> tuple[Tensor, ...]:
    family = make_family(config.family, shots=1, queries=max(1, 20 // ways), ways=ways,
                         n_test=n, seed=config.seed, root=config.data_dir,
                         download=config.download, dtype=config.torch_dtype)
    return family.test.batch(range(n))


def _episode_row(model: nn.Module, algorithm: AbstractAlgorithm, config: TrainConfig,
                 batch: tuple[Tensor, ...], n_steps: int) -> tuple[float, float]:
    xs, ys, xq, yq = (t.to(config.device) for t in batch)
    params = algorithm.adapt(model, config_loss(config), (xs, ys), n_steps=n_steps)
    return ci95(_accuracy(model, params, xq, yq).tolist())


def _pixel_nn_episodes(batch: tuple[Tensor, ...]) -> tuple[float, float]:
    xs, ys, xq, yq = (t.double() if t.is_floating_point() else t for t in batch)
    d = torch.cdist(xq.flatten(2), xs.flatten(2))
    pred = torch.gather(ys, 1, d.argmin(dim=2))
    return ci95((pred == yq).double().mean(dim=1).tolist())


def _summary(per_run: np.ndarray) -> dict[str, Any]:
    n = 20 * len(per_run)
    k = int(round(float(per_run.sum()) * 20))
    lo, hi = wilson_interval(k, n)
    return {"runs_error": k / n, "runs_errors_k": k, "runs_n": n, "runs_wilson95": [lo, hi],
            "runs_error_per_run": per_run.tolist()}


def lake_report(config: TrainConfig, model: nn.Module, runs: Sequence[LakeRun], *,
                eval_steps: Sequence[int], episodes: int = 0,
                episode_ways: Sequence[int] = (5, 20), baselines: bool = True,
                method: str | None = None) -> dict[str, Any]:
    """The runs' error (and held-out episode accuracy) of an initialisation and its
    references.

    Args:
        config: The run's config (its method adapts; its family gives held-out episodes).
        model: The meta-learned initialisation.
        runs: :func:`amaml.tasks.read_lake_runs`.
        eval_steps: Adaptation step counts; one ``meta-learned`` and one ``no-meta`` row
            each.
        episodes: Held-out episodes per ``ways`` of ``episode_ways`` (0: none).
        episode_ways: Classes of the held-out episodes.
        baselines: Add the ``pixel-nn`` and ``mhd`` rows.
        method: The method adapting (default ``config.method``).

    Returns:
        ``{"config", "rows": [{"row", "method", "eval_steps", "runs_error",
        "runs_wilson95", "runs_error_per_run", "episodes_<W>way": [mean, ci95] ...}],
        "published", "seconds"}``.
    """
    t0 = time.perf_counter()
    algorithm = build_algorithm(config.replace(method=method) if method else config)
    blank = build_model(config, RUN_INPUT_SHAPE)  # the initialisation before meta-training
    batches = {w: _episodes(config, w, episodes) for w in episode_ways} if episodes else {}
    heads = {w: (_model_with_state(config, model.state_dict(), "", ways=w),
                 _model_with_state(config, blank.state_dict(), "", ways=w)) for w in batches}
    rows: list[dict[str, Any]] = []
    for steps in eval_steps:
        for name, net in (("meta-learned", model), ("no-meta", blank)):
            row = {"row": name, "method": method or config.method, "eval_steps": steps,
                   **_summary(run_errors(net, algorithm, config, runs, steps))}
            for w, batch in batches.items():
                head = heads[w][0 if name == "meta-learned" else 1]
                row[f"episodes_{w}way"] = list(_episode_row(head, algorithm, config, batch,
                                                            steps))
            rows.append(row)
    if baselines:
        nn_row = {"row": "pixel-nn", "method": "-", "eval_steps": None, **_summary(
            np.array([(pixel_nn_predictions(r) != r.labels).mean() for r in runs]))}
        for w, batch in batches.items():
            nn_row[f"episodes_{w}way"] = list(_pixel_nn_episodes(batch))
        rows.append(nn_row)
        rows.append({"row": "mhd", "method": "-", "eval_steps": None, **_summary(
            np.array([(mhd_predictions(r) != r.labels).mean() for r in runs]))})
    return {"config": config.to_dict(), "rows": rows, "episodes": episodes,
            "episode_ways": list(batches), "published": [list(p) for p in PUBLISHED],
            "seconds": time.perf_counter() - t0}


def format_lake_report(report: dict[str, Any]) -> str:
    """The report as a Markdown table, the published rows below it."""
    ways = report.get("episode_ways", [])
    head = ["row", "method", "steps", "runs error % [95% Wilson]"]
    head += [f"held-out {w}-way 1-shot acc. % (± 95% CI, {report['episodes']} ep.)"
             for w in ways]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        lo, hi = r["runs_wilson95"]
        cells = [r["row"], r["method"], "-" if r["eval_steps"] is None else str(r["eval_steps"]),
                 f"{100 * r['runs_error']:.2f} [{100 * lo:.1f}, {100 * hi:.1f}]"]
        for w in ways:
            acc = r.get(f"episodes_{w}way")
            cells.append("-" if acc is None else f"{100 * acc[0]:.2f} ± {100 * acc[1]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Published error rates on the same 20 runs (Lake et al. 2015; 2019):")
    for name, background, err in PUBLISHED:
        second = PUBLISHED_SMALL2.get(name) if "small" in background else None
        figure = f"{err} / {second}" if second is not None else f"{err}"
        lines.append(f"- {name} (background: {background}): {figure} %")
    return "\n".join(lines) + "\n"
