"""Meta-test evaluation: nRMSE after adaptation, and the fine-tuning curve.

Protocol (the paper's, made explicit):

* **Adaptation nRMSE.** For every meta-test task, start from the learned initialisation
  and run the method's own inner loop on the support set (``algorithm.adapt``: A-MAML,
  FOMAML, Reptile and iMAML their ``steps`` solver steps, iMAML with its proximal term,
  MAML ``maml_steps``, MAML-1 one step), or ``n_steps`` steps for all when given. Then
  measure the RMSE on the task's test points. Targets are standardised, so this RMSE is
  the nRMSE. Report the mean over tasks and its standard error (std / sqrt(n_tasks),
  ``ddof=1``).
* **Fine-tuning curve.** From the same initialisation, every method alike fine-tunes
  the whole network on the support set (full batch: one step is one epoch), with plain
  gradient descent at the inner learning rate (``--finetune-optimizer gd``, this
  project's default) or with Adam (``adam``: lr 1e-3 and weight decay 1e-6 in the
  authors' evaluation, ``--protocol paper``); the nRMSE on the test points is recorded
  every ``every`` epochs, epoch 0 (the initialisation itself) included.

Tasks may have different numbers of test points (collaborative filtering); they are
then evaluated one at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._types import LossFn, Params
from ..algorithms import AbstractAlgorithm
from ..tasks import TaskFamily, TaskSet
from .build import config_loss
from .build import loss_fn as _plain_mse
from .config import TrainConfig

__all__ = ["evaluate_adaptation", "evaluate_run", "finetune_curve", "nrmse_per_task",
           "paired_difference", "summarise"]


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

def _support(tasks: TaskSet) -> tuple[Tensor, Tensor]:
    return (torch.stack([t.support_x for t in tasks]), torch.stack([t.support_y for t in tasks]))


def nrmse_per_task(model: nn.Module, params: Params, tasks: TaskSet) -> list[float]:
    """RMSE on each task's test points of its adapted parameters (leading dim = task)."""
    sizes = {int(t.test_x.shape[0]) for t in tasks}
    with torch.no_grad():
        if len(sizes) == 1:
            xt = torch.stack([t.test_x for t in tasks])
            yt = torch.stack([t.test_y for t in tasks])
            pred = torch.func.vmap(
                lambda p, x: torch.func.functional_call(model, p, (x,)))(params, xt)
            return ((pred - yt) ** 2).mean(dim=(1, 2)).sqrt().tolist()
        out = []
        for i, task in enumerate(tasks):
            p_i = {n: v[i] for n, v in params.items()}
            pred = torch.func.functional_call(model, p_i, (task.test_x,))
            out.append(float(((pred - task.test_y) ** 2).mean().sqrt()))
        return out


def evaluate_adaptation(model: nn.Module, algorithm: AbstractAlgorithm, loss_fn: LossFn,
                        tasks: TaskSet, *, n_steps: int | None = None) -> dict[str, Any]:
    """nRMSE on the test points after the method's own adaptation on each support set.

    Args:
        model: The meta-learned model (its parameters are the initialisation).
        algorithm: The method; its ``adapt`` is the inner loop used.
        loss_fn: Inner-loop loss ``loss_fn(prediction, target)``.
        tasks: Meta-test tasks.
        n_steps: Adaptation steps for every method; ``None``: the method's own.

    Returns:
        ``{"nrmse_mean", "nrmse_sem", "nrmse_per_task", "eval_steps", "n_tasks"}``.

    Raises:
        DivergenceError: The adaptation diverged.
    """
    steps = n_steps if n_steps is not None else algorithm.n_steps
    params = algorithm.adapt(model, loss_fn, _support(tasks), n_steps=steps)
    per_task = nrmse_per_task(model, params, tasks)
    mean, sem = summarise(per_task)
    return {"nrmse_mean": mean, "nrmse_sem": sem, "nrmse_per_task": per_task,
            "eval_steps": steps, "n_tasks": len(tasks)}


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


def finetune_curve(model: nn.Module, loss_fn: LossFn, tasks: TaskSet, *, lr: float,
                   epochs: int, every: int, optimizer: str = "gd", weight_decay: float = 0.0,
                   on_record: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Meta-test nRMSE while every task fine-tunes the whole network from the initialisation.

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
        on_record: Optional callback ``(epoch, nrmse_mean)``.

    Returns:
        ``{"epochs": [...], "nrmse_mean": [...], "nrmse_sem": [...], "optimizer", "lr",
        "weight_decay"}``; a diverged fine-tuning shows as ``nan`` entries (``null`` in
        JSON).
    """
    if epochs < 0 or every < 1:
        raise ValueError(f"epochs must be >= 0 and every >= 1; got {epochs}, {every}.")
    if optimizer not in ("gd", "adam"):
        raise ValueError(f"Unknown fine-tuning optimizer {optimizer!r}; expected 'gd' or "
                         "'adam'.")
    if not (lr > 0 and math.isfinite(lr)) or not weight_decay >= 0:
        raise ValueError(f"lr must be > 0 and weight_decay >= 0; got {lr}, {weight_decay}.")
    xs, ys = _support(tasks)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def task_loss(p: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(torch.func.functional_call(model, {**p, **fixed}, (x,)), y)

    grad_fn = torch.func.vmap(torch.func.grad(task_loss))
    b = len(tasks)
    params = {n: p.detach().unsqueeze(0).expand(b, *p.shape).clone()
              for n, p in model.named_parameters() if n in names}
    state = {"m": {n: torch.zeros_like(v) for n, v in params.items()},
             "v": {n: torch.zeros_like(v) for n, v in params.items()}}
    record: dict[str, Any] = {"epochs": [], "nrmse_mean": [], "nrmse_sem": [],
                              "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay}

    def log(epoch: int) -> None:
        batched = {**params, **{n: v.unsqueeze(0).expand(b, *v.shape) for n, v in fixed.items()}}
        mean, sem = summarise(nrmse_per_task(model, batched, tasks))
        record["epochs"].append(epoch)
        record["nrmse_mean"].append(mean)
        record["nrmse_sem"].append(sem)
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
    """Adaptation nRMSE and fine-tuning curve of a config's model on its meta-test tasks.

    Returns:
        What :func:`evaluate_adaptation` returns, plus ``finetune`` (the curve of
        :func:`finetune_curve`), ``eval_s`` and ``finetune_s`` (seconds).
    """
    t0 = time.perf_counter()
    result = evaluate_adaptation(model, algorithm, config_loss(config), family.test,
                                 n_steps=config.eval_steps)
    t1 = time.perf_counter()
    # Fine-tuning minimises the plain MSE whatever --loss says (the authors' evaluation).
    curve = finetune_curve(model, _plain_mse, family.test, lr=config.effective_finetune_lr,
                           epochs=config.finetune_epochs, every=config.finetune_every,
                           optimizer=config.finetune_optimizer,
                           weight_decay=config.finetune_weight_decay)
    t2 = time.perf_counter()
    result["finetune"] = curve
    result["eval_s"] = t1 - t0
    result["finetune_s"] = t2 - t1
    return result
