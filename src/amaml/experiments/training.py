"""Meta-training: Adam on the meta-gradient of any registered algorithm.

One meta-iteration draws ``meta_batch`` distinct meta-training tasks from a seeded
``torch.Generator`` (the same on every rank), adapts this rank's shard of them
(``shard_indices``), accumulates ``1 / meta_batch`` times each task's meta-direction into
``.grad`` (``algorithm.meta_step``), sums the gradients over ranks
(``all_reduce_grads``) and takes an Adam step. Nothing uses the global RNG: the tasks,
the initialisation and the draws depend on ``config.seed`` alone.

A run directory (``out``) holds::

    config.json          the config, amaml/torch versions, the family's facts
    checkpoint.pt        resumable state, rewritten atomically every checkpoint_every
                         iterations, at the end, and on SIGINT/SIGTERM
    metrics.jsonl        one line per logged iteration: iteration, meta_loss, elapsed_s
    metrics.json         final metrics: nRMSE mean/s.e., meta-loss history, fine-tuning
                         curve, timings
    init.pt              the learned initialisation (read by ``amaml eval --checkpoint``)
    training_curve.png   meta-loss against iterations

Only rank 0 writes. A checkpointed run killed at any moment (even by SIGKILL) and
resumed ends with exactly the same initialisation as an uninterrupted run (CPU).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .. import __version__
from ..algorithms import AbstractAlgorithm, make_algorithm
from ..tasks import TaskFamily, draw_episode, make_family
from .checkpoint import (
    INIT_FORMAT,
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    jsonable,
    load_checkpoint,
    save_checkpoint,
)
from .config import RESUME_MUTABLE, TrainConfig
from .distributed import (
    DistInfo,
    all_reduce_grads,
    all_reduce_sum,
    barrier,
    init_distributed,
    shard_indices,
)
from .evaluate import evaluate_adaptation, finetune_curve
from .models import make_model
from .plots import plot_finetune, plot_training_curve

__all__ = [
    "CHECKPOINT_FILE", "INIT_FILE", "MetaLossError", "RunDirError", "TrainResult",
    "TrainingInterrupted",
    "build_algorithm", "build_family", "build_model", "evaluate_run", "loss_fn", "resume_config",
    "train",
]

CHECKPOINT_FILE = "checkpoint.pt"
INIT_FILE = "init.pt"
_RESULT_FILES = (CHECKPOINT_FILE, INIT_FILE, "metrics.json")

#: The inner and query loss of the regression experiments (``--loss mse``).
loss_fn = F.mse_loss


def _half_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * F.mse_loss(prediction, target)


#: ``--loss`` name -> loss function.
LOSS_FNS = {"mse": F.mse_loss, "half-mse": _half_mse}


def config_loss(config: TrainConfig) -> Any:
    """The inner and query loss of a config."""
    return LOSS_FNS[config.loss]


def make_meta_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam or plain SGD on the model's parameters, at ``config.meta_lr``."""
    if config.meta_optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.meta_lr)
    return torch.optim.Adam(model.parameters(), lr=config.meta_lr)


class RunDirError(ValueError):
    """The output directory cannot be used as asked (already holds a run, or none to resume)."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint.

    Attributes:
        out_dir: The run directory (resume with ``--out out_dir --resume``).
        iteration: Meta-iterations completed and saved.
        signal_name: ``"SIGINT"`` or ``"SIGTERM"``.
    """

    def __init__(self, out_dir: Path | None, iteration: int, signal_name: str, *,
                 resume_hint: str | None = None) -> None:
        self.out_dir = out_dir
        self.iteration = iteration
        self.signal_name = signal_name
        hint = resume_hint or f"amaml train --out {out_dir} --resume"
        where = (f"checkpoint saved; resume with: {hint}" if out_dir is not None
                 else "nothing saved (no --out)")
        super().__init__(f"Interrupted by {signal_name} after meta-iteration {iteration}; "
                         f"{where}")


def _nonfinite_grad(model: nn.Module) -> str | None:
    """The name of the first parameter whose ``.grad`` holds a NaN or an infinity, if any."""
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not grads:
        return None
    flags = torch.stack([torch.isfinite(g).all() for _, g in grads])
    if bool(flags.all()):
        return None
    return grads[int((~flags).nonzero()[0])][0]


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


def build_family(config: TrainConfig) -> TaskFamily:
    """The task family of a config, with tensors on ``config.device``.

    Raises:
        DataError: Missing or malformed data of a collaborative family.
    """
    family = make_family(config.family, shots=config.shots, queries=config.queries,
                         n_train=config.n_train, n_test=config.n_test, seed=config.seed,
                         root=config.data_dir, download=config.download,
                         dtype=config.torch_dtype, pool=config.pool)
    if torch.device(config.device).type != "cpu":
        family = family.to(config.device)  # keeps the function the oracle fits
    return family


def build_model(config: TrainConfig, input_dim: int) -> nn.Module:
    """The MLP of a config, initialised from ``config.seed``."""
    return make_model(input_dim, config.hidden, seed=2 * config.seed, dtype=config.torch_dtype,
                      device=config.device)


#: Methods whose inner loop carries ``config.proximal`` (iMAML's needs one).
PROXIMAL_METHODS = ("amaml", "imaml")


def build_algorithm(config: TrainConfig) -> AbstractAlgorithm:
    """The algorithm of a config (MAML with ``effective_maml_steps``).

    ``proximal`` reaches A-MAML and iMAML only; ``proximal_in_query`` A-MAML only.
    """
    prox = config.proximal if config.method in PROXIMAL_METHODS else 0.0
    return make_algorithm(config.method, n_steps=config.steps, inner_lr=config.inner_lr,
                          solver=config.solver, memory=config.memory, proximal=prox,
                          maml_steps=config.effective_maml_steps, compile=config.compile,
                          proximal_in_query=config.proximal_in_query
                          and config.method == "amaml")


def _batch_generator(config: TrainConfig) -> torch.Generator:
    # Its own stream, distinct from the initialisation's (seed 2 * seed).
    return torch.Generator().manual_seed(2 * config.seed + 1)


def evaluate_run(config: TrainConfig, model: nn.Module, family: TaskFamily,
                 algorithm: AbstractAlgorithm) -> dict[str, Any]:
    """Adaptation nRMSE and fine-tuning curve on the meta-test tasks (see ``evaluate``)."""
    t0 = time.perf_counter()
    loss = config_loss(config)
    result = evaluate_adaptation(model, algorithm, loss, family.test,
                                 n_steps=config.eval_steps)
    t1 = time.perf_counter()
    # Fine-tuning minimises the plain MSE whatever --loss says (the authors' evaluation).
    curve = finetune_curve(model, loss_fn, family.test, lr=config.effective_finetune_lr,
                           epochs=config.finetune_epochs, every=config.finetune_every,
                           optimizer=config.finetune_optimizer,
                           weight_decay=config.finetune_weight_decay)
    t2 = time.perf_counter()
    result["finetune"] = curve
    result["eval_s"] = t1 - t0
    result["finetune_s"] = t2 - t1
    return result


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop saves and stops at the end of the iteration."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = signal.Signals(signum).name


@contextmanager
def _signals(flag: _StopFlag, enabled: bool) -> Iterator[None]:
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, flag.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _prepare_dir(out: Path, resume: bool) -> dict[str, Any] | None:
    """Check the run directory; returns the checkpoint to resume from, if any."""
    ckpt = out / CHECKPOINT_FILE
    if resume:
        if not ckpt.exists():
            raise RunDirError(f"Nothing to resume in {str(out)!r}: it has no {CHECKPOINT_FILE}; "
                              "drop --resume to start a new run there.")
        return load_checkpoint(ckpt)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {str(out)!r} exists and is not a directory; choose another "
                          "--out.")
    taken = [f for f in _RESULT_FILES if (out / f).exists()]
    if taken:
        raise RunDirError(f"--out {str(out)!r} already holds a run ({', '.join(taken)}); pass "
                          "--resume to continue it, or choose another --out.")
    return None


def _check_resumable(config: TrainConfig, state: dict[str, Any], path: Path) -> TrainConfig:
    try:
        stored = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"Checkpoint {str(path)!r} holds an invalid config ({err}).") \
            from err
    diff = config.differences(stored, ignore=RESUME_MUTABLE)
    if diff:
        desc = ", ".join(f"--{k.replace('_', '-')} {a!r} (checkpoint: {b!r})"
                         for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"The config differs from the checkpoint's in {str(path)!r}: "
                              f"{desc}; resume with the original settings or use another "
                              "--out.")
    return config


def _logged(history: list[dict[str, Any]], every: int) -> list[dict[str, Any]]:
    return [h for h in history if h["iteration"] % every == 0]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(jsonable(r)) + "\n" for r in rows))


def train(config: TrainConfig, out: str | os.PathLike[str] | None = None, *,
          resume: bool = False, family: TaskFamily | None = None, progress: bool = True,
          progress_position: int = 0, handle_signals: bool = True,
          dist_info: DistInfo | None = None, references: bool = False) -> TrainResult:
    """Meta-train an initialisation, evaluate it on the meta-test tasks, write the run.

    Args:
        config: The run's settings.
        out: Run directory (created); ``None`` writes nothing and cannot be resumed.
        resume: Continue the run saved in ``out``. The config must equal the
            checkpoint's except for ``data_dir``, ``download``, ``checkpoint_every`` and
            ``compile``.
            Resuming a finished run returns its saved metrics without recomputing.
        family: Prebuilt tasks of this config (saves rebuilding them, e.g. in a comparison).
        progress: Show a tqdm bar (rank 0 only).
        progress_position: Line of the bar (nested bars in a comparison).
        handle_signals: Catch SIGINT/SIGTERM (main thread only) to checkpoint and stop.
        dist_info: The process group; ``None`` joins torchrun's, if any.
        references: Also evaluate the ``no-meta`` and ``oracle`` reference rows (see
            :mod:`amaml.experiments.references`) on the same meta-test tasks: their
            nRMSE goes into ``metrics["references"]`` and the fine-tuning curves, the
            run's beside ``no-meta``'s, into ``out/finetune.png``.

    Returns:
        The :class:`TrainResult`.

    Raises:
        RunDirError: ``out`` already holds a run (without ``resume``) or has no checkpoint
            (with ``resume``).
        CheckpointError: The checkpoint is corrupted, foreign, or its config differs.
        DataError: Missing or malformed data.
        DivergenceError: An inner loop diverged (its ``step`` says where).
        TrainingInterrupted: SIGINT/SIGTERM; the checkpoint was saved first.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig; got {type(config).__name__}.")
    if resume and out is None:
        raise RunDirError("resume needs the run directory: pass --out DIR with --resume.")
    info = dist_info if dist_info is not None else init_distributed(config.device)
    out_dir = Path(out) if out is not None else None
    state = _prepare_dir(out_dir, resume) if out_dir is not None else None
    if state is not None and out_dir is not None:
        config = _check_resumable(config, state, out_dir / CHECKPOINT_FILE)
        if state["finished"] and (out_dir / "metrics.json").exists():
            return _finished_result(config, state, out_dir)

    if family is None:
        if info.active and config.download and not info.is_main:
            barrier(info)  # let rank 0 download first
        family = build_family(config)
        if info.active and config.download and info.is_main:
            barrier(info)
    n_train = len(family.train)
    if config.meta_batch > n_train:
        raise ValueError(f"meta_batch (--meta-batch) is {config.meta_batch} but the family has "
                         f"only {n_train} meta-training tasks; use --meta-batch <= {n_train}.")
    model = build_model(config, family.input_dim)
    algorithm = build_algorithm(config)
    optimizer = make_meta_optimizer(config, model)
    gen = _batch_generator(config)
    start, history, prior_s, resumes = 0, [], 0.0, 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"Checkpoint in {str(out_dir)!r} does not fit this model or "
                                  f"optimiser ({type(err).__name__}: {err}).") from err
        start, history = int(state["iteration"]), list(state["history"])
        prior_s, resumes = float(state.get("train_s", 0.0)), int(state.get("resumes", 0)) + 1
    write = out_dir is not None and info.is_main
    created: list[Path] = []
    barrier(info)  # every rank has checked the directory before anyone writes
    if write and out_dir is not None:
        if not out_dir.exists():
            out_dir.mkdir(parents=True)
            created.append(out_dir)
        if state is None:
            atomic_write_json(out_dir / "config.json", {
                **config.to_dict(), "amaml_version": __version__,
                "torch_version": torch.__version__, "world_size": info.world_size,
                "family_info": family.info})
            created.insert(0, out_dir / "config.json")
        for stale in out_dir.glob(".*.tmp*"):  # left by a writer killed mid-write
            stale.unlink()
        _write_jsonl(out_dir / "metrics.jsonl", _logged(history, config.log_every))
        created.insert(0, out_dir / "metrics.jsonl")

    def save(iteration: int, finished: bool, train_s: float) -> None:
        if not write or out_dir is None:
            return
        save_checkpoint(out_dir / CHECKPOINT_FILE, {
            "config": config.to_dict(), "amaml_version": __version__,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "generator": gen.get_state(), "iteration": iteration, "history": history,
            "finished": finished, "train_s": train_s, "resumes": resumes,
            "world_size": info.world_size})
        created.clear()  # a checkpoint exists: the directory is a resumable run now

    flag = _StopFlag()
    try:
        with _signals(flag, handle_signals):
            train_s = _loop(config, model, algorithm, optimizer, gen, family, info, history,
                            start, prior_s, flag, save, out_dir, write, progress,
                            progress_position)
    except BaseException:
        for p in created:  # a fresh run that failed before its first checkpoint
            if p.is_dir():
                if not any(p.iterdir()):
                    p.rmdir()
            elif p.exists():
                p.unlink()
        raise
    if not info.is_main:
        return TrainResult(config, model, {}, out_dir)
    evaluation = evaluate_run(config, model, family, algorithm)
    metrics = _metrics(config, algorithm, history, evaluation, train_s, info, resumes)
    refs: dict[str, Any] = {}
    if references:
        from .references import REFERENCES, reference_metrics

        refs = {n: r for n in REFERENCES
                if (r := reference_metrics(n, config, family)) is not None}
        metrics["references"] = {n: {"nrmse_mean": r["nrmse_mean"], "nrmse_sem": r["nrmse_sem"],
                                     "finetune_final_nrmse": r["finetune_final_nrmse"]}
                                 for n, r in refs.items()}
    if write and out_dir is not None:
        save_checkpoint(out_dir / INIT_FILE, {
            "config": config.to_dict(), "model": model.state_dict(),
            "input_dim": family.input_dim, "amaml_version": __version__}, kind=INIT_FORMAT)
        _write_jsonl(out_dir / "metrics.jsonl", _logged(history, config.log_every))
        plot_training_curve([h["iteration"] for h in history],
                            [h["meta_loss"] for h in history], out_dir / "training_curve.png",
                            title=f"{config.method} on {config.family}")
        if refs:
            plot_finetune({config.method: metrics["finetune"],
                           **{n: r["finetune"] for n, r in refs.items() if r["finetune"]}},
                          out_dir / "finetune.png",
                          title=f"{config.method} on {config.family}, {config.shots} shots: "
                                "meta-test error while fine-tuning",
                          references={n: r["nrmse_mean"] for n, r in refs.items()
                                      if not r["finetune"]})
        atomic_write_json(out_dir / "metrics.json", metrics)
        save(config.meta_iters, True, train_s)
    return TrainResult(config, model, metrics, out_dir)


def _loop(config: TrainConfig, model: nn.Module, algorithm: AbstractAlgorithm,
          optimizer: torch.optim.Optimizer, gen: torch.Generator, family: TaskFamily,
          info: DistInfo, history: list[dict[str, Any]], start: int, prior_s: float,
          flag: _StopFlag, save: Any, out_dir: Path | None, write: bool, progress: bool,
          position: int) -> float:
    from tqdm.auto import tqdm

    n_train = len(family.train)
    loss = config_loss(config)
    t0 = time.perf_counter()
    bar = tqdm(total=config.meta_iters, initial=start, desc=config.method, unit="it",
               disable=not (progress and info.is_main), position=position,
               leave=position == 0, dynamic_ncols=True)
    running = history[-1]["running_loss"] if history else None
    try:
        for it in range(start, config.meta_iters):
            draw = torch.randperm(n_train, generator=gen)[:config.meta_batch].tolist()
            mine = shard_indices(draw, info)
            optimizer.zero_grad(set_to_none=True)
            batch = family.train.batch(mine)
            if config.pool is not None:  # a fresh support and query set from each pool
                batch = draw_episode(batch, config.shots, config.queries, gen)
            losses = algorithm.meta_step(model, loss, batch, scale=1.0 / config.meta_batch)
            all_reduce_grads(model, info)
            total = all_reduce_sum(losses.detach().double().sum().reshape(1).cpu(), info)
            meta_loss = float(total) / config.meta_batch
            if not math.isfinite(meta_loss):  # stop before Adam spreads it into theta
                raise MetaLossError(it + 1, meta_loss)
            bad = _nonfinite_grad(model)
            if bad is not None:
                raise MetaLossError(it + 1, float("nan"), what=f"meta-gradient of {bad!r}")
            optimizer.step()
            running = meta_loss if running is None or not math.isfinite(running) \
                else 0.9 * running + 0.1 * meta_loss
            elapsed = prior_s + time.perf_counter() - t0
            row = {"iteration": it + 1, "meta_loss": meta_loss, "running_loss": running,
                   "elapsed_s": elapsed}
            history.append(row)
            if write and out_dir is not None and (it + 1) % config.log_every == 0:
                with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(jsonable(row)) + "\n")
            bar.update(1)
            bar.set_postfix(meta_loss=f"{running:.4g}", refresh=False)
            stop = torch.tensor([1.0 if flag.signal_name else 0.0])
            stop_any = float(all_reduce_sum(stop, info)) > 0
            last = it + 1 == config.meta_iters
            periodic = config.checkpoint_every > 0 and (it + 1) % config.checkpoint_every == 0
            if stop_any or last or periodic:
                save(it + 1, False, elapsed)
            if stop_any:
                raise TrainingInterrupted(out_dir, it + 1, flag.signal_name or "SIGTERM")
    finally:
        bar.close()
    return prior_s + time.perf_counter() - t0


def _metrics(config: TrainConfig, algorithm: AbstractAlgorithm, history: list[dict[str, Any]],
             evaluation: dict[str, Any], train_s: float, info: DistInfo,
             resumes: int) -> dict[str, Any]:
    losses = [h["meta_loss"] for h in history]
    tail = losses[-max(1, len(losses) // 10):]
    ft = evaluation["finetune"]
    return {
        "family": config.family, "method": config.method, "steps": algorithm.n_steps,
        "config_steps": config.steps, "eval_steps": evaluation["eval_steps"],
        "nrmse_mean": evaluation["nrmse_mean"], "nrmse_sem": evaluation["nrmse_sem"],
        "nrmse_per_task": evaluation["nrmse_per_task"], "n_test_tasks": evaluation["n_tasks"],
        "shots": config.shots, "queries": config.queries, "inner_lr": config.inner_lr,
        "meta_iters": config.meta_iters, "meta_batch": config.meta_batch,
        "meta_lr": config.meta_lr, "seed": config.seed,
        "final_meta_loss": sum(tail) / len(tail),
        "meta_loss": {"iterations": [h["iteration"] for h in history], "values": losses},
        "finetune": ft,
        "finetune_final_nrmse": ft["nrmse_mean"][-1],
        "finetune_best_nrmse": min((m for m in ft["nrmse_mean"] if m == m), default=None),
        "timings": {"train_s": train_s, "s_per_meta_iter": train_s / max(1, len(history)),
                    "eval_s": evaluation["eval_s"], "finetune_s": evaluation["finetune_s"]},
        "world_size": info.world_size, "resumes": resumes, "amaml_version": __version__,
    }


def _finished_result(config: TrainConfig, state: dict[str, Any], out_dir: Path) -> TrainResult:
    try:
        metrics = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{str(out_dir / 'metrics.json')!r} is unreadable ({err}).") \
            from err
    model = build_model(config, _input_dim(state))
    model.load_state_dict(state["model"])
    return TrainResult(config, model, metrics, out_dir)


def _input_dim(state: dict[str, Any]) -> int:
    if "input_dim" in state:
        return int(state["input_dim"])
    first = next(k for k in state["model"] if k.endswith("weight"))
    return int(state["model"][first].shape[1])



def resume_config(out: str | os.PathLike[str], **overrides: Any) -> TrainConfig:
    """The config saved in ``out``'s checkpoint, with some fields replaced.

    Resuming with a changed field is refused later by :func:`train` (except for
    ``data_dir``, ``download`` and ``checkpoint_every``); this lets a command line
    give only ``--out DIR --resume``.

    Raises:
        RunDirError: ``out`` has no checkpoint.
        CheckpointError: The checkpoint is corrupted, foreign or holds an invalid config.
        ValueError: An override is invalid.
    """
    path = Path(out) / CHECKPOINT_FILE
    if not path.exists():
        raise RunDirError(f"Nothing to resume in {str(out)!r}: it has no {CHECKPOINT_FILE}; "
                          "drop --resume to start a new run there.")
    state = load_checkpoint(path)
    try:
        stored = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"Checkpoint {str(path)!r} holds an invalid config ({err}).") \
            from err
    return stored.replace(**overrides)
