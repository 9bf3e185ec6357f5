"""Which models take the fused MLP path (:mod:`amaml.flow.fused`), and why the others do not.

A model takes it when its computation is a chain of layers the fused loss differentiates
by hand: ``nn.Linear`` and the activations tanh, ReLU, sigmoid, identity (as modules or as
``torch.tanh`` / ``torch.relu`` / ``torch.sigmoid`` / ``F.relu`` calls). The chain is read
from an exact ``nn.Sequential`` directly, and from any other module by tracing its
``forward`` with :func:`torch.fx.symbolic_trace` (a custom ``nn.Module`` written as
``self.l3(torch.tanh(self.l2(...)))``, a loop over an ``nn.ModuleList``): the trace is a
chain when every operation takes the previous one's output alone. The layer kinds are a
table keyed by module type and function (:data:`LAYER_KINDS`, :data:`FUNCTION_KINDS`).
Traces are cached per model (and checked against its submodules at each call).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._types import LossFn
from .mlp import Layer, MLPLoss
from .params import FlatModel

__all__ = ["FUNCTION_KINDS", "LAYER_KINDS", "fused_loss", "fused_plan", "hooked", "layer_chain"]


#: Module types the fused MLP computes, by exact type (a subclass may change ``forward``).
LAYER_KINDS: dict[type[nn.Module], str] = {nn.Linear: "linear", nn.Tanh: "tanh",
                                           nn.ReLU: "relu", nn.Sigmoid: "sigmoid",
                                           nn.Identity: "identity"}
#: Functions (and tensor methods, by name) a traced ``forward`` may call between layers.
FUNCTION_KINDS: dict[Any, str] = {torch.tanh: "tanh", torch.relu: "relu", F.relu: "relu",
                                  torch.sigmoid: "sigmoid", "tanh": "tanh", "relu": "relu",
                                  "sigmoid": "sigmoid"}

_Chain = list[tuple[str | None, str, nn.Module | None]]  # (module name, kind, module)
_Kinds = dict[type[nn.Module], str]
# per model: (its submodules' ids, {id of a kinds table: chain or why not})
_TRACES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], dict[int, _Chain | str]]] = (
    weakref.WeakKeyDictionary())


def has_hooks(module: nn.Module) -> bool:
    return any(bool(getattr(module, name, None)) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
        "_state_dict_hooks", "_load_state_dict_pre_hooks"))


def hooked(model: nn.Module) -> bool:
    """Whether ``model``, a submodule, or the global module registry has hooks (a
    hand-written path would skip them)."""
    return _global_hooks() or any(has_hooks(m) for m in model.modules())


def _global_hooks() -> bool:
    from torch.nn.modules import module as _module
    return any(bool(getattr(_module, name, None)) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def _module_kind(name: str, m: nn.Module, kinds: _Kinds
                 ) -> tuple[str | None, str, nn.Module | None] | str:
    kind = kinds.get(type(m))
    if kind is None:
        return f"layer {name or '?'} is a {type(m).__name__}, not one of " \
               f"{sorted(t.__name__ for t in kinds)}"
    return name, kind, m


def _sequential_chain(model: nn.Sequential, kinds: _Kinds) -> _Chain | str:
    children = list(model._modules.items())  # children() would hide a repeated layer
    if any(m is None for _, m in children) or len({id(m) for _, m in children}) != len(children):
        return "the nn.Sequential repeats a layer or holds None"
    chain: _Chain = []
    for name, m in children:
        assert m is not None
        step = _module_kind(name, m, kinds)
        if isinstance(step, str):
            return step
        chain.append(step)
    return chain


def _traced_chain(model: nn.Module, kinds: _Kinds) -> _Chain | str:
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as err:  # noqa: BLE001 - any tracing failure means "not a chain"
        return f"torch.fx cannot trace {type(model).__name__}.forward ({type(err).__name__})"
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return f"{type(model).__name__}.forward takes {len(inputs)} inputs, not one"
    prev, chain = inputs[0], []
    seen: set[int] = set()
    for n in nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            if n.args[0] is not prev:
                return "the output is not the end of one chain of layers"
            break
        kwargs = {k: v for k, v in n.kwargs.items() if not (k == "inplace" and v is False)}
        if kwargs or len(n.args) != 1 or n.args[0] is not prev:
            return f"{n.op} {n.target} does not take the previous layer's output alone"
        if n.op == "call_module":
            m = model.get_submodule(str(n.target))
            if id(m) in seen:
                return f"layer {n.target} is used twice"
            seen.add(id(m))
            step = _module_kind(str(n.target), m, kinds)
            if isinstance(step, str):
                return step
            chain.append(step)
        elif n.op in ("call_function", "call_method") and n.target in FUNCTION_KINDS:
            chain.append((None, FUNCTION_KINDS[n.target], None))
        else:
            return f"{n.op} {getattr(n.target, '__name__', n.target)} is not a supported layer"
        prev = n
    return chain


def layer_chain(model: nn.Module, kinds: _Kinds = LAYER_KINDS) -> _Chain | str:
    """``model``'s computation as a chain of ``(module name, kind, module)`` (a function
    between layers: name and module ``None``), each module's kind read from ``kinds`` by
    exact type; or a sentence saying why it is not such a chain."""
    if type(model) is nn.Sequential:
        return _sequential_chain(model, kinds)
    key = tuple(id(m) for m in model.modules())  # a swapped submodule traces again
    hit = _TRACES.get(model)
    if hit is None or hit[0] != key:
        hit = (key, {})
        _TRACES[model] = hit
    if id(kinds) not in hit[1]:
        hit[1][id(kinds)] = _traced_chain(model, kinds)
    return hit[1][id(kinds)]


def fused_plan(flat: FlatModel, loss_fn: LossFn, x: Tensor, batched: bool
               ) -> tuple[MLPLoss | None, str]:
    """The fused MLP loss for ``flat.model`` and a sentence saying which path and why.

    The fused loss is built when the model's computation is a chain of supported layers
    (see the module) that it computes exactly as the module does: no hooks, no buffers,
    every parameter trainable and used by the chain in the order the module registers
    them, inputs ``[n, features]`` (``[B, n, features]`` batched) of the parameters' dtype
    and device. Everything else (BatchNorm, convolutions, several inputs) takes the
    generic path (``torch.func.functional_call`` and autograd).

    Returns:
        ``(loss, why)``: ``loss`` is ``None`` on the generic path.
    """
    model = flat.model
    name = type(model).__name__
    if flat.frozen:
        return None, f"generic: {name} has frozen parameters"
    if hooked(model):
        return None, f"generic: {name} or a submodule has hooks"
    if any(True for _ in model.buffers()):
        return None, f"generic: {name} has buffers (e.g. BatchNorm statistics)"
    chain = layer_chain(model)
    if isinstance(chain, str):
        return None, f"generic: {chain}"
    layers: list[Layer] = []
    order: list[str] = []
    for qual, kind, m in chain:
        if kind == "linear":
            assert isinstance(m, nn.Linear)
            layers.append(Layer("linear", m.in_features, m.out_features, m.bias is not None))
            prefix = f"{qual}." if qual else ""
            order += [prefix + "weight"] + ([prefix + "bias"] if m.bias is not None else [])
        else:
            layers.append(Layer(kind))
    linear = [lay for lay in layers if lay.kind == "linear"]
    if not linear:
        return None, f"generic: {name} has no linear layer"
    if order != list(flat.names):
        return None, (f"generic: {name}'s chain uses its parameters in another order "
                      "than it registers them")
    p0 = flat.params[0]
    if x.ndim != (3 if batched else 2) or x.shape[-1] != linear[0].in_features:
        return None, f"generic: inputs of shape {tuple(x.shape)} are not [n, features]"
    if x.dtype != p0.dtype or x.device != p0.device:
        return None, "generic: inputs of another dtype or device than the parameters"
    fused = MLPLoss(layers, loss_fn)
    if fused.n_params != sum(flat.sizes):
        return None, "generic: the chain does not use every parameter"
    how = "nn.Sequential" if type(model) is nn.Sequential else f"torch.fx chain of {name}"
    return fused, f"fused MLP ({how}: {len(linear)} linear layers)"


def fused_loss(flat: FlatModel, loss_fn: LossFn, x: Tensor, batched: bool) -> MLPLoss | None:
    """:func:`fused_plan`'s loss alone."""
    return fused_plan(flat, loss_fn, x, batched)[0]

