"""Meta-training one method: :func:`train`, the function behind ``amaml train``.

The run builds its tasks, model and algorithm from the config (:mod:`.build`), meta-trains
them (:mod:`.loop`), evaluates the result on the meta-test tasks (:mod:`.evaluate`) and
writes it. Nothing uses the global RNG: the tasks, the initialisation and the draws
depend on ``config.seed`` alone.

A run directory (``out``, see :mod:`.rundir`) holds::

    config.json          the config, amaml/torch versions, the family's facts
    checkpoint.pt        resumable state, rewritten atomically every save_every
                         iterations, at the end, and on SIGINT/SIGTERM
    metrics.jsonl        one line per logged iteration: iteration, meta_loss, elapsed_s
    metrics.json         final metrics: nRMSE mean/s.e. (regression) or query accuracy
                         mean/95% CI (classification), meta-loss history, fine-tuning
                         curve, timings
    init.pt              the learned initialisation (read by ``amaml eval --checkpoint``)
    training_curve.png   meta-loss against iterations
    .lock                while a process is using the directory

Only rank 0 writes (and locks). A checkpointed run killed at any moment (even by
SIGKILL) and resumed ends with exactly the same initialisation as an uninterrupted run
(CPU).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..algorithms import AbstractAlgorithm
from ..tasks import TaskFamily
from .build import (
    batch_generator,
    build_algorithm,
    build_family,
    build_model,
    config_loss,
    loss_fn,
    make_meta_optimizer,
)
from .checkpoint import (
    INIT_FORMAT,
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    jsonable,
    save_checkpoint,
)
from .config import TrainConfig
from .distributed import DistInfo, barrier, init_distributed
from .evaluate import evaluate_run, evaluation_fields, metric_of
from .loop import MetaLossError, RunState, meta_train
from .plots import plot_finetune, plot_training_curve
from .references import REFERENCES, reference_metrics
from .rundir import (
    CHECKPOINT_FILE,
    INIT_FILE,
    RunDirError,
    RunDirLock,
    check_resumable,
    prepare_run_dir,
    resume_config,
)
from .signals import StopFlag, TrainingInterrupted, catch_signals

__all__ = [
    "CHECKPOINT_FILE", "INIT_FILE", "MetaLossError", "RunDirError", "TrainResult",
    "TrainingInterrupted", "build_algorithm", "build_family", "build_model", "config_loss",
    "evaluate_run", "loss_fn", "resume_config", "train",
]


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        config: The run's config.
        model: The meta-learned model (its parameters are the initialisation).
        metrics: The content of ``metrics.json`` (rank 0; other ranks get no evaluation).
        out_dir: The run directory, if any.
    """

    config: TrainConfig
    model: nn.Module
    metrics: dict[str, Any]
    out_dir: Path | None


def train(config: TrainConfig, out: str | os.PathLike[str] | None = None, *,
          resume: bool = False, family: TaskFamily | None = None, progress: bool = True,
          progress_position: int = 0, handle_signals: bool = True,
          dist_info: DistInfo | None = None, references: bool = False) -> TrainResult:
    """Meta-train an initialisation, evaluate it on the meta-test tasks, write the run.

    Args:
        config: The run's settings.
        out: Run directory (created); ``None`` writes nothing and cannot be resumed.
            It is locked while the run lasts (rank 0 only).
        resume: Continue the run saved in ``out``. The config must equal the
            checkpoint's except for the fields of
            :data:`~amaml.experiments.config.RESUME_MUTABLE` (``data_dir``,
            ``download``, ``save_every``, ``compile``).
            Resuming a finished run returns its saved metrics without recomputing.
        family: Prebuilt tasks of this config (saves rebuilding them, e.g. in a comparison).
        progress: Show a tqdm bar (rank 0 only).
        progress_position: Line of the bar (nested bars in a comparison).
        handle_signals: Catch SIGINT/SIGTERM (main thread only) to checkpoint and stop.
        dist_info: Process group (``None``: initialise from the torchrun environment, or
            a single process).
        references: Also evaluate the reference rows (``no-meta``, ``oracle`` where it
            applies): their metric goes into ``metrics["references"]`` and the fine-tuning
            curves, the run's beside ``no-meta``'s, into ``out/finetune.png``.

    Returns:
        The :class:`TrainResult`.

    Raises:
        RunDirError: ``out`` already holds a run (without ``resume``), is in use by
            another process, or has no checkpoint (with ``resume``).
        CheckpointError: The checkpoint is corrupted, foreign, or its config differs.
        DataError: Missing or malformed data.
        DivergenceError: An inner loop diverged (its ``step`` says where).
        MetaLossError: The meta-loss or the meta-gradient became non-finite.
        TrainingInterrupted: SIGINT/SIGTERM; the checkpoint was saved first.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig; got {type(config).__name__}.")
    if resume and out is None:
        raise RunDirError("resume needs the run directory: pass --out DIR with --resume.")
    info = dist_info if dist_info is not None else init_distributed(config.device)
    out_dir = Path(out) if out is not None else None
    lock = RunDirLock(out_dir) if out_dir is not None and info.is_main \
        else contextlib.nullcontext()
    with lock:
        state = prepare_run_dir(out_dir, resume) if out_dir is not None else None
        if state is not None and out_dir is not None:
            config = check_resumable(config, state, out_dir / CHECKPOINT_FILE)
            if state["finished"] and (out_dir / "metrics.json").exists():
                return _finished_result(config, state, out_dir)
        if family is None:
            family = _build_family_once(config, info)
        return _train(config, family, state, out_dir, info, progress=progress,
                      position=progress_position, handle_signals=handle_signals,
                      references=references)


def _build_family_once(config: TrainConfig, info: DistInfo) -> TaskFamily:
    """The family, downloaded by rank 0 alone when data may be downloaded."""
    if info.active and config.download and not info.is_main:
        barrier(info)  # let rank 0 download first
    family = build_family(config)
    if info.active and config.download and info.is_main:
        barrier(info)
    return family


def _restore(config: TrainConfig, family: TaskFamily, state: dict[str, Any] | None,
             out_dir: Path | None) -> RunState:
    """A fresh run's state, or the checkpoint's."""
    n_train = len(family.train)
    if config.meta_batch > n_train:
        raise ValueError(f"meta_batch (--meta-batch) is {config.meta_batch} but the family has "
                         f"only {n_train} meta-training tasks; use --meta-batch <= {n_train}.")
    model = build_model(config, family.input_shape)
    run = RunState(model, make_meta_optimizer(config, model), batch_generator(config))
    if state is None:
        return run
    try:
        model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.generator.set_state(state["generator"])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"Checkpoint in {str(out_dir)!r} does not fit this model or "
                              f"optimiser ({type(err).__name__}: {err}).") from err
    run.iteration, run.history = int(state["iteration"]), list(state["history"])
    run.prior_s = float(state.get("train_s", 0.0))
    run.resumes = int(state.get("resumes", 0)) + 1
    return run


def _train(config: TrainConfig, family: TaskFamily, state: dict[str, Any] | None,
           out_dir: Path | None, info: DistInfo, *, progress: bool, position: int,
           handle_signals: bool, references: bool) -> TrainResult:
    """:func:`train` once the directory is checked (and locked) and the tasks are built."""
    algorithm = build_algorithm(config)
    run = _restore(config, family, state, out_dir)
    files = _RunFiles(out_dir, config, run, info) if out_dir is not None and info.is_main \
        else None
    barrier(info)  # every rank has checked the directory before anyone writes
    if files is not None:
        files.start(family, fresh=state is None)
    flag = StopFlag()
    try:
        with catch_signals(flag, handle_signals):
            train_s = meta_train(
                config, algorithm, family, run, info, flag=flag,
                save=lambda it, s: files.save(it, False, s) if files else None,
                log=files.log if files else lambda row: None, out_dir=out_dir,
                progress=progress, position=position)
    except BaseException:
        if files is not None:
            files.remove_created()
        raise
    if not info.is_main:
        return TrainResult(config, run.model, {}, out_dir)
    evaluation = evaluate_run(config, run.model, family, algorithm)
    metrics = _metrics(config, algorithm, run, evaluation, train_s, info)
    refs = _references(config, family) if references else {}
    if refs:
        m = metric_of(metrics)
        metrics["references"] = {n: {k: r[k] for k in (m.mean_key, m.spread_key,
                                                       f"finetune_final_{m.name}")}
                                 for n, r in refs.items()}
    if files is not None:
        files.finish(family, metrics, refs, train_s)
    return TrainResult(config, run.model, metrics, out_dir)


def _references(config: TrainConfig, family: TaskFamily) -> dict[str, dict[str, Any]]:
    return {n: r for n in REFERENCES if (r := reference_metrics(n, config, family)) is not None}


def _logged(history: list[dict[str, Any]], every: int) -> list[dict[str, Any]]:
    return [h for h in history if h["iteration"] % every == 0]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(jsonable(r)) + "\n" for r in rows))


class _RunFiles:
    """The files of one run in its directory (rank 0 only)."""

    def __init__(self, out_dir: Path, config: TrainConfig, run: RunState,
                 info: DistInfo) -> None:
        self.out_dir, self.config, self.run, self.info = out_dir, config, run, info
        self.created: list[Path] = []  # removed if the run fails before its first checkpoint
        self.input_shape: tuple[int, ...] = ()

    def start(self, family: TaskFamily, *, fresh: bool) -> None:
        """Write ``config.json`` (a fresh run) and ``metrics.jsonl`` (the history so far)."""
        self.input_shape = family.input_shape
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            atomic_write_json(self.out_dir / "config.json", {
                **self.config.to_dict(), "amaml_version": __version__,
                "torch_version": torch.__version__, "world_size": self.info.world_size,
                "family_info": family.info})
            self.created.append(self.out_dir / "config.json")
        for stale in self.out_dir.glob(".*.tmp*"):  # left by a writer killed mid-write
            stale.unlink()
        _write_jsonl(self.out_dir / "metrics.jsonl",
                     _logged(self.run.history, self.config.log_every))
        self.created.append(self.out_dir / "metrics.jsonl")

    def log(self, row: dict[str, Any]) -> None:
        """Append one row to ``metrics.jsonl``."""
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(jsonable(row)) + "\n")

    def save(self, iteration: int, finished: bool, train_s: float) -> None:
        """Rewrite ``checkpoint.pt`` atomically."""
        run = self.run
        save_checkpoint(self.out_dir / CHECKPOINT_FILE, {
            "config": self.config.to_dict(), "amaml_version": __version__,
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "generator": run.generator.get_state(), "iteration": iteration,
            "history": run.history, "finished": finished, "train_s": train_s,
            "resumes": run.resumes, "world_size": self.info.world_size,
            "input_shape": list(self.input_shape)})
        self.created.clear()  # a checkpoint exists: the directory is a resumable run now

    def remove_created(self) -> None:
        """Remove what a fresh run wrote before failing ahead of its first checkpoint."""
        for p in self.created:
            if p.exists():
                p.unlink()

    def finish(self, family: TaskFamily, metrics: dict[str, Any],
               refs: dict[str, dict[str, Any]], train_s: float) -> None:
        """Write ``init.pt``, the plots, ``metrics.json`` and the final checkpoint."""
        config, history = self.config, self.run.history
        save_checkpoint(self.out_dir / INIT_FILE, {
            "config": config.to_dict(), "model": self.run.model.state_dict(),
            "input_dim": family.input_dim, "input_shape": list(family.input_shape),
            "amaml_version": __version__}, kind=INIT_FORMAT)
        _write_jsonl(self.out_dir / "metrics.jsonl", _logged(history, config.log_every))
        title = f"{config.method} on {config.family}"
        plot_training_curve([h["iteration"] for h in history],
                            [h["meta_loss"] for h in history],
                            self.out_dir / "training_curve.png", title=title)
        if refs:
            m = metric_of(metrics)
            plot_finetune({config.method: metrics["finetune"],
                           **{n: r["finetune"] for n, r in refs.items() if r["finetune"]}},
                          self.out_dir / "finetune.png",
                          title=f"{title}, {_setting(config)}: meta-test {m.label} while "
                                "fine-tuning",
                          references={n: r[m.mean_key] for n, r in refs.items()
                                      if not r["finetune"]})
        atomic_write_json(self.out_dir / "metrics.json", metrics)
        self.save(config.meta_iters, True, train_s)


def _setting(config: TrainConfig) -> str:
    """``5-way 1-shot`` (classification) or ``50 shots`` (regression), for titles."""
    if config.kind == "classification":
        return f"{config.ways}-way {config.shots}-shot"
    return f"{config.shots} shots"


def _metrics(config: TrainConfig, algorithm: AbstractAlgorithm, run: RunState,
             evaluation: dict[str, Any], train_s: float, info: DistInfo) -> dict[str, Any]:
    history = run.history
    losses = [h["meta_loss"] for h in history]
    tail = losses[-max(1, len(losses) // 10):]
    kind = {"ways": config.ways, "model": config.model} if config.kind == "classification" \
        else {}
    return {
        "family": config.family, "kind": config.kind, "method": config.method,
        "steps": algorithm.n_steps, "config_steps": config.steps,
        "eval_steps": evaluation["eval_steps"], **evaluation_fields(evaluation),
        "shots": config.shots, "queries": config.queries, **kind, "inner_lr": config.inner_lr,
        "meta_iters": config.meta_iters, "meta_batch": config.meta_batch,
        "meta_lr": config.meta_lr, "seed": config.seed,
        "final_meta_loss": sum(tail) / len(tail),
        "meta_loss": {"iterations": [h["iteration"] for h in history], "values": losses},
        "timings": {"train_s": train_s, "s_per_meta_iter": train_s / max(1, len(history)),
                    "eval_s": evaluation["eval_s"], "finetune_s": evaluation["finetune_s"]},
        "world_size": info.world_size, "resumes": run.resumes, "amaml_version": __version__,
    }


def _finished_result(config: TrainConfig, state: dict[str, Any], out_dir: Path) -> TrainResult:
    try:
        metrics = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{str(out_dir / 'metrics.json')!r} is unreadable ({err}).") \
            from err
    model = build_model(config, _input_shape(state))
    model.load_state_dict(state["model"])
    return TrainResult(config, model, metrics, out_dir)


def _input_shape(state: dict[str, Any]) -> tuple[int, ...]:
    if "input_shape" in state:
        return tuple(int(s) for s in state["input_shape"])
    if "input_dim" in state:
        return (int(state["input_dim"]),)
    # A checkpoint of an MLP run saved before input shapes were recorded.
    first = next(k for k in state["model"] if k.endswith("weight"))
    return (int(state["model"][first].shape[1]),)
