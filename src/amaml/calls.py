"""``functional_call`` and ``functional_call_batch``: a model evaluated with given (adapted)
parameters, BatchNorm normalising as ``adapt`` did, a meta-batch batched where that is
exact."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._types import Params
from .batchnorm import model_forward
from .folded import folded_forward
from .modelscope import batch_blocker, mha_fastpath_off

__all__ = ["functional_call", "functional_call_batch"]


def functional_call(model: nn.Module, params: Params, x: Tensor, *,
                    batch_norm: str = "batch") -> Tensor:
    """Evaluate ``model`` with parameters ``params`` (e.g. from :func:`adapt`) on ``x``.

    ``torch.func.functional_call(model, params, (x,))``, except for BatchNorm layers,
    which normalise as ``batch_norm`` says and never update their running statistics.

    Args:
        model: The module (its buffers and parameters missing from ``params`` are used).
        params: Parameters by name, e.g. adapted ones.
        x: Inputs ``[n, ...]``.
        batch_norm: ``"batch"`` (default, transductive: the mean and variance of ``x``
            itself, as a BatchNorm in training mode; pass the same value as to
            :func:`adapt`) or ``"running"`` (the layers' running statistics, as in eval
            mode; needs ``track_running_stats=True``). ``model.training`` does not matter
            for BatchNorm layers and is left as it is; running statistics, including
            ``num_batches_tracked``, are never written (to update them, run the model in
            training mode on data yourself). Buffers given in ``params`` are used as given
            with ``"running"`` and ignored with ``"batch"``.

    Returns:
        The model's output.

    Raises:
        ValueError: ``batch_norm`` not in :data:`BATCH_NORM_MODES`, or ``"running"`` with
            a BatchNorm layer without running statistics.
    """
    return model_forward(model, batch_norm)(params, x)


def functional_call_batch(model: nn.Module, params: Params, x: Any, *,
                          batch_norm: str = "batch") -> Any:
    """Evaluate ``model`` with per-task parameters ``[B, ...]`` on inputs ``[B, n, ...]``.

    :func:`functional_call` task by task (a chain that :func:`adapt_batch` folds into
    channels runs folded here too, a model whose layers vmap batches exactly runs under
    :func:`torch.func.vmap`, any other one task after another, its outputs stacked), e.g.
    on the query sets with the parameters from :func:`adapt_batch`. ``x`` may be a tuple or
    a dict of such inputs (``model(**x[b])``). With ``batch_norm="batch"`` (default) each
    task is normalised with the statistics of its own inputs ``x[b]``; with ``"running"``,
    with the model's running statistics. Running statistics are never updated.
    """
    forward = model_forward(model, batch_norm)  # ValueError naming batch_norm
    out = folded_forward(model, params, x, batch_norm)  # a convolutional chain: one network
    if out is not None:
        return out
    if batch_blocker(model) is None:
        try:
            with mha_fastpath_off():  # under vmap it would be taken, without a derivative
                return torch.func.vmap(forward, randomness="different")(params, x)
        except (RuntimeError, ValueError, NotImplementedError) as err:
            if "vmap" not in str(err) and "Batching rule" not in str(err) \
                    and "batched" not in str(err).lower():
                raise  # not vmap's refusal: the model's own error
    return _stack([forward({n: p[b] for n, p in params.items()}, _task(x, b))
                   for b in range(_n_tasks(x))])


def _task(x: Any, b: int) -> Any:
    if isinstance(x, Mapping):
        return {k: v[b] for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return tuple(v[b] for v in x)
    return x[b]


def _n_tasks(x: Any) -> int:
    first = next(iter(x.values())) if isinstance(x, Mapping) else (
        x[0] if isinstance(x, (tuple, list)) else x)
    return int(first.shape[0])


def _stack(outs: list[Any]) -> Any:
    """Stack per-task outputs: tensors, tuples and dicts (a HuggingFace output) of them."""
    head = outs[0]
    if isinstance(head, Tensor):
        return torch.stack(outs)
    if isinstance(head, Mapping):
        stacked = {k: _stack([o[k] for o in outs]) for k in head}
        try:
            return type(head)(**stacked)
        except TypeError:
            return stacked
    if isinstance(head, (tuple, list)):
        return type(head)(_stack(list(items)) for items in zip(*outs))
    return outs
