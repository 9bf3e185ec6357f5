"""Independent references for the differential suite (no amaml code involved).

``unrolled``: the inner loop written out with plain autograd (``create_graph=True``) through
:func:`torch.func.functional_call`, one step of torch.optim's update equations at a time
(the equations of ``tests/optim_reference.py``, torch 2.13's single-tensor SGD, Adam and
RMSprop with ``maximize=False``), so that the meta-gradient is ordinary back-propagation
through every step.

Two conventions are amaml's documented ones, written here from their definitions:

* BatchNorm (``batch_norm="batch"``): normalise with the statistics of the batch each call
  sees and never update the model's running statistics. Here the BatchNorm layers are put
  in training mode for the call and given *copies* of their running buffers, which the call
  then updates and which are thrown away.
* The square root at zero (Adam, RMSprop): where ``v == 0`` (every gradient so far exactly
  0: the padding row of an embedding, an unused token's row) ``sqrt`` gets the derivative 0,
  the limit amaml documents (``amaml.flow.step_maps.base.sqrt0``); plain ``torch.sqrt``
  would give NaN.

Attention (``scaled_dot_product_attention``: nn.TransformerEncoder, BERT, GPT-2) runs on
the math kernel: the same function to round-off, and twice differentiable, which the
default CPU kernel (flash attention) is not in torch 2.13; amaml must cope with the default
kernel itself (the models are handed to it as they are).

Random numbers (dropout) are drawn by the model itself in call order: seeded before the
loop, the reference draws step 0's masks, step 1's, ..., then the query's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

OPTIMIZERS = ("gd", "sgd", "adam", "rmsprop")


def trainable(model: nn.Module) -> dict[str, Tensor]:
    """The parameters amaml adapts: ``named_parameters()`` (tied ones once) that require
    grad."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@contextmanager
def _bn_train(model: nn.Module):
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    flags = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, f in zip(layers, flags):
            m.training = f


def call(model: nn.Module, params: dict[str, Tensor], inputs: Any) -> Any:
    """``model(inputs)`` with ``params`` (the others the model's own); BatchNorm with batch
    statistics on throw-away copies of its running buffers."""
    bn_buffers = {}
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            for b in ("running_mean", "running_var", "num_batches_tracked"):
                t = getattr(m, b, None)
                if t is not None:
                    bn_buffers[f"{name}.{b}" if name else b] = t.clone()
    args: tuple = ()
    kwargs: dict = {}
    if isinstance(inputs, dict):
        kwargs = dict(inputs)
    elif isinstance(inputs, tuple):
        args = inputs
    else:
        args = (inputs,)
    with _bn_train(model), sdpa_kernel([SDPBackend.MATH]):
        return torch.func.functional_call(model, {**params, **bn_buffers}, args, kwargs)


def task_loss(model: nn.Module, loss_fn: Callable, params: dict[str, Tensor], data: Any,
              form: str) -> Tensor:
    """The loss of one set: ``loss_fn(model(x), y)`` for a pair, ``loss_fn(model(**d))``
    for a dict holding its targets."""
    if form == "dict":
        return loss_fn(call(model, params, data))
    x, y = data
    return loss_fn(call(model, params, x), y)


def sqrt0(v: Tensor) -> Tensor:
    """``sqrt(v)``, derivative 0 where ``v == 0`` (see the module docstring)."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))),
                       torch.zeros_like(v))


def opt_step(kind: str, k: int, u: Sequence[Tensor], g: Sequence[Tensor],
             state: dict[str, list[Tensor]], lr: float | Tensor) -> list[Tensor]:
    """Step ``k`` of ``kind`` with torch.optim's defaults (SGD: momentum 0.9)."""
    out = []
    for i, (p, gi) in enumerate(zip(u, g)):
        if kind == "gd":
            out.append(p - lr * gi)
        elif kind == "sgd":  # momentum 0.9, dampening 0: buf_0 = g
            buf = gi if k == 0 else 0.9 * state["buf"][i] + gi
            state["buf"][i] = buf
            out.append(p - lr * buf)
        elif kind == "adam":  # betas (0.9, 0.999), eps 1e-8
            t = k + 1
            m = 0.9 * state["m"][i] + (1 - 0.9) * gi
            v = 0.999 * state["v"][i] + (1 - 0.999) * gi * gi
            state["m"][i], state["v"][i] = m, v
            denom = sqrt0(v) / (1 - 0.999 ** t) ** 0.5 + 1e-8
            out.append(p - (lr / (1 - 0.9 ** t)) * m / denom)
        elif kind == "rmsprop":  # alpha 0.99, eps 1e-8, no momentum, not centred
            sq = 0.99 * state["sq"][i] + (1 - 0.99) * gi * gi
            state["sq"][i] = sq
            out.append(p - lr * gi / (sqrt0(sq) + 1e-8))
        else:
            raise ValueError(kind)
    return out


def unrolled(model: nn.Module, loss_fn: Callable, support: Any, form: str, *, steps: int,
             lr: float | Tensor, kind: str) -> dict[str, Tensor]:
    """The adapted parameters after ``steps`` unrolled steps, with their autograd graph.

    ``lr``: a float, a 0-d tensor, or a ``(steps,)`` tensor (step k uses ``lr[k]``). Runs
    in the modules' current modes (train: dropout draws its masks)."""
    theta = trainable(model)
    names = list(theta)
    u = [theta[n] for n in names]
    state = {key: [torch.zeros_like(p) for p in u] for key in ("buf", "m", "v", "sq")}
    for k in range(steps):
        loss = task_loss(model, loss_fn, dict(zip(names, u)), support, form)
        g = torch.autograd.grad(loss, u, create_graph=True)
        lr_k = lr[k] if isinstance(lr, Tensor) and lr.ndim == 1 else lr
        u = opt_step(kind, k, u, g, state, lr_k)
    return dict(zip(names, u))


def flat_grad(out: Tensor, wrt: Sequence[Tensor]) -> Tensor:
    """``d out / d wrt``, flat; a tensor ``out`` does not reach counts as zeros."""
    grads = torch.autograd.grad(out, list(wrt), allow_unused=True)
    return torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1)
                      for g, t in zip(grads, wrt)])


def central_difference(J: Callable[[float], float], eps: float) -> float:
    """The directional derivative ``J'(0)`` by central differences with Richardson
    extrapolation: ``D(h) = (J(h) - J(-h)) / 2h`` has error ``c2 h^2 + c4 h^4 + ...``;
    ``(4 D(h) - D(2h)) / 3`` removes the ``h^2`` term. Needed for Adam and RMSprop, whose
    step ``g / (sqrt(v) + 1e-8)`` is steeply curved where a gradient is small (attention's
    key biases, whose gradient is round-off): there ``c2`` is 1e4..1e10 times the
    derivative, and ``D(1e-6)`` alone is off by 1e-4..1e-2 while converging as ``h^2``.
    Round-off: ~1e-16 |J| / h times 5/3."""
    def D(h: float) -> float:
        return (J(h) - J(-h)) / (2 * h)

    return (4 * D(eps) - D(2 * eps)) / 3
