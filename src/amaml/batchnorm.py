"""How a model is called in the inner loop: BatchNorm's statistics, several inputs."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._types import Params
from .support import call_args

__all__ = ["BATCH_NORM_MODES", "model_forward"]

#: Accepted values of ``batch_norm=``: ``"batch"`` normalises with the statistics of the
#: batch each call sees (training-mode BatchNorm, the MAML convention), ``"running"`` with
#: the model's running statistics (eval-mode BatchNorm).
BATCH_NORM_MODES = ("batch", "running")

_RUNNING_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_Forward = Callable[[Params, Tensor], Tensor]


@contextmanager
def _eval_mode(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Put ``layers`` in eval mode for the duration of one call, then restore each flag.

    The flags are read at each call, not once per :func:`adapt`: the backward pass calls
    the model again, after the user may have switched its mode.
    """
    flags = [m.training for m in layers]
    for m in layers:
        m.training = False
    try:
        yield
    finally:
        for m, flag in zip(layers, flags):
            m.training = flag


def model_forward(model: nn.Module, batch_norm: Any) -> _Forward:
    """``(params, x) -> model_params(x)``, BatchNorm layers normalising per ``batch_norm``.

    No BatchNorm layer: a plain :func:`torch.func.functional_call`. ``"batch"``: the
    layers' running buffers are hidden from the call (passed as ``None``), so that
    :class:`torch.nn.BatchNorm2d` & co. normalise with batch statistics and update nothing,
    whatever ``model.training`` (and under :func:`torch.func.vmap` the statistics are per
    task). ``"running"``: the layers are put in eval mode for the call only, so that they
    normalise with their running statistics, which they then only read.

    Raises:
        ValueError: ``batch_norm`` not in :data:`BATCH_NORM_MODES`, or ``"running"`` with a
            BatchNorm layer that has no running statistics.
    """
    if not isinstance(batch_norm, str) or batch_norm not in BATCH_NORM_MODES:
        raise ValueError(f"Unknown batch_norm={batch_norm!r}; expected one of "
                         f"{list(BATCH_NORM_MODES)}.")
    fcall = torch.func.functional_call
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if batch_norm == "batch":
        hidden: dict[str, Tensor | None] = {
            f"{n}.{b}" if n else b: None
            for n, m in layers for b in _RUNNING_BUFFERS if getattr(m, b, None) is not None}
        if not hidden:  # no BatchNorm, or none tracking statistics: batch statistics anyway
            return lambda params, x: fcall(model, params, *call_args(x))

        def batch_call(params: Params, x: Tensor) -> Tensor:
            # Merged, not passed as a second dict: a buffer also in ``params`` is then
            # hidden too rather than a duplicate-key error.
            merged: dict[str, Tensor | None] = {**params, **hidden}
            return fcall(model, merged, *call_args(x))  # type: ignore[arg-type]  # None hides it

        return batch_call
    untracked = [n or type(m).__name__ for n, m in layers
                 if m.running_mean is None or m.running_var is None]
    if untracked:
        raise ValueError(f"batch_norm='running' needs running statistics, but the BatchNorm "
                         f"layer(s) {untracked} have none (track_running_stats=False); use "
                         "batch_norm='batch'.")
    if not layers:
        return lambda params, x: fcall(model, params, *call_args(x))
    modules = [m for _, m in layers]

    def call(params: Params, x: Tensor) -> Tensor:
        with _eval_mode(modules):
            return fcall(model, params, *call_args(x))

    return call
