"""``amaml.adapt`` and ``amaml.adapt_batch``: gradient-flow adaptation of any nn.Module."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._types import Batch, LearningRate, LossFn, Params, Scalar
from .flow import (
    MEMORIES,
    SOLVERS,
    AbstractAdjoint,
    AbstractMemory,
    AbstractSolver,
    DiscreteAdjoint,
    gradient_flow,
)
from .flow.compiled import compile_mode
from .flow.fused import Layer, MLPLoss

__all__ = ["BATCH_NORM_MODES", "adapt", "adapt_batch", "functional_call", "functional_call_batch",
           "resolve_solver", "resolve_memory"]

#: Accepted values of ``batch_norm=``: ``"batch"`` normalises with the statistics of the
#: batch each call sees (training-mode BatchNorm, the MAML convention), ``"running"`` with
#: the model's running statistics (eval-mode BatchNorm).
BATCH_NORM_MODES = ("batch", "running")


def resolve_solver(solver: str | AbstractSolver) -> AbstractSolver:
    """A solver instance from a registered name (``"euler"``, ``"heun"``, ``"rk4"``)."""
    if isinstance(solver, AbstractSolver):
        return solver
    if isinstance(solver, str) and solver.lower() in SOLVERS:
        return SOLVERS[solver.lower()]()
    raise ValueError(f"Unknown solver {solver!r}; expected one of {sorted(SOLVERS)} "
                     "or an AbstractSolver instance.")


def resolve_memory(memory: str | AbstractMemory) -> AbstractMemory:
    """A memory strategy from a registered name (``"store"``, ``"checkpoint"``,
    ``"revolve"``, ``"backsolve"``); an :class:`~amaml.flow.AbstractMemory` instance,
    including one defined outside the package, is returned as it is."""
    if isinstance(memory, AbstractMemory):
        return memory
    if isinstance(memory, str) and memory.lower() in MEMORIES:
        return MEMORIES[memory.lower()]()
    raise ValueError(f"Unknown memory strategy {memory!r}; expected one of {sorted(MEMORIES)} "
                     "or an AbstractMemory instance.")


class _FlatModel:
    """Flat-vector view of a module's trainable parameters."""

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no parameters that require grad: nothing to adapt.")
        self.model = model
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise TypeError(f"All trainable parameters must share one dtype; got {dtypes}.")

    def theta(self) -> Tensor:
        return torch.cat([p.reshape(-1) for p in self.params])

    def unflatten(self, u: Tensor) -> Params:
        lead = u.shape[:-1]
        return {n: t.reshape(*lead, *s) for n, t, s in zip(self.names, u.split(self.sizes, -1),
                                                          self.shapes)}

    def flat_lr(self, lr: LearningRate, like: Tensor) -> Tensor:
        if isinstance(lr, Mapping):
            missing = [n for n in self.names if n not in lr]
            extra = [n for n in lr if n not in self.names]
            if missing or extra:
                raise ValueError(f"lr as a dict needs exactly the trainable parameter names; "
                                 f"missing {missing}, unknown {extra}.")
            parts = []
            for n, shape in zip(self.names, self.shapes):
                v = lr[n]
                t = v if isinstance(v, Tensor) else torch.tensor(float(v), dtype=like.dtype)
                t = t.to(like.dtype).to(like.device)
                try:
                    parts.append(t.expand(shape).reshape(-1))
                except RuntimeError as err:
                    raise ValueError(f"lr[{n!r}] of shape {tuple(t.shape)} does not broadcast "
                                     f"to the parameter's shape {tuple(shape)}.") from err
            return torch.cat(parts)
        t = lr if isinstance(lr, Tensor) else torch.tensor(float(lr), dtype=like.dtype)
        if t.ndim != 0:
            raise ValueError("lr as a tensor must be a scalar; give a dict of per-parameter "
                             f"tensors for Meta-SGD style rates (got shape {tuple(t.shape)}).")
        return t.to(like.dtype).to(like.device)


# ----------------------------------------------------------------------------- BatchNorm

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


def _forward(model: nn.Module, batch_norm: Any) -> _Forward:
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
            return lambda params, x: fcall(model, params, (x,))

        def batch_call(params: Params, x: Tensor) -> Tensor:
            # Merged, not passed as a second dict: a buffer also in ``params`` is then
            # hidden too rather than a duplicate-key error.
            merged: dict[str, Tensor | None] = {**params, **hidden}
            return fcall(model, merged, (x,))  # type: ignore[arg-type]  # None hides it

        return batch_call
    untracked = [n or type(m).__name__ for n, m in layers
                 if m.running_mean is None or m.running_var is None]
    if untracked:
        raise ValueError(f"batch_norm='running' needs running statistics, but the BatchNorm "
                         f"layer(s) {untracked} have none (track_running_stats=False); use "
                         "batch_norm='batch'.")
    if not layers:
        return lambda params, x: fcall(model, params, (x,))
    modules = [m for _, m in layers]

    def call(params: Params, x: Tensor) -> Tensor:
        with _eval_mode(modules):
            return fcall(model, params, (x,))

    return call


# ----------------------------------------------------------------------------- fused path

_ACTIVATION_KINDS: dict[type[nn.Module], str] = {nn.Tanh: "tanh", nn.ReLU: "relu",
                                                 nn.Sigmoid: "sigmoid", nn.Identity: "identity"}


def _has_hooks(module: nn.Module) -> bool:
    return any(bool(getattr(module, name, None)) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
        "_state_dict_hooks", "_load_state_dict_pre_hooks"))


def _global_hooks() -> bool:
    from torch.nn.modules import module as _module
    return any(bool(getattr(_module, name, None)) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def _fused_loss(flat: _FlatModel, loss_fn: LossFn, x: Tensor, batched: bool) -> MLPLoss | None:
    """The fused MLP loss (:class:`~amaml.flow.fused.MLPLoss`) when ``flat.model`` is a plain
    perceptron that it computes exactly as the module does; ``None`` otherwise.

    Plain means: exactly ``nn.Sequential`` (not a subclass, which may override ``forward``)
    of distinct ``nn.Linear`` and ``nn.Tanh`` / ``nn.ReLU`` / ``nn.Sigmoid`` /
    ``nn.Identity`` modules (exact types: parametrised or subclassed layers are not), no
    hooks, no buffers, every parameter trainable, inputs ``[n, features]`` (``[B, n,
    features]`` batched) of the parameters' dtype and device. Everything else, BatchNorm
    included, takes the generic path.
    """
    model = flat.model
    if type(model) is not nn.Sequential or flat.frozen or _has_hooks(model) or _global_hooks():
        return None
    children = list(model._modules.values())  # children() would hide a repeated layer
    if (len({id(m) for m in children}) != len(children) or any(m is None for m in children)
            or any(True for _ in model.buffers())):
        return None
    layers: list[Layer] = []
    for m in children:
        if _has_hooks(m):
            return None
        if type(m) is nn.Linear:
            layers.append(Layer("linear", m.in_features, m.out_features, m.bias is not None))
        elif type(m) in _ACTIVATION_KINDS:
            layers.append(Layer(_ACTIVATION_KINDS[type(m)]))
        else:
            return None
    linear = [lay for lay in layers if lay.kind == "linear"]
    p0 = flat.params[0]
    if (not linear or x.ndim != (3 if batched else 2) or x.dtype != p0.dtype
            or x.device != p0.device or x.shape[-1] != linear[0].in_features):
        return None
    fused = MLPLoss(layers, loss_fn)
    return fused if fused.n_params == sum(flat.sizes) else None


def _check_support(data: Any, batched: bool) -> tuple[Tensor, Tensor]:
    name = "(xs, ys)" if batched else "(x, y)"
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"The support set must be a pair {name} of tensors.")
    x, y = data
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"The support set {name} must hold tensors; got "
                        f"{type(x).__name__}, {type(y).__name__}.")
    need = 2 if batched else 1
    if x.ndim < need or y.ndim < need:
        raise ValueError(f"Support tensors need at least {need} dimension(s)"
                         f"{' [B, n, ...]' if batched else ' [n, ...]'}; got x {tuple(x.shape)}, "
                         f"y {tuple(y.shape)}.")
    if batched and x.shape[0] != y.shape[0]:
        raise ValueError(f"xs and ys must have the same number of tasks; got xs "
                         f"{tuple(x.shape)} and ys {tuple(y.shape)}.")
    axis = 1 if batched else 0
    if x.shape[axis] != y.shape[axis]:
        raise ValueError(f"x and y must have the same number of examples; got x {tuple(x.shape)}"
                         f" and y {tuple(y.shape)}.")
    if x.shape[axis] == 0:
        raise ValueError("The support set is empty.")
    for nm, t in (("x", x), ("y", y)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"The support {nm} contains NaN or infinite values.")
    return x, y


def _check_steps_lr(steps: Any, lr: LearningRate, proximal: Scalar) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}.")
    values = lr.values() if isinstance(lr, Mapping) else [lr]
    for v in values:
        ok = bool((v > 0).all()) if isinstance(v, Tensor) else float(v) > 0
        if not ok:
            raise ValueError(f"lr must be > 0; got {v!r}.")
    p = float(proximal.detach()) if isinstance(proximal, Tensor) else float(proximal)
    if not p >= 0:
        raise ValueError(f"proximal must be >= 0; got {proximal!r}.")


def _adapt(model: nn.Module, loss_fn: LossFn, data: Any, *, steps: int, lr: LearningRate,
           solver: str | AbstractSolver, memory: str | AbstractMemory, proximal: Scalar,
           adjoint: AbstractAdjoint | None, batched: bool, compile: bool | str = False,
           batch_norm: str = "batch") -> Params:
    flat = _FlatModel(model)
    forward = _forward(model, batch_norm)  # ValueError naming batch_norm
    x, y = _check_support(data, batched)
    _check_steps_lr(steps, lr, proximal)
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable: loss_fn(prediction, target) -> scalar.")
    stepper = resolve_solver(solver)
    mode = compile_mode(compile)  # TypeError / ValueError naming the accepted values
    if adjoint is not None and mode is not None:
        raise ValueError(f"compile={compile!r} has no effect with adjoint={adjoint!r}: the "
                         "adjoint carries its own compile option. Pass adjoint="
                         f"DiscreteAdjoint(memory, compile={compile!r}) and leave compile "
                         "unset.")
    adj = adjoint if adjoint is not None else DiscreteAdjoint(memory=resolve_memory(memory),
                                                             compile=compile)
    if (batched and batch_norm == "batch" and isinstance(adj, DiscreteAdjoint)
            and compile_mode(adj.compile) is not None
            and any(isinstance(m, _BatchNorm) for m in model.modules())):
        # The compiled steps differentiate with torch.func (vjp of vmap of grad), which in
        # torch 2.13 gets the second derivative of batch-statistics BatchNorm after a
        # convolution wrong across vmapped tasks (1e-2 relative, measured against unrolled
        # autograd); the eager path is exact.
        raise ValueError(f"compile={adj.compile!r} is not supported by adapt_batch on a model "
                         "with BatchNorm and batch_norm='batch': torch.func's batched second "
                         "derivative of batch statistics is wrong. Use compile=False (exact), "
                         "or adapt task by task.")
    theta = flat.theta()

    def loss(u: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        return loss_fn(forward(flat.unflatten(u), xb), yb)

    # A plain MLP computes its own gradient and Hessian-vector products (exact, without
    # autograd graphs); any other model is differentiated through functional_call.
    fused = _fused_loss(flat, loss_fn, x, batched)
    u_end = gradient_flow(loss if fused is None else fused, theta,
                          dt=flat.flat_lr(lr, theta), n_steps=steps, data=(x, y),
                          solver=stepper, adjoint=adj, mu=proximal, batched=batched)
    out = flat.unflatten(u_end)
    for n, p in flat.frozen.items():
        out[n] = p.expand(x.shape[0], *p.shape) if batched else p
    return out


def adapt(
    model: nn.Module,
    loss_fn: LossFn,
    support: Batch,
    *,
    steps: int,
    lr: LearningRate,
    solver: str | AbstractSolver = "euler",
    memory: str | AbstractMemory = "checkpoint",
    proximal: Scalar = 0.0,
    adjoint: AbstractAdjoint | None = None,
    compile: bool | str = False,
    batch_norm: str = "batch",
) -> Params:
    """Adapt a model to one task by gradient flow; differentiable by the adjoint method.

    Integrates ``du/dt = -grad L(u) - proximal * (u - theta)``, ``u(0) = theta`` (the
    model's parameters), ``L(u) = loss_fn(model_u(x), y)``, over the horizon
    ``T = steps * lr`` with ``steps`` solver steps of size ``lr``. With
    ``solver="euler"`` this is exactly ``steps`` steps of gradient descent.

    The result is differentiable with respect to the model's parameters (and ``lr``,
    ``proximal`` when they are tensors requiring grad). Evaluate a query loss with
    :func:`functional_call` ``(model, params, x_query)`` (for a model without BatchNorm,
    the same as ``torch.func.functional_call(model, params, (x_query,))``) and call
    ``.backward()``: the meta-gradient lands in each parameter's ``.grad``. No graph of
    the inner loop is kept; the model itself is never modified: not its parameters, not
    its buffers (BatchNorm running statistics), not its ``training`` flags.

    Args:
        model: Any ``torch.nn.Module``; its trainable parameters are adapted (frozen
            ones pass through). It should be deterministic (no dropout): the backward
            pass re-evaluates it.
        loss_fn: ``loss_fn(prediction, target) -> scalar tensor``.
        support: The support set ``(x, y)``, with matching first dimensions.
        steps: Number of solver steps, >= 1.
        lr: Inner learning rate (the step size) > 0: a float, a 0-d tensor, or a dict
            name -> tensor of per-parameter rates broadcastable to each parameter
            (Meta-SGD). Tensors requiring grad get their meta-gradient too.
        solver: ``"euler"``, ``"heun"``, ``"rk4"`` or an ``AbstractSolver``.
        memory: ``"store"`` (all states), ``"checkpoint"`` (O(sqrt(steps)) states, one
            extra forward pass; exact), ``"revolve"`` (binomial checkpointing: 21 states
            whatever ``steps``, a few extra forward passes; exact; ``Revolve(snapshots=k)``
            sets the budget), ``"backsolve"`` (O(1) states; approximate), or any
            ``AbstractMemory`` instance, including one of your own.
        proximal: Proximal weight ``mu >= 0`` pulling ``u`` toward ``theta``.
        adjoint: Overrides ``memory``: e.g. ``Unrolled()`` (MAML), ``FirstOrder()``,
            ``Implicit()`` (iMAML, needs ``proximal > 0``). Not with ``compile``: give
            ``DiscreteAdjoint(memory, compile=True)`` instead.
        compile: Run the solver steps and their vector-Jacobian products compiled with
            ``torch.compile`` (same gradient to round-off; several times faster on small
            models). The first call per model, loss and shapes compiles (tens of
            seconds on CPU); later calls reuse it. Falls back to eager with a warning
            where compilation fails. A string picks the ``torch.compile`` mode, e.g.
            ``"reduce-overhead"`` (CUDA graphs: each step one graph launch on a GPU).
        batch_norm: How BatchNorm layers normalise in the inner loop (no effect on a
            model without them). ``"batch"`` (default; the MAML convention, transductive):
            with the mean and variance of the support batch each step sees, as a
            BatchNorm in training mode does, whatever ``model.training``.
            ``"running"``: with the layers' running statistics, as a BatchNorm in eval
            mode does (for meta-test time, when the model tracked running statistics
            during training; refused for layers with ``track_running_stats=False``).
            Either way amaml never updates the running statistics (nor
            ``num_batches_tracked``), in the forward or the backward pass: to maintain
            them, run the model in training mode on data yourself. Evaluate the query
            set with the same choice: :func:`functional_call` ``(..., batch_norm=...)``.

    Returns:
        Adapted parameters by name (the keys of ``model.named_parameters()``; buffers
        are not included: the model's own are used).

    Raises:
        ValueError: Bad ``steps``, ``lr``, ``proximal``, ``batch_norm``, shapes or
            non-finite data, or ``compile`` together with ``adjoint``.
        DivergenceError: The trajectory became non-finite (names the step).
        BacksolveError: ``memory="backsolve"`` could not reconstruct the start.

    Example:
        >>> import torch, amaml
        >>> net = torch.nn.Linear(1, 1)
        >>> x, y = torch.randn(8, 1), torch.randn(8, 1)
        >>> p = amaml.adapt(net, torch.nn.functional.mse_loss, (x, y), steps=10, lr=0.1)
        >>> torch.nn.functional.mse_loss(torch.func.functional_call(net, p, (x,)), y).backward()
        >>> net.weight.grad.shape
        torch.Size([1, 1])
    """
    return _adapt(model, loss_fn, support, steps=steps, lr=lr, solver=solver, memory=memory,
                  proximal=proximal, adjoint=adjoint, batched=False, compile=compile,
                  batch_norm=batch_norm)


def adapt_batch(
    model: nn.Module,
    loss_fn: LossFn,
    support: Batch,
    *,
    steps: int,
    lr: LearningRate,
    solver: str | AbstractSolver = "euler",
    memory: str | AbstractMemory = "checkpoint",
    proximal: Scalar = 0.0,
    adjoint: AbstractAdjoint | None = None,
    compile: bool | str = False,
    batch_norm: str = "batch",
) -> Params:
    """Adapt to a meta-batch of ``B`` tasks at once, as one batched computation.

    Like :func:`adapt`, with ``support = (xs, ys)`` of shapes ``[B, n, ...]``: all tasks
    start from the model's parameters and adapt independently, computed with
    ``torch.func.vmap`` rather than a loop. Each returned tensor has a leading task
    dimension ``B``. Evaluate query losses with :func:`functional_call_batch`.
    Gradients with respect to the model's parameters sum over tasks.

    ``batch_norm`` is as in :func:`adapt`: with ``"batch"`` (default) each task's
    BatchNorm statistics are those of its own support batch, exactly as :func:`adapt` on
    that task alone; with ``"running"`` every task uses the model's running statistics.
    The running statistics are never updated.

    Raises:
        ValueError: As :func:`adapt`; also ``compile`` on a model with BatchNorm and
            ``batch_norm="batch"``: the compiled steps differentiate with ``torch.func``,
            whose batched second derivative of batch statistics is wrong in torch 2.13.
    """
    return _adapt(model, loss_fn, support, steps=steps, lr=lr, solver=solver, memory=memory,
                  proximal=proximal, adjoint=adjoint, batched=True, compile=compile,
                  batch_norm=batch_norm)


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
    return _forward(model, batch_norm)(params, x)


def functional_call_batch(model: nn.Module, params: Params, x: Tensor, *,
                          batch_norm: str = "batch") -> Tensor:
    """Evaluate ``model`` with per-task parameters ``[B, ...]`` on inputs ``[B, n, ...]``.

    :func:`functional_call` task by task (under :func:`torch.func.vmap`), e.g. on the
    query sets with the parameters from :func:`adapt_batch`. With ``batch_norm="batch"``
    (default) each task is normalised with the statistics of its own inputs ``x[b]``;
    with ``"running"``, with the model's running statistics. Running statistics are never
    updated.
    """
    forward = _forward(model, batch_norm)
    return torch.func.vmap(forward)(params, x)
