"""A meta-batch of convolutional tasks as one network: tasks folded into channels.

:func:`amaml.adapt_batch` evaluates ``B`` tasks' losses at once. Under
:func:`torch.func.vmap` each layer's batching rule moves the task dimension where its
kernel wants it: into the channels of a grouped convolution, into the samples of a
pooling or a BatchNorm, and back, copying the activations at every layer (on Conv-4 with
BatchNorm a vmapped gradient costs more than a loop over the tasks). Here the tasks stay
folded into the channel dimension through the whole chain: activations ``[n, B * C, H,
W]``, each task's convolution one group of a grouped convolution (``B * groups``
groups), each task's BatchNorm channels ``B * C`` channels of one BatchNorm (its
statistics are per channel, so per task), pooling and activations per channel as they
are; after ``Flatten`` the activations are ``[B, n, features]`` and linear layers are
batched matrix products. Every layer computes what it computes for one task, so the loss
of each task, its gradient and its Hessian-vector products are those of the task alone.

A model takes this path when it is a chain (an ``nn.Sequential``, or a module whose
``forward`` :func:`torch.fx.symbolic_trace` reads as one, :func:`~amaml.fastpath.layer_chain`)
of the layer kinds in :data:`FOLD_KINDS`, every parameter trainable, no hooks, inputs
``[B, n, C, H, W]``. Anything else takes :func:`torch.func.vmap`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._types import LossFn
from .fastpath import FUNCTION_KINDS, hooked, layer_chain
from .flow.objective import BatchedLoss
from .params import FlatModel

__all__ = ["FOLD_KINDS", "FoldedLoss", "TASK_MODES", "batch_plan", "folded_forward",
           "folded_plan"]

_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.LeakyReLU, nn.ELU, nn.GELU,
                nn.SiLU)

#: Module types a folded chain computes, by exact type.
FOLD_KINDS: dict[type[nn.Module], str] = {
    nn.Conv2d: "conv", nn.BatchNorm2d: "batchnorm", nn.MaxPool2d: "maxpool",
    nn.AvgPool2d: "avgpool", nn.AdaptiveAvgPool2d: "adaptiveavgpool", nn.Flatten: "flatten",
    nn.Linear: "linear", **{t: "elementwise" for t in _ELEMENTWISE}}

_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid}

_Step = tuple[str, Any, str]  # (kind, module or function, parameter prefix)


class _Fold(NamedTuple):
    """What every folded layer reads: the parameters by name (each ``(B, *shape)``), the
    tasks ``B``, the points ``n``, and whether BatchNorm uses its running statistics."""

    params: dict[str, Tensor]
    b: int
    n: int
    running: bool


def _conv(h: Tensor, m: Any, prefix: str, f: _Fold) -> Tensor:
    w, bias = f.params[prefix + "weight"], f.params.get(prefix + "bias")
    return F.conv2d(h, w.reshape(-1, *w.shape[2:]), None if bias is None else bias.reshape(-1),
                    m.stride, m.padding, m.dilation, m.groups * f.b)


def _batchnorm(h: Tensor, m: Any, prefix: str, f: _Fold) -> Tensor:
    gamma, beta = f.params.get(prefix + "weight"), f.params.get(prefix + "bias")
    mean = var = None
    if f.running:
        mean, var = m.running_mean.repeat(f.b), m.running_var.repeat(f.b)
    return F.batch_norm(h, mean, var, None if gamma is None else gamma.reshape(-1),
                        None if beta is None else beta.reshape(-1), training=not f.running,
                        eps=m.eps)


def _maxpool(h: Tensor, m: Any, prefix: str, f: _Fold) -> Tensor:
    return F.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation,
                        ceil_mode=m.ceil_mode)


def _apply(h: Tensor, m: Any, prefix: str, f: _Fold) -> Tensor:
    return m(h)  # type: ignore[no-any-return]


def _flatten(h: Tensor, m: Any, prefix: str, f: _Fold) -> Tensor:
    return h.reshape(f.n, f.b, -1).transpose(0, 1)  # [B, n, C * H * W], C-major per task


def _linear(h: Tensor, m: Any, prefix: str, f: _Fold) -> Tensor:  # on [B, n, features]
    w, bias = f.params[prefix + "weight"], f.params.get(prefix + "bias")
    return (torch.bmm(h, w.transpose(1, 2)) if bias is None
            else torch.baddbmm(bias.unsqueeze(1), h, w.transpose(1, 2)))


#: How each layer kind of :data:`FOLD_KINDS` (and a function between layers) computes a
#: folded meta-batch.
_APPLY: dict[str, Callable[[Tensor, Any, str, _Fold], Tensor]] = {
    "conv": _conv, "batchnorm": _batchnorm, "maxpool": _maxpool, "avgpool": _apply,
    "adaptiveavgpool": _apply, "elementwise": _apply, "function": _apply,
    "flatten": _flatten, "linear": _linear}


class FoldedLoss(BatchedLoss):
    """The loss of one task (``__call__``, as the generic path computes it) and of a
    meta-batch with the tasks folded into channels (:meth:`per_task_batched`).

    Args:
        steps: The chain, ``(kind, module, parameter prefix)`` per layer.
        loss_fn: ``loss_fn(prediction, target)`` of one task.
        single: The generic loss of one task, ``single(u, *tensors)``.
        unpack: The loss's data tensors to ``(inputs, targets)``.
        unflatten: Flat parameters ``(B, P)`` to ``{name: (B, *shape)}``.
        running: Normalise with the BatchNorm layers' running statistics (else with
            each task's batch statistics).
    """

    def __init__(self, steps: list[_Step], loss_fn: LossFn,
                 single: Callable[..., Tensor], unpack: Callable[[Any], tuple[Any, Any]],
                 unflatten: Callable[[Tensor], dict[str, Tensor]], running: bool) -> None:
        self.steps = steps
        self.unpack = unpack
        self.loss_fn = loss_fn
        self.single = single
        self.unflatten = unflatten
        self.running = running
        self.loop = False
        self._losses = torch.func.vmap(loss_fn, randomness="different")

    def __call__(self, u: Tensor, *data: Tensor) -> Tensor:
        return self.single(u, *data)

    def forward(self, u: Tensor, x: Tensor) -> Tensor:
        """The outputs ``[B, n, ...]`` of ``B`` tasks' networks ``u`` ``(B, P)`` on their
        inputs ``x`` ``[B, n, C, H, W]``."""
        return self.forward_params(self.unflatten(u), x)

    def forward_params(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """:meth:`forward` with the parameters by name, each ``(B, *shape)``."""
        b, n = x.shape[:2]
        h = x.transpose(0, 1).reshape(n, b * x.shape[2], *x.shape[3:])
        fold = _Fold(params, b, n, self.running)
        for kind, m, prefix in self.steps:
            h = _APPLY[kind](h, m, prefix, fold)
        if not any(kind == "flatten" for kind, _, _ in self.steps):
            h = h.reshape(n, b, -1, *h.shape[2:]).transpose(0, 1)  # unfold [n, B * C, ...]
        return h

    def per_task_batched(self, u: Tensor, *data: Tensor) -> Tensor:
        """The loss of each task, ``(B,)``, for parameters ``u`` ``(B, P)``."""
        if self.loop:
            return torch.stack([self.single(ub, *(d[b] for d in data))
                                for b, ub in enumerate(u.unbind(0))])
        x, y = self.unpack(data)
        return self._losses(self.forward(u, x), y)


def _step(qual: str | None, kind: str, m: nn.Module | None, after_flatten: bool
          ) -> tuple[_Step | None, str | None]:
    prefix = f"{qual}." if qual else ""
    assert m is not None
    if kind in ("conv", "batchnorm", "maxpool", "avgpool", "adaptiveavgpool") and after_flatten:
        return None, f"{type(m).__name__} {qual} comes after Flatten"
    if kind == "linear" and not after_flatten:
        return None, f"Linear {qual} comes before a Flatten"
    if kind == "conv" and (m.padding_mode != "zeros"):
        return None, f"Conv2d {qual} pads with {m.padding_mode!r}, not zeros"
    if kind == "maxpool" and m.return_indices:
        return None, f"MaxPool2d {qual} returns indices"
    if kind == "flatten" and (m.start_dim != 1 or m.end_dim != -1):
        return None, f"Flatten {qual} is not Flatten(1, -1)"
    return (kind, m, prefix), None


def folded_plan(flat: FlatModel, loss_fn: LossFn, x: Tensor, single: Callable[..., Tensor],
                unpack: Callable[[Any], tuple[Any, Any]], batch_norm: str
                ) -> tuple[FoldedLoss | None, str]:
    """The folded loss of ``flat.model`` for a meta-batch, or ``None``, and why."""
    model = flat.model
    if flat.frozen:
        return None, "frozen parameters"
    if hooked(model):
        return None, "hooks"
    if x.ndim != 5:
        return None, f"inputs of shape {tuple(x.shape)} are not [B, n, C, H, W]"
    chain = layer_chain(model, FOLD_KINDS)
    if isinstance(chain, str):
        return None, chain
    steps: list[_Step] = []
    used: set[str] = set()
    after_flatten = False
    for qual, kind, m in chain:
        if m is None:  # a function between layers (FUNCTION_KINDS)
            steps.append(("function", _FUNCTIONS[kind], ""))
            continue
        step, why = _step(qual, kind, m, after_flatten)
        if step is None:
            return None, str(why)
        if kind == "batchnorm" and batch_norm == "running" and m.running_mean is None:
            return None, f"BatchNorm2d {qual} has no running statistics"
        after_flatten = after_flatten or kind == "flatten"
        steps.append(step)
        used |= {step[2] + n for n, _ in m.named_parameters(recurse=False)}
    if not any(k in ("conv", "linear") for k, _, _ in steps):
        return None, "no convolution or linear layer"
    if used != set(flat.names):
        return None, "the chain does not use exactly the model's parameters"
    if x.dtype != flat.params[0].dtype or x.device != flat.params[0].device:
        return None, "inputs of another dtype or device than the parameters"
    kinds = sorted({k for k, _, _ in steps if k not in ("elementwise", "function")})
    loss = FoldedLoss(steps, loss_fn, single, unpack, flat.unflatten, batch_norm == "running")
    return loss, f"chain of {', '.join(kinds)}"


assert set(FUNCTION_KINDS.values()) <= set(_FUNCTIONS)
assert set(FOLD_KINDS.values()) | {"function"} <= set(_APPLY)

#: Accepted values of ``adapt_batch(tasks=...)``.
TASK_MODES = ("auto", "batched", "loop")


def batch_plan(flat: FlatModel, loss_fn: LossFn, x: Any, single: Callable[..., Tensor],
               unpack: Callable[[Any], tuple[Any, Any]], batch_norm: str, tasks: Any,
               fused: bool) -> tuple[FoldedLoss | None, bool, str]:
    """How :func:`amaml.adapt_batch` computes its tasks: ``(folded loss or None, one task
    after another?, why)``.

    ``tasks="auto"`` or ``"batched"``: the fused MLP batches its tasks itself, a
    convolutional chain folds them into channels (:class:`FoldedLoss`), any other model
    batches them with :func:`torch.func.vmap` (under ``"auto"``, :func:`amaml.adapt_batch`
    then races that against a loop, :mod:`amaml.taskrace`). ``"loop"``: one task after
    another, as :func:`amaml.adapt` on each (on Conv-4 with BatchNorm, 4 tasks, checkpoint, N = 10,
    paired whole-process runs on an idle CPU: folded 0.96x the loop's time, vmap 1.01x;
    under load from other processes the loop was faster, its working set being one
    task's; ``benchmarks/README.md``).
    """
    if not isinstance(tasks, str) or tasks not in TASK_MODES:
        raise ValueError(f"Unknown tasks={tasks!r}; expected one of {list(TASK_MODES)}.")
    if tasks == "loop":
        return None, True, "tasks one after another (tasks='loop')"
    if fused:
        return None, False, "tasks batched by the fused MLP"
    if not isinstance(x, Tensor):
        return None, False, "tasks batched by vmap (not folded: several inputs)"
    folded, why = folded_plan(flat, loss_fn, x, single, unpack, batch_norm)
    if folded is None:
        return None, False, f"tasks batched by vmap (not folded: {why})"
    return folded, False, f"tasks folded into channels ({why})"


def folded_forward(model: nn.Module, params: dict[str, Tensor], x: Tensor, batch_norm: str
                   ) -> Tensor | None:
    """``B`` tasks' outputs of ``model`` with per-task ``params`` on ``x`` ``[B, n, C, H,
    W]``, the tasks folded into channels; ``None`` where the model does not fold or
    ``params`` are not exactly its trainable parameters with a leading task dimension."""
    if not isinstance(x, Tensor) or x.ndim != 5:
        return None
    try:
        flat = FlatModel(model)
    except (TypeError, ValueError):
        return None
    if set(params) != set(flat.names) or any(
            params[n].shape[1:] != s or params[n].shape[0] != x.shape[0]
            for n, s in zip(flat.names, flat.shapes)):
        return None
    folded, _ = folded_plan(flat, _no_loss, x, _no_loss, _no_loss, batch_norm)
    return None if folded is None else folded.forward_params(params, x)


def _no_loss(*args: Any) -> Any:
    raise AssertionError("folded_forward computes no loss")
