"""Independent references for the inner-optimiser tests (no amaml code involved).

torch.optim's update equations (SGD, Adam, AdamW, RMSprop; torch 2.13 docs, maximize=False)
written out on lists of tensors and unrolled with plain autograd (create_graph), so that
the meta-gradient of the query loss is ordinary back-propagation through every step.
The square roots are plain ``torch.sqrt``: where a gradient is exactly zero this gives
NaN, which one test shows on purpose.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def _get(h: dict, name: str, default):
    return h.get(name, default)


def optimizer_step(kind: str, h: dict, k: int, u: list[Tensor], g: Sequence[Tensor],
                   state: dict[str, list[Tensor]], lr) -> list[Tensor]:
    """One step of torch.optim's ``kind`` on parameters ``u`` (out of place)."""
    lrs = lr if isinstance(lr, list) else [lr] * len(u)
    out = []
    for i, (p, grad) in enumerate(zip(u, g)):
        a = lrs[i]
        if kind == "sgd":
            mom, damp, wd = _get(h, "momentum", 0.0), _get(h, "dampening", 0.0), \
                _get(h, "weight_decay", 0.0)
            d = grad + wd * p
            if not (isinstance(mom, float) and mom == 0.0):
                buf = d if k == 0 else mom * state["buf"][i] + (1 - damp) * d
                state["buf"][i] = buf
                d = d + mom * buf if h.get("nesterov", False) else buf
            out.append(p - a * d)
        elif kind in ("adam", "adamw"):
            b1, b2 = _get(h, "betas", (0.9, 0.999))
            eps = _get(h, "eps", 1e-8)
            wd = _get(h, "weight_decay", 0.01 if kind == "adamw" else 0.0)
            if kind == "adamw":
                p = p * (1 - a * wd)
            else:
                grad = grad + wd * p
            t = k + 1
            m = b1 * state["m"][i] + (1 - b1) * grad
            v = b2 * state["v"][i] + (1 - b2) * grad * grad
            state["m"][i], state["v"][i] = m, v
            if h.get("amsgrad", False):
                v = torch.maximum(state["vmax"][i], v)
                state["vmax"][i] = v
            m_hat = m / (1 - b1 ** t)
            v_hat = v / (1 - b2 ** t)
            out.append(p - a * m_hat / (torch.sqrt(v_hat) + eps))
        elif kind == "rmsprop":
            alpha, eps = _get(h, "alpha", 0.99), _get(h, "eps", 1e-8)
            wd, mom = _get(h, "weight_decay", 0.0), _get(h, "momentum", 0.0)
            grad = grad + wd * p
            sq = alpha * state["sq"][i] + (1 - alpha) * grad * grad
            state["sq"][i] = sq
            if h.get("centered", False):
                ga = alpha * state["ga"][i] + (1 - alpha) * grad
                state["ga"][i] = ga
                avg = torch.sqrt(sq - ga * ga) + eps
            else:
                avg = torch.sqrt(sq) + eps
            if not (isinstance(mom, float) and mom == 0.0):
                buf = mom * state["buf"][i] + grad / avg
                state["buf"][i] = buf
                out.append(p - a * buf)
            else:
                out.append(p - a * grad / avg)
        else:
            raise ValueError(kind)
    return out


def unrolled_optimizer(model: nn.Module, loss_fn: Callable, support: Callable[[int], tuple],
                       *, steps: int, lr, kind: str, h: dict) -> list[Tensor]:
    """The adapted parameters after ``steps`` unrolled steps (with their autograd graph).

    ``support(k)`` gives step k's ``(x, y)``; ``lr`` a float, a tensor, a list of
    per-parameter tensors, or a callable ``k -> lr``.
    """
    names = [n for n, _ in model.named_parameters()]
    u = [p for _, p in model.named_parameters()]
    zeros = [torch.zeros_like(p) for p in u]
    state = {key: list(zeros) for key in ("buf", "m", "v", "vmax", "sq", "ga")}
    for k in range(steps):
        x, y = support(k)
        loss = loss_fn(torch.func.functional_call(model, dict(zip(names, u)), (x,)), y)
        g = torch.autograd.grad(loss, u, create_graph=True)
        u = optimizer_step(kind, h, k, u, g, state, lr(k) if callable(lr) else lr)
    return u


def query_grad(model: nn.Module, loss_fn: Callable, u: list[Tensor], xq: Tensor, yq: Tensor,
               wrt: Sequence[Tensor]) -> Tensor:
    names = [n for n, _ in model.named_parameters()]
    out = loss_fn(torch.func.functional_call(model, dict(zip(names, u)), (xq,)), yq)
    grads = torch.autograd.grad(out, list(wrt), allow_unused=True)
    return torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1)
                      for g, t in zip(grads, wrt)])
