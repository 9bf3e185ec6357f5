"""Independent references for the gradient tests (no amaml code involved)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DT = torch.float64


def mlp(in_dim: int = 2, hidden: int = 32, out_dim: int = 1) -> nn.Module:
    """The paper's MLP (2 -> 32 -> 32 -> 1, tanh) in float64."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                         nn.Tanh(), nn.Linear(hidden, out_dim)).to(DT)


def classifier(in_dim: int = 4, hidden: int = 16, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(DT)


def regression_data(n: int = 20, d: int = 2, batch: int | None = None) -> tuple[Tensor, ...]:
    lead = () if batch is None else (batch,)
    x = torch.rand(*lead, n, d, dtype=DT) * 2 - 1
    xq = torch.rand(*lead, n, d, dtype=DT) * 2 - 1
    f = lambda z: torch.sin(3 * z).sum(-1, keepdim=True)  # noqa: E731
    return x, f(x), xq, f(xq)


def classification_data(n: int = 24, d: int = 4, classes: int = 3) -> tuple[Tensor, ...]:
    x, xq = torch.randn(n, d, dtype=DT), torch.randn(n, d, dtype=DT)
    return x, torch.randint(0, classes, (n,)), xq, torch.randint(0, classes, (n,))


def unrolled_meta_grad(model: nn.Module, loss_fn, x: Tensor, y: Tensor, xq: Tensor, yq: Tensor,
                       *, steps: int, lr, solver: str = "euler", mu: float | Tensor = 0.0,
                       extra: tuple[Tensor, ...] = ()) -> Tensor:
    """Plain autograd through hand-written solver steps on the module's parameters.

    ``lr`` may be a float, a 0-d tensor or a dict name -> tensor; the gradient is
    returned for the module's parameters followed by ``extra`` (e.g. lr, mu).
    """
    names = [n for n, _ in model.named_parameters()]
    theta = [p for _, p in model.named_parameters()]
    rates = [lr[n] if isinstance(lr, dict) else lr for n in names]

    def field(u: list[Tensor]) -> list[Tensor]:
        out = torch.func.functional_call(model, dict(zip(names, u)), (x,))
        g = torch.autograd.grad(loss_fn(out, y), u, create_graph=True)
        return [-r * (gi + mu * (ui - ti)) for r, gi, ui, ti in zip(rates, g, u, theta)]

    def axpy(u: list[Tensor], a: float, k: list[Tensor]) -> list[Tensor]:
        return [ui + a * ki for ui, ki in zip(u, k)]

    u = list(theta)
    for _ in range(steps):
        if solver == "euler":
            u = axpy(u, 1.0, field(u))
        elif solver == "heun":
            k1 = field(u)
            k2 = field(axpy(u, 1.0, k1))
            u = axpy(axpy(u, 0.5, k1), 0.5, k2)
        elif solver == "rk4":
            k1 = field(u)
            k2 = field(axpy(u, 0.5, k1))
            k3 = field(axpy(u, 0.5, k2))
            k4 = field(axpy(u, 1.0, k3))
            for a, k in ((1 / 6, k1), (1 / 3, k2), (1 / 3, k3), (1 / 6, k4)):
                u = axpy(u, a, k)
        else:
            raise ValueError(solver)
    out = torch.func.functional_call(model, dict(zip(names, u)), (xq,))
    grads = torch.autograd.grad(loss_fn(out, yq), [*theta, *extra])
    return torch.cat([g.reshape(-1) for g in grads])


def amaml_meta_grad(model: nn.Module, loss_fn, x: Tensor, y: Tensor, xq: Tensor, yq: Tensor,
                    extra: tuple[Tensor, ...] = (), **kw) -> Tensor:
    """The meta-gradient through amaml.adapt, read from ``.grad``."""
    import amaml

    for t in [*model.parameters(), *extra]:
        t.grad = None
    params = amaml.adapt(model, loss_fn, (x, y), **kw)
    loss_fn(torch.func.functional_call(model, params, (xq,)), yq).backward()
    return torch.cat([t.grad.reshape(-1) for t in [*model.parameters(), *extra]])


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def conv_bn_net(classes: int = 3) -> nn.Module:
    """Conv2d(1, 4, 3) - BatchNorm2d - ReLU - MaxPool - Linear, for 8x8 inputs, float64."""
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(36, classes)).to(DT)


def conv_bn_apply(p: dict[str, Tensor], x: Tensor,
                  running: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """:func:`conv_bn_net` written out with ``torch.nn.functional``, no module involved.

    ``running=None`` normalises with the batch's own statistics (``training=True`` and no
    running buffers); ``running=(mean, var)`` with those (``training=False``).
    """
    import torch.nn.functional as F

    h = F.conv2d(x, p["0.weight"], p["0.bias"])
    mean, var = (None, None) if running is None else running
    h = F.batch_norm(h, mean, var, p["1.weight"], p["1.bias"], training=running is None,
                     eps=1e-5)
    h = F.max_pool2d(F.relu(h), 2)
    return F.linear(h.flatten(1), p["5.weight"], p["5.bias"])


def unrolled_meta_grad_apply(apply, theta: dict[str, Tensor], loss_fn, x: Tensor, y: Tensor,
                             xq: Tensor, yq: Tensor, *, steps: int, lr: float) -> Tensor:
    """``steps`` plain gradient-descent steps on ``loss_fn(apply(u, x), y)`` from ``theta``,
    then plain autograd of the query loss back to ``theta`` (flat, in ``theta``'s order)."""
    names = list(theta)
    start = [theta[n] for n in names]
    u = list(start)
    for _ in range(steps):
        g = torch.autograd.grad(loss_fn(apply(dict(zip(names, u)), x), y), u, create_graph=True)
        u = [ui - lr * gi for ui, gi in zip(u, g)]
    grads = torch.autograd.grad(loss_fn(apply(dict(zip(names, u)), xq), yq), start)
    return torch.cat([g.reshape(-1) for g in grads])


def unrolled_tasks_meta_grad(net: nn.Module, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor,
                             wrt, steps: int, lr: float) -> Tensor:
    """The flat gradient of the summed query cross-entropy of ``B`` tasks (``xs[b]``, ...),
    each adapted from ``net``'s parameters by ``steps`` steps of gradient descent, by plain
    autograd through the unrolled loops, with respect to ``wrt``."""
    names = [n for n, _ in net.named_parameters()]
    total = 0
    for b in range(xs.shape[0]):
        u = list(net.parameters())
        for _ in range(steps):
            out = torch.func.functional_call(net, dict(zip(names, u)), (xs[b],))
            g = torch.autograd.grad(F.cross_entropy(out, ys[b]), u, create_graph=True)
            u = [a - lr * d for a, d in zip(u, g)]
        out = torch.func.functional_call(net, dict(zip(names, u)), (xq[b],))
        total = total + F.cross_entropy(out, yq[b])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, wrt)])
