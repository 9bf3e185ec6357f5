"""The meta-training loop: draw a meta-batch, accumulate its meta-gradient, step.

One meta-iteration draws a meta-batch from a seeded ``torch.Generator`` (the same on
every rank): ``meta_batch`` distinct meta-training tasks (regression, then a fresh episode
from each pool with ``--pool``) or ``meta_batch`` fresh N-way episodes (classification),
as :meth:`~amaml.tasks.TaskFamily.sample_train_batch` draws them; it adapts this rank's
shard of them (``shard_indices``), accumulates ``1 / meta_batch`` times each task's
meta-direction into ``.grad`` (``algorithm.meta_step``), sums the gradients over ranks
(``all_reduce_grads``) and takes an optimiser step. A non-finite meta-loss or
meta-gradient stops the loop before the step (:class:`MetaLossError`); a signal stops it
after the iteration is saved (:class:`~.signals.TrainingInterrupted`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._extras import import_extra
from ..algorithms import AbstractAlgorithm, TaskBatch
from ..tasks import EpisodeSet, TaskFamily, draw_episode
from .build import config_loss
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_grads, all_reduce_sum, shard_indices
from .signals import StopFlag, TrainingInterrupted

__all__ = ["MetaLossError", "RunState", "meta_train"]


class MetaLossError(FloatingPointError):
    """The meta-loss became non-finite (the meta-step or the inner loop is too large).

    Attributes:
        iteration: The meta-iteration (1-based) whose meta-loss was not finite.
    """

    def __init__(self, iteration: int, value: float, what: str = "meta-loss") -> None:
        self.iteration = iteration
        super().__init__(f"The {what} became {value} at meta-iteration {iteration}; use a "
                         "smaller --meta-lr or --inner-lr (the initialisation was not updated "
                         "with it).")


@dataclass
class RunState:
    """What a run carries from one meta-iteration to the next, and into its checkpoint.

    Attributes:
        model: The model whose parameters are the initialisation.
        optimizer: The meta-optimiser.
        generator: The meta-batch (and episode) generator.
        history: One row per meta-iteration done: iteration, meta_loss, running_loss,
            elapsed_s.
        iteration: Meta-iterations done.
        prior_s: Training seconds spent before this process (a resumed run).
        resumes: Times the run was resumed.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    history: list[dict[str, Any]] = field(default_factory=list)
    iteration: int = 0
    prior_s: float = 0.0
    resumes: int = 0


def _nonfinite_grad(model: nn.Module) -> str | None:
    """The name of the first parameter whose ``.grad`` holds a NaN or an infinity, if any."""
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not grads:
        return None
    flags = torch.stack([torch.isfinite(g).all() for _, g in grads])
    if bool(flags.all()):
        return None
    return grads[int((~flags).nonzero()[0])][0]


def _draw_batch(config: TrainConfig, family: TaskFamily, generator: torch.Generator,
                info: DistInfo) -> TaskBatch:
    """This rank's share of one meta-batch."""
    if info.world_size == 1:
        return family.sample_train_batch(config.meta_batch, generator)
    # Every rank draws the same indices, then renders only its own shard.
    if isinstance(family.train, EpisodeSet):
        drawn = family.train.sample_indices(config.meta_batch, generator)
        return family.train.batch(shard_indices(drawn.tolist(), info))
    draw = torch.randperm(len(family.train), generator=generator)[:config.meta_batch]
    batch = family.train.batch(shard_indices(draw.tolist(), info))
    if config.pool is not None:  # a fresh support and query set from each pool
        batch = draw_episode(batch, config.shots, config.queries, generator)
    return batch


def _meta_iteration(config: TrainConfig, algorithm: AbstractAlgorithm, family: TaskFamily,
                    run: RunState, info: DistInfo, it: int) -> float:
    """One meta-iteration (0-based ``it``): the meta-loss, after the optimiser step."""
    batch = _draw_batch(config, family, run.generator, info)
    run.optimizer.zero_grad(set_to_none=True)
    losses = algorithm.meta_step(run.model, config_loss(config), batch,
                                 scale=1.0 / config.meta_batch)
    all_reduce_grads(run.model, info)
    total = all_reduce_sum(losses.detach().double().sum().reshape(1).cpu(), info)
    meta_loss = float(total) / config.meta_batch
    if not math.isfinite(meta_loss):  # stop before the optimiser spreads it into theta
        raise MetaLossError(it + 1, meta_loss)
    bad = _nonfinite_grad(run.model)
    if bad is not None:
        raise MetaLossError(it + 1, float("nan"), what=f"meta-gradient of {bad!r}")
    run.optimizer.step()
    return meta_loss


def meta_train(config: TrainConfig, algorithm: AbstractAlgorithm, family: TaskFamily,
               run: RunState, info: DistInfo, *, flag: StopFlag,
               save: Callable[[int, float], None], log: Callable[[dict[str, Any]], None],
               out_dir: Path | None, progress: bool = True, position: int = 0) -> float:
    """Meta-train from ``run.iteration`` to ``config.meta_iters``; the training seconds.

    Args:
        config: The run's settings.
        algorithm: Gives each task's meta-direction.
        family: The tasks.
        run: Updated in place (``history`` gets one row per iteration).
        info: This process's place in the job.
        flag: Set by a signal: save and stop after the current iteration.
        save: ``save(iteration, elapsed_s)`` writes a checkpoint (every
            ``config.save_every`` iterations, at the last one, and on a signal).
        log: ``log(row)`` every ``config.log_every`` iterations.
        out_dir: The run directory, named by :class:`TrainingInterrupted`.
        progress: Show a tqdm bar (rank 0 only).
        position: Line of the bar.

    Raises:
        MetaLossError: A non-finite meta-loss or meta-gradient (before the step).
        TrainingInterrupted: A signal on any rank, after saving.
    """
    tqdm = import_extra("tqdm.auto", "amaml's progress bars").tqdm

    t0 = time.perf_counter()
    bar = tqdm(total=config.meta_iters, initial=run.iteration, desc=config.method, unit="it",
               disable=not (progress and info.is_main), position=position,
               leave=position == 0, dynamic_ncols=True)
    running = run.history[-1]["running_loss"] if run.history else None
    try:
        for it in range(run.iteration, config.meta_iters):
            meta_loss = _meta_iteration(config, algorithm, family, run, info, it)
            running = meta_loss if running is None or not math.isfinite(running) \
                else 0.9 * running + 0.1 * meta_loss
            elapsed = run.prior_s + time.perf_counter() - t0
            row = {"iteration": it + 1, "meta_loss": meta_loss, "running_loss": running,
                   "elapsed_s": elapsed}
            run.history.append(row)
            run.iteration = it + 1
            if (it + 1) % config.log_every == 0:
                log(row)
            bar.update(1)
            bar.set_postfix(meta_loss=f"{running:.4g}", refresh=False)
            stop = torch.tensor([1.0 if flag.signal_name else 0.0])
            stop_any = float(all_reduce_sum(stop, info)) > 0
            last = it + 1 == config.meta_iters
            periodic = config.save_every > 0 and (it + 1) % config.save_every == 0
            if stop_any or last or periodic:
                save(it + 1, elapsed)
            if stop_any:
                raise TrainingInterrupted(out_dir, it + 1, flag.signal_name or "SIGTERM")
    finally:
        bar.close()
    return run.prior_s + time.perf_counter() - t0
