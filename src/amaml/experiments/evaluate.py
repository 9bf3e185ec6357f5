"""Meta-test evaluation: the error after adaptation, and the fine-tuning curve.

The metric follows from the family's kind (:func:`metric_of`):

* **regression**: nRMSE on each task's test points (targets are standardised, so the
  RMSE is the nRMSE); mean over tasks and its standard error (std / sqrt(n), ``ddof=1``):
  ``nrmse_mean``, ``nrmse_sem``, ``nrmse_per_task``.
* **classification**: accuracy on each episode's query set (an episode's test set),
  predicted with the adapted parameters and BatchNorm on the query batch's own statistics
  (the MAML convention); mean over the meta-test episodes and its 95% confidence interval
  1.96 * std / sqrt(n) (``ddof=1``, the field's convention): ``accuracy_mean``,
  ``accuracy_ci95``, ``accuracy_per_task``.

Protocol (the paper's, made explicit):

* **After adaptation.** For every meta-test task, start from the learned initialisation
  and run the method's own inner loop on the support set (``algorithm.adapt``: A-MAML,
  FOMAML, Reptile and iMAML their ``steps`` solver steps, iMAML with its proximal term,
  MAML ``maml_steps``, MAML-1 one step), or ``n_steps`` steps for all when given. Then
  measure the metric on the task's test points.
* **Fine-tuning curve.** From the same initialisation, every method alike fine-tunes
  the whole network on the support set (full batch: one step is one epoch), with plain
  gradient descent at the inner learning rate (``--finetune-optimizer gd``, this
  project's default) or with Adam (``adam``: lr 1e-3 and weight decay 1e-6 in the
  authors' evaluation, ``--protocol paper``); the metric on the test points is recorded
  every ``every`` epochs, epoch 0 (the initialisation itself) included.

Regression tasks may have different numbers of test points (collaborative filtering);
they are then evaluated one at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._types import LossFn, Params
from ..algorithms import AbstractAlgorithm
from ..api import functional_call, functional_call_batch
from ..tasks import EpisodeSet, TaskFamily, TaskSet
from .build import config_loss
from .build import loss_fn as _plain_mse
from .config import TrainConfig

__all__ = ["ACCURACY", "METRICS", "NRMSE", "Metric", "accuracy_per_task", "ci95",
           "evaluate_adaptation", "evaluate_run", "evaluation_fields", "finetune_curve",
           "metric_of", "nrmse_per_task", "paired_difference", "summarise"]

#: A meta-test split: regression tasks or classification episodes.
Split = TaskSet | EpisodeSet


def summarise(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (``ddof=1``; 0 for one value) of a list of numbers."""
    t = torch.tensor(values, dtype=torch.float64)
    mean = float(t.mean())
    sem = float(t.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return mean, sem



def paired_difference(values: Sequence[float] | None,
                      reference: Sequence[float] | None) -> tuple[float, float] | None:
    """Mean and standard error of ``values - reference`` over the same meta-test tasks.

    Every method is evaluated on the same tasks, so the spread between tasks (large for
    the synthetic families) cancels in the difference; ``None`` where either is missing,
    of other lengths, or not finite.
    """
    if not values or not reference or len(values) != len(reference):
        return None
    diffs = [a - b for a, b in zip(values, reference, strict=True)]
    if not all(math.isfinite(d) for d in diffs):
        return None
    return summarise(diffs)


def ci95(values: list[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width ``1.96 * std / sqrt(n)`` (``ddof=1``; 0 for one
    value): the few-shot classification convention."""
    mean, sem = summarise(values)
    return mean, 1.96 * sem


def _support(tasks: Split) -> tuple[Tensor, Tensor]:
    if isinstance(tasks, EpisodeSet):
        xs, ys, _, _ = tasks.batch(range(len(tasks)))
        return xs, ys
    return (torch.stack([t.support_x for t in tasks]), torch.stack([t.support_y for t in tasks]))


def accuracy_per_task(model: nn.Module, params: Params, episodes: EpisodeSet) -> list[float]:
    """Accuracy on each episode's query set of its adapted parameters (leading dim = task).

    Logits come from :func:`amaml.functional_call_batch` with BatchNorm normalising each
    episode's query batch with its own statistics (transductive, as in MAML).
    """
    _, _, xq, yq = episodes.batch(range(len(episodes)))
    return _accuracy(model, params, xq, yq)


#: Episodes scored per forward pass: bounds the activations of a large meta-test set.
_SCORE_CHUNK = 32


def _accuracy(model: nn.Module, params: Params, xq: Tensor, yq: Tensor) -> list[float]:
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, xq.shape[0], _SCORE_CHUNK):
            part = slice(start, start + _SCORE_CHUNK)
            logits = functional_call_batch(model, {n: v[part] for n, v in params.items()},
                                           xq[part])
            out += (logits.argmax(dim=-1) == yq[part]).double().mean(dim=1).tolist()
    return out


def nrmse_per_task(model: nn.Module, params: Params, tasks: TaskSet) -> list[float]:
    """RMSE on each task's test points of its adapted parameters (leading dim = task)."""
    sizes = {int(t.test_x.shape[0]) for t in tasks}
    with torch.no_grad():
        if len(sizes) == 1:
            xt = torch.stack([t.test_x for t in tasks])
            yt = torch.stack([t.test_y for t in tasks])
            pred = functional_call_batch(model, params, xt)
            return ((pred - yt) ** 2).mean(dim=(1, 2)).sqrt().tolist()
        out = []
        for i, task in enumerate(tasks):
            p_i = {n: v[i] for n, v in params.items()}
            pred = torch.func.functional_call(model, p_i, (task.test_x,))
            out.append(float(((pred - task.test_y) ** 2).mean().sqrt()))
        return out


@dataclass(frozen=True)
class Metric:
    """What a meta-test task is scored by, and how scores are summarised.

    Attributes:
        name: ``"nrmse"`` or ``"accuracy"``: the prefix of the keys ``<name>_mean``,
            ``<name>_<spread>``, ``<name>_per_task``, ``finetune_final_<name>`` and
            ``finetune_best_<name>`` in metrics.json and results.json.
        spread: ``"sem"`` (standard error) or ``"ci95"`` (95% confidence half-width).
        higher_is_better: Accuracy: True; nRMSE: False.
        label: Axis and table label.
        per_task: ``per_task(model, params, split)``: one score per task.
        summary: ``summary(scores) -> (mean, spread)``.
    """

    name: str
    spread: str
    higher_is_better: bool
    label: str
    per_task: Callable[[nn.Module, Params, Any], list[float]]
    summary: Callable[[list[float]], tuple[float, float]]

    @property
    def mean_key(self) -> str:
        """``<name>_mean``."""
        return f"{self.name}_mean"

    @property
    def spread_key(self) -> str:
        """``<name>_<spread>``."""
        return f"{self.name}_{self.spread}"

    @property
    def per_task_key(self) -> str:
        """``<name>_per_task``."""
        return f"{self.name}_per_task"

    def best(self, values: Sequence[float | None]) -> float | None:
        """The best finite value (max or min), ``None`` if there is none."""
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return None
        return max(finite) if self.higher_is_better else min(finite)


#: nRMSE (regression): mean and standard error over tasks.
NRMSE = Metric("nrmse", "sem", False, "nRMSE", nrmse_per_task, summarise)
#: Query accuracy (classification): mean and 95% confidence interval over episodes.
ACCURACY = Metric("accuracy", "ci95", True, "accuracy", accuracy_per_task, ci95)
#: Family kind -> its metric.
METRICS: dict[str, Metric] = {"regression": NRMSE, "classification": ACCURACY}


def metric_of(kind_or_record: str | dict[str, Any]) -> Metric:
    """The metric of a family kind, or of a record/metrics dict (its ``"metric"`` name;
    records written before classification have none and are nRMSE).

    Raises:
        ValueError: Unknown kind or metric name.
    """
    if isinstance(kind_or_record, dict):
        name = kind_or_record.get("metric", "nrmse")
        by_name = {m.name: m for m in METRICS.values()}
        if name not in by_name:
            raise ValueError(f"Unknown metric {name!r}; expected one of {sorted(by_name)}.")
        return by_name[name]
    if kind_or_record not in METRICS:
        raise ValueError(f"Unknown family kind {kind_or_record!r}; expected one of "
                         f"{sorted(METRICS)}.")
    return METRICS[kind_or_record]


def _metric_of_split(tasks: Split) -> Metric:
    return ACCURACY if isinstance(tasks, EpisodeSet) else NRMSE


def evaluate_adaptation(model: nn.Module, algorithm: AbstractAlgorithm, loss_fn: LossFn,
                        tasks: Split, *, n_steps: int | None = None) -> dict[str, Any]:
    """The metric on the test points after the method's own adaptation on each support set.

    Args:
        model: The meta-learned model (its parameters are the initialisation).
        algorithm: The method; its ``adapt`` is the inner loop used.
        loss_fn: Inner-loop loss ``loss_fn(prediction, target)``.
        tasks: Meta-test tasks (:class:`TaskSet`, scored by nRMSE) or episodes
            (:class:`EpisodeSet`, scored by query accuracy).
        n_steps: Adaptation steps for every method; ``None``: the method's own.

    Returns:
        ``{"metric", "<m>_mean", "<m>_<spread>", "<m>_per_task", "eval_steps",
        "n_tasks"}``: ``nrmse_mean``/``nrmse_sem`` or ``accuracy_mean``/``accuracy_ci95``.

    Raises:
        DivergenceError: The adaptation diverged.
    """
    metric = _metric_of_split(tasks)
    steps = n_steps if n_steps is not None else algorithm.n_steps
    params = algorithm.adapt(model, loss_fn, _support(tasks), n_steps=steps)
    per_task = metric.per_task(model, params, tasks)
    mean, spread = metric.summary(per_task)
    return {"metric": metric.name, metric.mean_key: mean, metric.spread_key: spread,
            metric.per_task_key: per_task, "eval_steps": steps, "n_tasks": len(tasks)}


def _adam_update(params: Params, grads: Params, state: dict[str, Params], step: int, *,
                 lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> Params:
    """One step of Adam, elementwise on every task at once, as ``torch.optim.Adam`` does it.

    ``weight_decay`` is an L2 penalty added to the gradient (not AdamW's decoupled decay);
    ``state`` holds the first and second moments ``"m"`` and ``"v"`` and is updated in place.
    """
    b1, b2 = betas
    c1, c2 = 1 - b1 ** step, 1 - b2 ** step
    out = {}
    for n, p in params.items():
        g = grads[n] + weight_decay * p if weight_decay else grads[n]
        m = state["m"][n].mul_(b1).add_(g, alpha=1 - b1)
        v = state["v"][n].mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(c2)).add_(eps)
        out[n] = p - (lr / c1) * m / denom
    return out


def finetune_curve(model: nn.Module, loss_fn: LossFn, tasks: Split, *, lr: float,
                   epochs: int, every: int, optimizer: str = "gd", weight_decay: float = 0.0,
                   on_record: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Meta-test metric while every task fine-tunes the whole network from the
    initialisation (nRMSE for :class:`TaskSet`, query accuracy for :class:`EpisodeSet`).

    All tasks run together (one batched gradient per epoch), each with its own optimiser
    state: the same numbers as fine-tuning each task alone with ``torch.optim.SGD`` or
    ``torch.optim.Adam`` (tested to 1e-6).

    Args:
        model: Its parameters are the starting point.
        loss_fn: Support loss.
        tasks: Meta-test tasks.
        lr: Learning rate of the fine-tuning optimiser.
        epochs: Number E of full-batch steps (>= 0).
        every: Record every ``every`` epochs (and at epoch 0 and E).
        optimizer: ``"gd"`` (plain gradient descent) or ``"adam"`` (betas 0.9, 0.999,
            eps 1e-8: the defaults of ``torch.optim.Adam``, the authors' evaluation).
        weight_decay: L2 penalty added to the gradient (``torch.optim``'s
            ``weight_decay``), >= 0.
        on_record: Optional callback ``(epoch, mean)``.

    Returns:
        ``{"metric", "epochs": [...], "<m>_mean": [...], "<m>_<spread>": [...],
        "optimizer", "lr", "weight_decay"}`` (``nrmse_mean``/``nrmse_sem`` or
        ``accuracy_mean``/``accuracy_ci95``); a diverged fine-tuning shows as ``nan``
        entries (``null`` in JSON).

    BatchNorm layers normalise each batch with its own statistics (support batch while
    fine-tuning, query batch when scoring) and their running statistics are not updated.
    """
    if epochs < 0 or every < 1:
        raise ValueError(f"epochs must be >= 0 and every >= 1; got {epochs}, {every}.")
    if optimizer not in ("gd", "adam"):
        raise ValueError(f"Unknown fine-tuning optimizer {optimizer!r}; expected 'gd' or "
                         "'adam'.")
    if not (lr > 0 and math.isfinite(lr)) or not weight_decay >= 0:
        raise ValueError(f"lr must be > 0 and weight_decay >= 0; got {lr}, {weight_decay}.")
    metric = _metric_of_split(tasks)
    if isinstance(tasks, EpisodeSet):  # render the episodes once, not at every record
        xs, ys, xq, yq = tasks.batch(range(len(tasks)))

        def score(p: Params) -> list[float]:
            return _accuracy(model, p, xq, yq)
    else:
        xs, ys = _support(tasks)

        def score(p: Params) -> list[float]:
            return nrmse_per_task(model, p, tasks)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def task_loss(p: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, {**p, **fixed}, x), y)

    grad_fn = torch.func.vmap(torch.func.grad(task_loss))
    b = len(tasks)
    params = {n: p.detach().unsqueeze(0).expand(b, *p.shape).clone()
              for n, p in model.named_parameters() if n in names}
    state = {"m": {n: torch.zeros_like(v) for n, v in params.items()},
             "v": {n: torch.zeros_like(v) for n, v in params.items()}}
    record: dict[str, Any] = {"metric": metric.name, "epochs": [], metric.mean_key: [],
                              metric.spread_key: [], "optimizer": optimizer, "lr": lr,
                              "weight_decay": weight_decay}

    def log(epoch: int) -> None:
        batched = {**params, **{n: v.unsqueeze(0).expand(b, *v.shape) for n, v in fixed.items()}}
        mean, spread = metric.summary(score(batched))
        record["epochs"].append(epoch)
        record[metric.mean_key].append(mean)
        record[metric.spread_key].append(spread)
        if on_record is not None:
            on_record(epoch, mean)

    log(0)
    with torch.no_grad():
        for epoch in range(1, epochs + 1):
            grads = grad_fn(params, xs, ys)
            if optimizer == "adam":
                params = _adam_update(params, grads, state, epoch, lr=lr,
                                      weight_decay=weight_decay)
            else:
                params = {n: params[n] - lr * (grads[n] + weight_decay * params[n]
                                               if weight_decay else grads[n]) for n in names}
            if epoch % every == 0 or epoch == epochs:
                log(epoch)
    return record


def evaluate_run(config: TrainConfig, model: nn.Module, family: TaskFamily,
                 algorithm: AbstractAlgorithm) -> dict[str, Any]:
    """The metric after adaptation and the fine-tuning curve of a config's model on its
    meta-test tasks (nRMSE for regression, query accuracy for classification).

    Returns:
        What :func:`evaluate_adaptation` returns, plus ``finetune`` (the curve of
        :func:`finetune_curve`), ``eval_s`` and ``finetune_s`` (seconds).
    """
    t0 = time.perf_counter()
    result = evaluate_adaptation(model, algorithm, config_loss(config), family.test,
                                 n_steps=config.eval_steps)
    t1 = time.perf_counter()
    # Regression fine-tuning minimises the plain MSE whatever --loss says (the authors'
    # evaluation); classification its one loss, the cross-entropy.
    ft_loss = _plain_mse if family.kind == "regression" else config_loss(config)
    curve = finetune_curve(model, ft_loss, family.test, lr=config.effective_finetune_lr,
                           epochs=int(config.finetune_epochs or 0),
                           every=int(config.finetune_every or 1),
                           optimizer=config.finetune_optimizer,
                           weight_decay=config.finetune_weight_decay)
    t2 = time.perf_counter()
    result["finetune"] = curve
    result["eval_s"] = t1 - t0
    result["finetune_s"] = t2 - t1
    return result


def evaluation_fields(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The metric's entries of metrics.json from :func:`evaluate_run`'s result: ``metric``,
    ``<m>_mean``, ``<m>_<spread>``, ``<m>_per_task``, ``n_test_tasks``, ``finetune``,
    ``finetune_final_<m>`` and ``finetune_best_<m>`` (``nrmse``: lowest; ``accuracy``:
    highest)."""
    m = metric_of(evaluation)
    ft = evaluation["finetune"]
    return {"metric": m.name, m.mean_key: evaluation[m.mean_key],
            m.spread_key: evaluation[m.spread_key], m.per_task_key: evaluation[m.per_task_key],
            "n_test_tasks": evaluation["n_tasks"], "finetune": ft,
            f"finetune_final_{m.name}": ft[m.mean_key][-1],
            f"finetune_best_{m.name}": m.best(ft[m.mean_key])}
