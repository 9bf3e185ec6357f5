"""Shared pieces of the two long-horizon examples on scikit-learn's 8x8 digits.

Data: ``sklearn.datasets.load_digits`` (1,797 images, 10 classes, no download), pixels
scaled to [0, 1], split by a seeded permutation into 1,000 training and 797 test images.
Models: an MLP 64-128-10 (ReLU), the field's normalised ConvNet and the earlier small CNN.
The inner loop written out with plain autograd over ``torch.func.functional_call``
(independent of amaml): the unrolled (back-propagation through every step) and truncated
(through the last ``K_t`` steps only, Shaban et al. 2019) baselines, and the training of
the evaluation networks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import amaml

N_TRAIN = 1000
N_CLASSES = 10


def load_digits_split(seed: int = 0, dtype: torch.dtype = torch.float32
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train [1000, 64], y_train, x_test [797, 64], y_test); pixels in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=dtype)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    tr, te = perm[:N_TRAIN], perm[N_TRAIN:]
    return x[tr], y[tr], x[te], y[te]


NORMS = ("instance", "batch", "none")


class ConvNet(nn.Module):
    """The distillation field's ConvNet (Wang et al. 2018; Zhao et al.'s DC, MTT, RaT-BPTT),
    in the "metasmooth" form of Engstrom et al. 2025: blocks of a 3x3 convolution, a
    per-channel normalisation *before* the ReLU, 2x2 average pooling; a linear head whose
    logits are multiplied by a fixed ``logit_scale`` (outputs scaled down).

    Args:
        side: Images are ``side x side``, one channel, given flat ``[n, side * side]``.
        n_classes: Number of classes.
        width: Channels of every block.
        depth: Blocks; default: as many as keep the feature map at least 2 x 2
            (8 x 8 digits: 2, 28 x 28 Omniglot: 3).
        norm: ``"instance"``: ``GroupNorm(width, width)`` (one group per channel, each
            image normalised alone, with a learned affine map), as DC/MTT/RaT-BPTT;
            ``"batch"``: ``BatchNorm2d`` with batch statistics always (no running
            statistics, so training and evaluation both normalise with the batch given:
            evaluation is transductive over the test batch), as FRePo; ``"none"``.
        logit_scale: The fixed factor on the logits (1 = a standard network).
    """

    def __init__(self, side: int, n_classes: int = N_CLASSES, *, width: int = 32,
                 depth: int | None = None, norm: str = "instance",
                 logit_scale: float = 0.1) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, not {norm!r}")
        if depth is None:
            depth = max(1, int(math.log2(side)) - 1)
        if side >> depth < 1:
            raise ValueError(f"depth={depth} pools a {side}x{side} image below 1x1")
        self.side, self.logit_scale = side, float(logit_scale)
        layers: list[nn.Module] = []
        cin = 1
        for _ in range(depth):
            layers.append(nn.Conv2d(cin, width, 3, padding=1))
            if norm == "instance":
                layers.append(nn.GroupNorm(width, width))
            elif norm == "batch":
                layers.append(nn.BatchNorm2d(width, track_running_stats=False))
            layers += [nn.ReLU(), nn.AvgPool2d(2)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width * (side >> depth) ** 2, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x.reshape(-1, 1, self.side, self.side))
        return self.head(h.flatten(1)) * self.logit_scale


def make_model(kind: str, *, side: int = 8, n_classes: int = N_CLASSES, width: int = 32,
               norm: str = "instance", logit_scale: float = 0.1) -> nn.Module:
    """``mlp``: (side*side)-128-n_classes with ReLU; ``cnn``: :class:`ConvNet` (the keyword
    arguments); ``small-cnn``: the earlier plain CNN (two 3x3 convolutions with 8 and 16
    channels, ReLU, average pooling, no normalisation, logits unscaled; 8 x 8 only)."""
    if kind == "mlp":
        return nn.Sequential(nn.Linear(side * side, 128), nn.ReLU(), nn.Linear(128, n_classes))
    if kind == "cnn":
        return ConvNet(side, n_classes, width=width, norm=norm, logit_scale=logit_scale)
    if kind == "small-cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),   # 8 x 4 x 4
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),  # 16 x 2 x 2
            nn.Flatten(), nn.Linear(64, n_classes))
    raise ValueError(f"model must be 'mlp', 'cnn' or 'small-cnn', not {kind!r}")


def reinit_(model: nn.Module, seed: int) -> nn.Module:
    """A fresh random initialisation (PyTorch's default), seeded.

    The parameters keep ``requires_grad`` (``amaml.adapt`` refuses a model with none that
    requires grad) and their ``.grad`` is cleared: the initialisation is not meta-learned."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    for p in model.parameters():
        p.grad = None
    return model


@dataclass(frozen=True)
class InnerOpt:
    """The inner optimiser: ``sgd`` (momentum 0.9, torch.optim's rule) or ``adam``."""

    name: str = "sgd"
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def amaml(self) -> amaml.optim.SGD | amaml.optim.Adam:
        if self.name == "sgd":
            return amaml.optim.SGD(momentum=self.momentum)
        if self.name == "adam":
            return amaml.optim.Adam(betas=self.betas, eps=self.eps)
        raise ValueError(f"optimizer must be 'sgd' or 'adam', not {self.name!r}")


def _safe_sqrt(v: Tensor) -> Tensor:
    # sqrt whose derivative at 0 is taken as 0 (the limit amaml uses): where v = 0 the
    # gradient g is 0 too, and Adam's step is smooth in g there.
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


Schedule = Callable[[int], tuple[Tensor, Tensor]]


def plain_train(model: nn.Module, params: dict[str, Tensor], support: tuple[Tensor, Tensor]
                | Schedule, steps: int, lr: Tensor | float | dict[str, Tensor],
                opt: InnerOpt, *, graph_from: int | None = None,
                loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                ) -> dict[str, Tensor]:
    """``steps`` steps of ``opt`` on ``loss_fn(functional_call(model, u, x), y)``.

    ``graph_from=None``: no graph at all (training an evaluation network). ``graph_from=k``:
    steps ``k .. steps-1`` are recorded with ``create_graph`` so that the result can be
    back-propagated to the support data, ``lr`` and the loss's tensors through them;
    ``k = 0`` is unrolled back-propagation, ``k = steps - K_t`` truncated. ``lr`` is a
    scalar, a tensor of shape ``(steps,)``, or a dict name -> ``(steps, *broadcastable)``.
    """
    data = support if callable(support) else (lambda k: support)
    names = list(params)
    u = {n: params[n].detach() for n in names}
    buf: dict[str, Tensor] = {}
    m: dict[str, Tensor] = {}
    v: dict[str, Tensor] = {}

    def rate(k: int, n: str) -> Tensor | float:
        r = lr[n][k] if isinstance(lr, dict) else lr
        if isinstance(r, Tensor) and r.dim() > 0 and not isinstance(lr, dict):
            r = r[k]
        return r

    for k in range(steps):
        graph = graph_from is not None and k >= graph_from
        if graph_from is not None and k == graph_from:  # the graph starts here
            u = {n: t.detach() for n, t in u.items()}
            buf = {n: t.detach() for n, t in buf.items()}
            m = {n: t.detach() for n, t in m.items()}
            v = {n: t.detach() for n, t in v.items()}
        x, y = data(k)
        if not graph:
            x = x.detach()
        with torch.enable_grad():
            leaves = {n: t if t.requires_grad else t.detach().requires_grad_()
                      for n, t in u.items()}
            loss = loss_fn(torch.func.functional_call(model, leaves, (x,)), y)
            grads = torch.autograd.grad(loss, [leaves[n] for n in names], create_graph=graph)
        new = {}
        for n, g in zip(names, grads):
            r = rate(k, n)
            if not graph:
                g = g.detach()
                r = r.detach() if isinstance(r, Tensor) else r
                un = u[n].detach()
            else:
                un = leaves[n]
            if opt.name == "sgd":
                buf[n] = g if k == 0 else opt.momentum * (buf[n] if graph else buf[n].detach()) + g
                new[n] = un - r * buf[n]
            else:
                b1, b2 = opt.betas
                m_prev = m.get(n, torch.zeros_like(g))
                v_prev = v.get(n, torch.zeros_like(g))
                if not graph:
                    m_prev, v_prev = m_prev.detach(), v_prev.detach()
                m[n] = b1 * m_prev + (1 - b1) * g
                v[n] = b2 * v_prev + (1 - b2) * g * g
                t = k + 1
                denom = _safe_sqrt(v[n]) / math.sqrt(1 - b2 ** t) + opt.eps
                new[n] = un - (r / (1 - b1 ** t)) * m[n] / denom
            if not graph:
                new[n] = new[n].detach()
        u = new
    return u


def accuracy_and_loss(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor
                      ) -> tuple[float, float]:
    with torch.no_grad():
        out = torch.func.functional_call(model, params, (x,))
        return float((out.argmax(-1) == y).float().mean()), float(F.cross_entropy(out, y))


def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean and 95% confidence half-width (Student's t with n - 1 degrees of freedom)."""
    from scipy.stats import t

    a = np.asarray(values, dtype=float)
    n = len(a)
    half = float(t.ppf(0.975, n - 1) * a.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(a.mean()), "ci95": half, "n": n, "values": [float(z) for z in a]}


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
