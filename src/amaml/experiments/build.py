"""The objects a config describes: its tasks, model, algorithm, losses and meta-optimiser.

Every builder depends on the config alone (and its seed), so that meta-training, a
resumed run, ``amaml eval`` and the reference rows all build the same objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..algorithms import AbstractAlgorithm, algorithm_options, make_algorithm
from ..tasks import TaskFamily, make_family
from .config import TrainConfig
from .models import make_conv4, make_model

__all__ = ["LOSS_FNS", "PROXIMAL_METHODS", "batch_generator", "build_algorithm", "build_family",
           "build_model", "config_loss", "loss_fn", "make_meta_optimizer"]

#: The inner and query loss of the regression experiments (``--loss mse``).
loss_fn = F.mse_loss


def _half_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * F.mse_loss(prediction, target)


#: ``--loss`` name -> loss function (``cross-entropy``: logits ``[n, ways]`` against int64
#: labels ``[n]``, averaged over the images).
LOSS_FNS = {"mse": F.mse_loss, "half-mse": _half_mse, "cross-entropy": F.cross_entropy}

#: Methods whose inner loop carries ``config.proximal`` (iMAML's needs one).
PROXIMAL_METHODS = ("amaml", "imaml")


def config_loss(config: TrainConfig) -> Any:
    """The inner and query loss of a config (its ``loss``, resolved from the family kind)."""
    return LOSS_FNS[str(config.loss)]


def make_meta_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam or plain SGD on the model's parameters, at ``config.meta_lr``."""
    if config.meta_optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.meta_lr)
    return torch.optim.Adam(model.parameters(), lr=config.meta_lr)


def build_family(config: TrainConfig) -> TaskFamily:
    """The task family of a config, with tensors on ``config.device``.

    Raises:
        DataError: Missing or malformed data of a collaborative family.
    """
    family = make_family(config.family, shots=config.shots, queries=config.queries,
                         n_train=config.n_train, n_test=config.n_test, seed=config.seed,
                         root=config.data_dir, download=config.download,
                         dtype=config.torch_dtype, pool=config.pool, ways=config.ways)
    if torch.device(config.device).type != "cpu":
        family = family.to(config.device)  # keeps the function the oracle fits
    return family


def build_model(config: TrainConfig, input_shape: int | Sequence[int]) -> nn.Module:
    """The network of a config (``config.model``), initialised from ``config.seed``.

    Args:
        config: Its ``model``, ``hidden`` (MLP), ``conv_width`` and ``ways`` (Conv-4).
        input_shape: Shape of one input, :attr:`TaskFamily.input_shape`: ``(d,)`` or the
            MLP's ``d`` alone (regression), ``(C, H, W)`` (classification).

    Raises:
        ValueError: ``input_shape`` does not fit the model.
    """
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
    if config.model == "conv4":
        return make_conv4(shape, int(config.ways or 0), width=config.conv_width,
                          seed=2 * config.seed, dtype=config.torch_dtype, device=config.device)
    if len(shape) != 1:
        raise ValueError(f"--model {config.model} takes flat inputs (d,); got input shape "
                         f"{shape}.")
    return make_model(shape[0], config.hidden, seed=2 * config.seed, dtype=config.torch_dtype,
                      device=config.device)


def resolve_compile(config: TrainConfig) -> tuple[bool | str, str]:
    """Whether A-MAML's solver steps are compiled for this run, and why (one line).

    ``compile="auto"`` compiles when the whole run's inner steps (solver stages x steps x
    meta-batch x meta-iterations) pass the measured break-even of
    :func:`amaml.compile_cache.recommend_compile`, except where compiling is not exact or
    not supported: batch-statistics BatchNorm under ``adapt_batch`` (``conv4``), and methods
    other than A-MAML (their inner loops are not compiled). An inner optimiser's steps
    compile like gradient descent's (one compiled function for every step). A compiling
    run keeps
    its compiled code on disk (:func:`amaml.compile_cache.enable_compile_cache`), so a
    second run of the same shapes starts without recompiling.
    """
    from ..compile_cache import enable_compile_cache, recommend_compile
    from ..flow.step_maps import SOLVERS

    if config.method != "amaml":
        return False, f"{config.method}: eager (only A-MAML's solver steps compile)"
    if config.compile == "auto":
        if config.model == "conv4":
            return False, ("amaml: eager (auto; compiled batched BatchNorm is not exact in "
                           "torch 2.13)")
        work = config.steps * SOLVERS[config.solver]().stages
        if not recommend_compile(work, config.meta_iters, config.meta_batch, config.device):
            return False, (f"amaml: eager (auto: {work * config.meta_iters * config.meta_batch:,}"
                           " task-steps do not pay for compiling; --compile forces it)")
        choice: bool | str = True
    else:
        choice = config.compile
    if choice is False:
        return False, "amaml: eager (--compile off)"
    where = enable_compile_cache()
    how = "auto" if config.compile == "auto" else "--compile"
    return choice, f"amaml: compiled solver steps ({how}; compile cache {where})"


def build_algorithm(config: TrainConfig) -> AbstractAlgorithm:
    """The algorithm of a config (MAML with ``effective_maml_steps``).

    Each method gets only the settings it uses (:func:`~amaml.algorithms.algorithm_options`):
    ``memory`` and ``compile`` reach A-MAML, ``maml_steps`` MAML; ``proximal`` reaches
    A-MAML and iMAML only (iMAML's 0 means its default 1.0, as the config documents);
    ``proximal_in_query`` A-MAML only. Every method adapts with the config's inner
    optimiser (:meth:`~amaml.experiments.config.TrainConfig.inner_optimizer_instance`;
    ``None`` for ``gd``, the gradient flow of ``solver``).
    """
    options: dict[str, Any] = {
        "solver": config.solver, "memory": config.memory,
        "proximal": config.proximal if config.method in PROXIMAL_METHODS else 0.0,
        "maml_steps": config.effective_maml_steps, "compile": resolve_compile(config)[0],
        "proximal_in_query": config.proximal_in_query,
        "optimizer": config.inner_optimizer_instance()}
    if config.method == "imaml" and config.proximal == 0:
        options["proximal"] = None
    used = algorithm_options(config.method) | {"optimizer"}  # refused where not taken
    return make_algorithm(config.method, n_steps=config.steps, inner_lr=config.inner_lr,
                          **{k: v for k, v in options.items() if k in used})


def batch_generator(config: TrainConfig) -> torch.Generator:
    """The generator of the meta-batch draws and episodes (CPU, seeded by the config)."""
    # Its own stream, distinct from the initialisation's (seed 2 * seed).
    return torch.Generator().manual_seed(2 * config.seed + 1)
