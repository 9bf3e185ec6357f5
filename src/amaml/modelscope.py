"""What :func:`amaml.adapt` fixes about a model when the inner loop runs, and which models
batch exactly.

- :func:`step_scope`: every submodule's ``training`` flag as it was when ``adapt`` ran is
  put back wherever the steps are evaluated again (the backward sweep, recomputed
  segments, tapes), so that a caller who switches ``model.eval()`` before the query gets
  the meta-gradient of the loop that ran (dropout masks included, which the flow replays);
  attention is evaluated with the math kernel, whose derivative is differentiable again
  (torch's fused scaled-dot-product kernels have no double backward).
- :func:`batch_blocker`: the first layer that ``torch.func.vmap`` is not known to batch
  exactly, or ``None``: :func:`amaml.adapt_batch` then runs the tasks one after another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

from ._types import LossFn
from .flow.fused import AbstractFusedLoss
from .flow.scope import StepScope

__all__ = ["BATCH_EXACT", "attention_kernels", "batch_blocker", "draws_random",
           "batched_norm", "mha_fastpath_off", "scope_lines", "step_scope", "vmap_trial"]


def _address(t: Tensor) -> int:
    return int(t.untyped_storage().data_ptr())


def step_scope(model: nn.Module, loss_fn: LossFn) -> StepScope:
    """The :class:`~amaml.flow.scope.StepScope` of one ``adapt`` call on ``model``: the
    module flags of now, the math attention kernel, and names of what the steps may read
    (buffers, frozen parameters, tensors ``loss_fn`` captures) for messages."""
    flags = tuple((m, m.training) for m in model.modules())

    @contextmanager
    def enter() -> Iterator[None]:
        now = [m.training for m, _ in flags]
        for m, flag in flags:
            m.training = flag
        try:
            with sdpa_kernel(SDPBackend.MATH), mha_fastpath_off():
                yield
        finally:
            for (m, _), flag in zip(flags, now):
                m.training = flag

    names: dict[int, str] = {}
    for n, b in model.named_buffers():
        names.setdefault(_address(b), f"the model's buffer {n!r}")
    for n, p in model.named_parameters():
        if not p.requires_grad:
            names.setdefault(_address(p), f"the model's frozen parameter {n!r}")
    for n, t in _closure_tensors(loss_fn):
        names.setdefault(_address(t), f"the tensor {n!r} that loss_fn captures")
    if isinstance(loss_fn, nn.Module):
        for n, t in [*loss_fn.named_buffers(), *loss_fn.named_parameters()]:
            names.setdefault(_address(t), f"loss_fn's tensor {n!r}")
    return StepScope(enter, names)


@contextmanager
def mha_fastpath_off() -> Iterator[None]:
    """Keep nn.MultiheadAttention and nn.TransformerEncoderLayer off their inference fast
    path, which has no derivative: under vmap the parameters' ``requires_grad``, which
    normally keeps them off it, is not visible."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _closure_tensors(fn: Any) -> list[tuple[str, Tensor]]:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    found = []
    if code is not None:
        for name, cell in zip(code.co_freevars, cells):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(value, Tensor):
                found.append((name, value))
        glob = getattr(fn, "__globals__", {})
        found += [(n, glob[n]) for n in code.co_names if isinstance(glob.get(n), Tensor)]
    return found


#: Fused attention kernels that the steps' double backward cannot go through.
_FUSED_ATTENTION = ("ScaledDotProductFlash", "ScaledDotProductEfficient",
                    "ScaledDotProductCudnn", "ScaledDotProductFused")


def attention_kernels(loss: Callable[..., Tensor], u: Tensor, data: Any) -> list[str]:
    """The fused attention kernels one evaluation of ``loss(u, *data)`` goes through
    outside amaml's scope (autograd node names), for :func:`amaml.explain`."""
    with torch.enable_grad():
        out = loss(u.detach().requires_grad_(True), *data)
    names: set[str] = set()
    stack, seen = [getattr(out, "grad_fn", None)], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        name = type(node).__name__
        if name.startswith(_FUSED_ATTENTION):
            names.add(name)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return sorted(names)


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.SELU,
                nn.CELU, nn.LeakyReLU, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Hardtanh,
                nn.Hardswish, nn.Mish, nn.LogSigmoid, nn.Softmax,
                nn.LogSoftmax, nn.Identity)

#: torch.nn layers that :func:`torch.func.vmap` batches exactly, each tested against a loop
#: of :func:`amaml.adapt` in ``tests/test_batch_exact.py``. A torch.nn layer outside this
#: table (recurrent layers, whose vmap rule is missing, an ``Embedding`` with
#: ``padding_idx``, whose vmapped gradient is wrong) makes :func:`amaml.adapt_batch` run a
#: loop of tasks; modules defined outside torch.nn are judged by their own layers and by a
#: trial batched evaluation.
BATCH_EXACT: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
    nn.ConvTranspose2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm,
    nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten,
    nn.Unflatten, nn.Embedding, nn.MultiheadAttention, nn.TransformerEncoderLayer,
    nn.TransformerEncoder, nn.modules.linear.NonDynamicallyQuantizableLinear,
    nn.Sequential, nn.ModuleList, nn.ModuleDict, *_ACTIVATIONS,
)


def _why_not(name: str, m: nn.Module) -> str | None:
    if isinstance(m, nn.Embedding):
        if m.padding_idx is not None:
            return (f"{name} is an Embedding with padding_idx={m.padding_idx} (vmap gives the "
                    "padding row a gradient for every task but the first)")
        if m.max_norm is not None:
            return f"{name} is an Embedding with max_norm (it renormalises its weight in place)"
        return None
    if not type(m).__module__.startswith("torch.nn"):
        return None  # the user's or a library's own module: judged by its layers
    if type(m) in BATCH_EXACT:
        return None
    return f"{name} is a {type(m).__name__}, not a layer known to batch exactly under vmap"


def batch_blocker(model: nn.Module) -> str | None:
    """Why ``model``'s tasks cannot be batched exactly by vmap, or ``None``."""
    for name, m in model.named_modules():
        why = _why_not(name or type(model).__name__, m)
        if why is not None:
            return why
    return None


def draws_random(fn: Callable[..., Tensor], u: Tensor, data: Any) -> bool:
    """Whether one evaluation of ``fn(u, *data)`` draws random numbers (dropout in training
    mode); the random state is put back either way."""
    devices = [u.device] if u.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        before = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(u.device) if devices else None
        fn(u.detach(), *data)
        return (not torch.equal(before, torch.get_rng_state())
                or (cuda is not None and not torch.equal(cuda, torch.cuda.get_rng_state(
                    u.device))))


def vmap_trial(fn: Callable[..., Tensor], u: Tensor, data: Any) -> str | None:
    """Evaluate ``vmap(fn)`` once (a model whose code vmap cannot batch, e.g. control flow
    on data, fails here rather than mid-loop); the first line of the error, or ``None``."""
    try:
        with torch.random.fork_rng(devices=[u.device] if u.device.type == "cuda" else []), \
                torch.enable_grad():
            torch.func.vmap(fn, randomness="different")(u.detach(), *data)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:
        return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return None


def batched_norm(model: nn.Module, batch_norm: str) -> str | None:
    """The first layer whose batched second derivative torch.func gets wrong (compiled
    ``adapt_batch`` then loops over the tasks), or ``None``."""
    return next((f"{n or type(m).__name__} ({type(m).__name__})"
                 for n, m in model.named_modules()
                 if (isinstance(m, nn.LayerNorm) and m.elementwise_affine)
                 or (isinstance(m, _BatchNorm) and batch_norm == "batch")), None)


def scope_lines(model: nn.Module, scope: StepScope, loss: Any, theta: Tensor, flow: Any
                ) -> list[str]:
    """What the steps read besides their tensors, for :func:`amaml.explain`: the module
    modes, the attention kernel, the tensors checked before the backward pass."""
    modules = list(model.modules())
    training = sum(m.training for m in modules)
    lines = [f"module modes: fixed as now for every evaluation of the steps, backward pass "
             f"included ({training} of {len(modules)} modules in training mode)"]
    data = flow.reads.at(0).data
    data = [d[0] for d in data] if flow.spec.objective.batched else list(data)
    # The fused MLP computes no attention; a folded chain's one task is the user's model.
    probe = None if isinstance(loss, AbstractFusedLoss) else getattr(loss, "single", loss)
    fused = [] if probe is None else attention_kernels(probe, theta, data)
    if fused:
        lines.append(f"attention: evaluated with the math kernel in the inner loop (outside "
                     f"it the model runs {', '.join(fused)}, which has no double backward)")
    watched = flow.spec.watched.tensors
    if watched:
        names = [scope.name(t) for t in watched]
        lines.append(f"checked unchanged before the backward pass: {'; '.join(names)}")
    return lines
