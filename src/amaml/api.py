"""``amaml.adapt`` and ``amaml.adapt_batch``: gradient-flow adaptation of any nn.Module."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._types import Batch, LearningRate, LossFn, Params, Scalar
from .allocator import tune_cpu_allocator_once
from .batchnorm import BATCH_NORM_MODES, model_forward
from .calls import functional_call, functional_call_batch
from .fastpath import fused_plan
from .flow import (
    MEMORIES,
    SOLVERS,
    AbstractAdjoint,
    AbstractMemory,
    AbstractSolver,
    DiscreteAdjoint,
    Euler,
)
from .flow.auto import memory_lines
from .flow.integrate import FlowOptions, flow_context
from .flow.kernels import compile_mode
from .flow.scope import StepScope
from .flow.step_maps import AbstractStepMap, resolve_optimizer
from .folded import batch_plan
from .modelscope import (
    batch_blocker,
    batched_norm,
    draws_random,
    scope_lines,
    step_scope,
    vmap_trial,
)
from .params import FlatModel
from .support import check_steps_lr, check_support, schedule
from .taskrace import race_tasks

_LOG = logging.getLogger("amaml")

__all__ = ["BATCH_NORM_MODES", "adapt", "adapt_batch", "explain", "functional_call",
           "functional_call_batch", "resolve_solver", "resolve_memory", "resolve_optimizer"]


def resolve_solver(solver: str | AbstractSolver) -> AbstractSolver:
    """A solver instance from a registered name (``"euler"``, ``"heun"``, ``"rk4"``)."""
    if isinstance(solver, AbstractSolver):
        return solver
    if isinstance(solver, str) and solver.lower() in SOLVERS:
        return SOLVERS[solver.lower()]()
    raise ValueError(f"Unknown solver {solver!r}; expected one of {sorted(SOLVERS)} "
                     "or an AbstractSolver instance.")


def resolve_memory(memory: str | AbstractMemory) -> AbstractMemory:
    """A memory strategy from a registered name (``"auto"``, ``"store"``, ``"checkpoint"``,
    ``"revolve"``, ``"backsolve"``); an :class:`~amaml.flow.AbstractMemory` instance,
    including one defined outside the package, is returned as it is."""
    if isinstance(memory, AbstractMemory):
        return memory
    if isinstance(memory, str) and memory.lower() in MEMORIES:
        return MEMORIES[memory.lower()]()
    raise ValueError(f"Unknown memory strategy {memory!r}; expected one of {sorted(MEMORIES)} "
                     "or an AbstractMemory instance.")


@dataclass(frozen=True)
class _Options:
    """The keyword arguments of :func:`adapt`, :func:`adapt_batch` and :func:`explain`
    (same names), as one object the three share."""

    steps: int
    lr: LearningRate
    solver: str | AbstractSolver = "euler"
    memory: str | AbstractMemory = "auto"
    proximal: Scalar = 0.0
    adjoint: AbstractAdjoint | None = None
    compile: bool | str = False
    batch_norm: str = "batch"
    optimizer: str | AbstractStepMap | None = None
    meta_parameters: Sequence[Tensor] = ()
    batched: bool = False
    tasks: str = "auto"


@dataclass
class _Plan:
    """What one ``adapt`` call runs: everything but the flow itself."""

    flat: FlatModel
    loss: Callable[..., Tensor]
    path: str
    theta: Tensor
    dt: Tensor
    per_step: bool
    first: tuple[Tensor, ...]
    batches: Callable[[int], tuple[Tensor, ...]] | None
    solver: AbstractSolver
    adjoint: AbstractAdjoint
    optimizer: AbstractStepMap | None
    loop: bool = False  # a meta-batch adapted one task after another
    scope: StepScope = StepScope()

    def flow_options(self, o: _Options, first: Sequence[Tensor], batches: Any,
                     batched: bool) -> FlowOptions:
        """The flow of these tasks (``first``: their support data, or ``batches``)."""
        return FlowOptions(self.dt, o.steps, None, first if batches is None else (),
                           self.solver, self.adjoint, o.proximal, batched, self.optimizer,
                           batches, self.per_step, o.meta_parameters, self.scope)


def _plan(model: nn.Module, loss_fn: LossFn, data: Any, o: _Options) -> _Plan:
    steps, lr, solver, memory, proximal = o.steps, o.lr, o.solver, o.memory, o.proximal
    adjoint, batched, compile, batch_norm = o.adjoint, o.batched, o.compile, o.batch_norm
    optimizer, tasks = o.optimizer, o.tasks
    flat = FlatModel(model)
    if flat.params and flat.params[0].device.type == "cpu":
        # Keep freed memory for reuse (AMAML_MALLOC=system: no), before anything is
        # measured here (the memory model's step 0, adapt_batch's race).
        tune_cpu_allocator_once()
    forward = model_forward(model, batch_norm)  # ValueError naming batch_norm
    opt = resolve_optimizer(optimizer)  # ValueError naming the registered names
    batches = None
    if callable(data) and not isinstance(data, (tuple, list)):
        packed, first, batches = schedule(data, batched)
    else:
        packed, first = check_support(data, batched)
    check_steps_lr(steps, lr, proximal)
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable: loss_fn(prediction, target) -> scalar "
                        "(or loss_fn(output) with a dict support that holds the targets).")
    flat.check_like(first, packed.keys if not packed.targets else ())
    stepper = resolve_solver(solver)
    mode = compile_mode(compile)  # TypeError / ValueError naming the accepted values
    if adjoint is not None and mode is not None:
        raise ValueError(f"compile={compile!r} has no effect with adjoint={adjoint!r}: the "
                         "adjoint carries its own compile option. Pass adjoint="
                         f"DiscreteAdjoint(memory, compile={compile!r}) and leave compile "
                         "unset.")
    adj = adjoint if adjoint is not None else DiscreteAdjoint(memory=resolve_memory(memory),
                                                             compile=compile)
    theta = flat.theta()
    if opt is not None and not isinstance(stepper, Euler):
        raise ValueError(f"optimizer={opt.name!r} is a discrete step map with no Runge-Kutta "
                         f"form; it cannot be combined with solver={stepper.name!r}. Leave "
                         "solver='euler' (the default), or optimizer=None for gradient flow.")

    def loss(u: Tensor, *tensors: Tensor) -> Tensor:
        xb, yb = packed.unflatten(tensors)
        out = forward(flat.unflatten(u), xb)
        return loss_fn(out) if yb is None else loss_fn(out, yb)  # type: ignore[call-arg]

    # A plain MLP computes its own gradient and Hessian-vector products (exact, without
    # autograd graphs); any other model is differentiated through functional_call.
    if packed.kind == "tensor":
        fused, path = fused_plan(flat, loss_fn, first[0], batched)
    else:
        fused, path = None, f"generic: the model takes {packed.kind} inputs"
    chosen: Any = fused
    loop = False
    scope = step_scope(model, loss_fn)
    if batched:
        # How the meta-batch is computed (amaml.folded): a task at a time, folded into
        # channels, or by vmap where vmap is known to be exact for every layer.
        folded, loop, how = batch_plan(flat, loss_fn, first[0] if packed.kind == "tensor"
                                       else None, loss, packed.unflatten, batch_norm, tasks,
                                       fused is not None)
        norm = (batched_norm(model, batch_norm) if not loop and fused is None
                and isinstance(adj, DiscreteAdjoint) and compile_mode(adj.compile) is not None
                else None)
        if norm is not None:
            # The compiled steps differentiate with torch.func (vjp of vmap of grad), which
            # in torch 2.13 gets the second derivative of normalisation by the input's own
            # statistics wrong across vmapped tasks: batch-statistics BatchNorm after a
            # convolution (1e-2 relative against unrolled autograd), an affine LayerNorm
            # (2e-3, found by tests/differential; GroupNorm and a LayerNorm without affine
            # parameters measured exact). Eager, and a loop of compiled tasks, are exact.
            wrong = (f"compiled, and torch.func's batched second derivative of {norm} is "
                     "wrong")
            if tasks == "batched":
                raise ValueError(f"adapt_batch(tasks='batched', compile={compile!r}) "
                                 f"cannot batch this model exactly: {wrong}. Use "
                                 "compile=False (exact), or tasks='auto' (a loop of tasks).")
            folded, loop, how = None, True, f"tasks one after another ({wrong})"
        if not loop and fused is None and folded is None:
            # A random model (dropout in training mode) runs the loop too: its tasks then
            # draw the masks a seeded loop of adapt draws, task after task.
            # (tasks="batched" keeps vmap: exact for the masks it draws, other ones.)
            with scope():  # as the steps will run: module flags, attention kernel
                random = tasks == "auto" and draws_random(loss, theta,
                                                          [d[0] for d in first])
                why = batch_blocker(model) or (
                    "the model draws random numbers (dropout in training mode): the loop "
                    "draws each task's masks as adapt does" if random else None) \
                    or vmap_trial(loss, theta.expand(first[-1].shape[0], *theta.shape), first)
            if why is not None:
                if tasks == "batched":
                    raise ValueError(f"adapt_batch(tasks='batched') cannot batch this model "
                                     f"exactly: {why}. Use tasks='auto' (a loop of tasks "
                                     "where batching is not exact) or tasks='loop'.")
                loop, how = True, f"tasks one after another ({why})"
        compiled = isinstance(adj, DiscreteAdjoint) and compile_mode(adj.compile) is not None
        if tasks == "auto" and not loop and fused is None and not compiled:
            # batched or a loop of tasks: whichever one step measures faster (compiled steps
            # keep the batched form)
            with scope():
                folded, loop, how = race_tasks(model, loss, folded, theta, first, how)
        chosen = fused if fused is not None else (None if loop else folded)
        path += f"; {how}"
    dt, per_step = flat.flat_lr(lr, theta, steps)
    _LOG.debug("adapt: %s", path)
    return _Plan(flat, loss if chosen is None else chosen, path, theta, dt, per_step, first,
                 batches, stepper, adj, opt, loop, scope)


def _adapt(model: nn.Module, loss_fn: LossFn, data: Any, o: _Options) -> Params:
    plan = _plan(model, loss_fn, data, o)
    batched = o.batched

    def flow(first: Sequence[Tensor], batches: Any, batched: bool) -> Tensor:
        return plan.adjoint.solve(flow_context(plan.loss, plan.theta,
                                               plan.flow_options(o, first, batches, batched)))

    if plan.loop:  # a meta-batch, one task after another, stacked
        rows = []
        for b in range(plan.first[-1].shape[0]):
            batches_b = None if plan.batches is None else (
                lambda k, b=b, of=plan.batches: tuple(t[b] for t in of(k)))
            rows.append(flow([d[b] for d in plan.first], batches_b, False))
        u_end = torch.stack(rows)
    else:
        u_end = flow(plan.first, plan.batches, batched)
    out = plan.flat.unflatten(u_end)
    for n, p in plan.flat.frozen.items():
        out[n] = p.expand(plan.first[-1].shape[0], *p.shape) if batched else p
    return out


def adapt(
    model: nn.Module,
    loss_fn: LossFn,
    support: Batch,
    *,
    steps: int,
    lr: LearningRate,
    solver: str | AbstractSolver = "euler",
    memory: str | AbstractMemory = "auto",
    proximal: Scalar = 0.0,
    adjoint: AbstractAdjoint | None = None,
    compile: bool | str = False,
    batch_norm: str = "batch",
    optimizer: str | AbstractStepMap | None = None,
    meta_parameters: Sequence[Tensor] = (),
) -> Params:
    """Adapt a model to one task by gradient flow; differentiable by the adjoint method.

    Integrates ``du/dt = -grad L(u) - proximal * (u - theta)``, ``u(0) = theta`` (the
    model's parameters), ``L(u) = loss_fn(model_u(x), y)``, over the horizon
    ``T = steps * lr`` with ``steps`` solver steps of size ``lr``. With
    ``solver="euler"`` this is exactly ``steps`` steps of gradient descent.

    With ``optimizer=`` (``amaml.optim.SGD(momentum=0.9)``, ``Adam()``, ``AdamW()``,
    ``RMSprop()`` or their names) the inner loop is ``steps`` steps of that optimiser
    instead, torch.optim's update rules with learning rate ``lr``; the meta-gradient is the
    exact discrete adjoint of those steps (the optimiser's buffers are part of each kept
    state: 3 parameter vectors a state for Adam).

    The result is differentiable with respect to the model's parameters and every other
    tensor that requires grad and that the inner loop reads: ``lr`` and ``proximal`` when
    they are tensors, the support data (dataset distillation), the optimiser's
    hyperparameters given as tensors, and the tensors the loss reads (a loss weight in a
    closure, the parameters of a loss module), which are found by evaluating the loss
    once and walking its autograd graph. Evaluate a query loss with
    :func:`functional_call` ``(model, params, x_query)`` (for a model without BatchNorm,
    the same as ``torch.func.functional_call(model, params, (x_query,))``) and call
    ``.backward()``: the meta-gradient lands in each parameter's ``.grad``. No graph of
    the inner loop is kept; the model itself is never modified: not its parameters, not
    its buffers (BatchNorm running statistics), not its ``training`` flags.

    Args:
        model: Any ``torch.nn.Module``; its trainable parameters are adapted (frozen
            ones pass through). A model or loss that draws random numbers (dropout in
            training mode) is handled: each step's random state is recorded in the
            forward pass and replayed wherever the step is evaluated again, so the
            meta-gradient is that of the masks drawn (a seeded ``adapt`` draws what a
            seeded plain loop draws; the states cost 5 KB a step on CPU, held until the
            backward pass); backsolve and ``Implicit()`` refuse it.
        loss_fn: ``loss_fn(prediction, target) -> scalar tensor``.
        support: The support set ``(inputs, y)``, with matching first dimensions;
            ``inputs`` is a tensor (``model(x)``), a tuple (``model(*inputs)``) or a dict
            (``model(**inputs)``). Or a mini-batch schedule: a callable ``k -> (inputs_k,
            y_k)`` for step ``k``, deterministic (it is called again in the backward pass),
            e.g. :class:`amaml.MiniBatches`.
        steps: Number of solver steps, >= 1.
        lr: Inner learning rate (the step size) > 0: a float, a 0-d tensor, a ``(steps,)``
            tensor (a per-step schedule), or a dict name -> tensor of per-parameter rates
            broadcastable to each parameter (Meta-SGD); a dict value of shape
            ``(steps, *broadcastable)`` is a per-step rate of that parameter. Tensors
            requiring grad get their meta-gradient too.
        solver: ``"euler"``, ``"heun"``, ``"rk4"`` or an ``AbstractSolver``.
        memory: ``"auto"`` (default: the fastest exact strategy whose predicted peak fits
            half the memory free on the device, measured on step 0: every step's autograd
            graph kept, as unrolling does, while the whole loop fits, else checkpoints or
            revolve; ``Auto(megabytes=M)`` or the environment variable
            ``AMAML_MEMORY_BUDGET_MB`` set the budget; :func:`explain` says which and why;
            ``docs/memory.md``), ``"store"`` (all states), ``"checkpoint"``
            (O(sqrt(steps)) states, one extra forward pass; exact), ``"revolve"``
            (binomial checkpointing: at most 22 states whatever ``steps``, a few extra
            forward passes; exact; ``Revolve(snapshots=k)``
            sets the budget), ``Budget(megabytes=M)`` (the last steps' autograd graphs
            while they fit in ``M`` MiB, back-propagated as unrolling does; checkpoints
            before; exact), ``"backsolve"`` (O(1) states; approximate), or any
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
        optimizer: ``None`` (default: gradient flow with ``solver``), an inner optimiser
            from :mod:`amaml.optim`, or its name (``"sgd"``, ``"adam"``, ``"adamw"``,
            ``"rmsprop"``, with torch.optim's defaults). Needs ``solver="euler"``; not with
            ``memory="backsolve"`` or ``Implicit()``.
        meta_parameters: Tensors the inner loss reads whose meta-gradient is wanted and
            that evaluating the loss once, at the first step, does not show (e.g. read only
            by later steps of a mini-batch schedule); those the first step reads are found
            by themselves.

    Returns:
        Adapted parameters by name (the keys of ``model.named_parameters()``; buffers
        are not included: the model's own are used).

    Raises:
        ValueError: Bad ``steps``, ``lr``, ``proximal``, ``batch_norm``, ``optimizer``,
            shapes or non-finite data, ``compile`` together with ``adjoint``, an optimiser
            with a solver other than Euler, a loss that draws random numbers under
            backsolve or the implicit adjoint, or a loss that reads a non-leaf tensor
            requiring grad (compute it inside the loss).
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
    return _adapt(model, loss_fn, support, _Options(
        steps, lr, solver, memory, proximal, adjoint, compile, batch_norm, optimizer,
        meta_parameters))


def adapt_batch(
    model: nn.Module,
    loss_fn: LossFn,
    support: Batch,
    *,
    steps: int,
    lr: LearningRate,
    solver: str | AbstractSolver = "euler",
    memory: str | AbstractMemory = "auto",
    proximal: Scalar = 0.0,
    adjoint: AbstractAdjoint | None = None,
    compile: bool | str = False,
    batch_norm: str = "batch",
    optimizer: str | AbstractStepMap | None = None,
    meta_parameters: Sequence[Tensor] = (),
    tasks: str = "auto",
) -> Params:
    """Adapt to a meta-batch of ``B`` tasks at once.

    Like :func:`adapt`, with ``support = (xs, ys)`` of shapes ``[B, n, ...]``: all tasks
    start from the model's parameters and adapt independently. Each returned tensor has a
    leading task dimension ``B``. Evaluate query losses with :func:`functional_call_batch`.
    Gradients with respect to the model's parameters sum over tasks.

    ``tasks`` says how the ``B`` tasks are computed, the same numbers either way (to
    round-off): ``"batched"``: one batched computation, the fused MLP's own, a chain of
    Conv2d / BatchNorm2d / pooling / activations / Flatten / Linear with the tasks folded
    into channels (one grouped convolution per layer, no copies of the activations
    between layers, :mod:`amaml.folded`), any other model under ``torch.func.vmap``;
    ``"loop"``: one task after another, as :func:`adapt` on each (a smaller working set);
    ``"auto"`` (default): the fused MLP batched; otherwise whichever of the two one step
    measures faster for this model, shapes and device (measured at the first call and
    cached, :mod:`amaml.taskrace`; on a CPU a vmapped ResNet-18 step takes longer than a
    loop of its tasks, a folded Conv-4 less), and the loop wherever batching would not be
    exact. :func:`explain` (``batched=True``) says which and gives the figures.

    ``batch_norm`` is as in :func:`adapt`: with ``"batch"`` (default) each task's
    BatchNorm statistics are those of its own support batch, exactly as :func:`adapt` on
    that task alone; with ``"running"`` every task uses the model's running statistics.
    The running statistics are never updated.

    Raises:
        ValueError: As :func:`adapt`; also ``compile`` on a model with BatchNorm and
            ``batch_norm="batch"``: the compiled steps differentiate with ``torch.func``,
            whose batched second derivative of batch statistics is wrong in torch 2.13.
    """
    return _adapt(model, loss_fn, support, _Options(
        steps, lr, solver, memory, proximal, adjoint, compile, batch_norm, optimizer,
        meta_parameters, True, tasks))


def explain(
    model: nn.Module,
    loss_fn: LossFn,
    support: Any,
    *,
    steps: int,
    lr: LearningRate,
    solver: str | AbstractSolver = "euler",
    memory: str | AbstractMemory = "auto",
    proximal: Scalar = 0.0,
    adjoint: AbstractAdjoint | None = None,
    compile: bool | str = False,
    batch_norm: str = "batch",
    optimizer: str | AbstractStepMap | None = None,
    batched: bool = False,
    tasks: str = "auto",
) -> str:
    """What :func:`adapt` (``batched=True``: :func:`adapt_batch`) would run with these
    arguments, in words, without running it: how the model is differentiated (the fused
    MLP path or the generic one, and why), the inner step map, the meta-parameters found
    (tensors the loss reads that require grad included), the adjoint and the kernel of
    the step VJPs with the reasons the faster kernels were not taken. The same checks as
    :func:`adapt` (it raises what :func:`adapt` would raise). ``logging.getLogger("amaml")``
    at DEBUG level logs the path and the kernel of every call.

    Example:
        >>> import torch, amaml
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(),
        ...                           torch.nn.Linear(8, 1))
        >>> x, y = torch.randn(16, 2), torch.randn(16, 1)
        >>> print(amaml.explain(net, torch.nn.functional.mse_loss, (x, y), steps=10,
        ...                     lr=0.1).splitlines()[0])
        model: fused MLP (nn.Sequential: 2 linear layers)
    """
    o = _Options(steps, lr, solver, memory, proximal, adjoint, compile, batch_norm, optimizer,
                 (), batched, tasks)
    plan = _plan(model, loss_fn, support, o)
    first, batches = plan.first, plan.batches
    if plan.loop:  # each task's flow alone: the first one's stands for all
        first = tuple(d[0] for d in first)
        batches = None if batches is None else (
            lambda k, of=batches: tuple(t[0] for t in of(k)))
    flow = flow_context(plan.loss, plan.theta,
                        plan.flow_options(o, first, batches, batched and not plan.loop))
    step_map, reads = flow.spec.step_map, flow.reads
    if isinstance(step_map, AbstractSolver):
        step = f"{steps} steps of gradient flow, solver {step_map.name}"
    else:
        step = f"{steps} steps of {step_map.describe()}"
    found = [f"theta ({plan.theta.numel()} numbers)"]
    if plan.dt.requires_grad:
        found.append(f"lr {tuple(plan.dt.shape) or 'scalar'}"
                     + (" per step" if plan.per_step else ""))
    found += [f"support tensor {i} {tuple(d.shape)}" for i, d in enumerate(reads.data)
              if d.requires_grad]
    found += [f"optimizer {n}" for n, t in zip(reads.hyper_names, reads.hyper)
              if t.requires_grad]
    found += [f"a tensor the loss reads {tuple(t.shape)}" for t in reads.captured]
    kernel = flow.choice.describe()
    with plan.scope():  # the first step measured as the loop will take it
        memory_line = (memory_lines(flow, plan.adjoint.memory)
                       if isinstance(plan.adjoint, DiscreteAdjoint) else [])
    return "\n".join([f"model: {plan.path}", f"inner loop: {step}",
                      f"meta-parameters: {', '.join(found)}", f"adjoint: {plan.adjoint!r}",
                      *memory_line, f"step VJP kernel: {kernel}",
                      *scope_lines(model, plan.scope, plan.loss, plan.theta, flow)])
