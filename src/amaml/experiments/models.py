"""The paper's meta-regression network: an MLP with tanh activations."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP", "MODEL_KINDS", "Conv4", "make_conv4", "make_model"]

#: Networks of ``--model`` and the kind of task family each one serves: ``mlp`` (the
#: paper's regression MLP) and ``conv4`` (MAML's few-shot classifier).
MODEL_KINDS: dict[str, str] = {"mlp": "regression", "conv4": "classification"}


class MLP(nn.Module):
    """Fully connected network ``input_dim -> hidden[0] -> ... -> 1`` with tanh between layers.

    The paper's model is ``MLP(d, (32, 32))``: two hidden layers of 32 units.

    Args:
        input_dim: Input dimension ``d`` >= 1.
        hidden: Hidden layer widths, each >= 1 (may be empty: a linear model).
        generator: Seeded generator of the initial weights; ``None`` uses a fresh
            ``torch.Generator`` seeded with 0, so the global RNG is never touched.
        dtype: Parameter dtype.
        device: Parameter device.

    The weights and biases are drawn uniformly from ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``
    (the scale of PyTorch's default ``nn.Linear`` initialisation for biases, and close to
    it for weights), from ``generator`` alone.
    """

    def __init__(self, input_dim: int, hidden: Sequence[int] = (32, 32), *,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
            raise ValueError(f"input_dim must be an int >= 1; got {input_dim!r}.")
        widths = list(hidden)
        if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"hidden widths must be ints >= 1; got {tuple(hidden)!r}.")
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        sizes = [input_dim, *widths, 1]
        self.layers = nn.ModuleList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            # skip_init: nn.Linear's own initialisation would draw from the global RNG.
            layer = nn.utils.skip_init(nn.Linear, fan_in, fan_out, dtype=dtype, device=device)
            bound = 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                for p in (layer.weight, layer.bias):
                    draw = torch.rand(p.shape, generator=gen, dtype=torch.float64)
                    p.copy_(((2 * draw - 1) * bound).to(dtype))
            self.layers.append(layer)

    def forward(self, x: Tensor) -> Tensor:
        """Predictions ``[..., 1]`` for inputs ``[..., input_dim]``."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def make_model(input_dim: int, hidden: Sequence[int] = (32, 32), *, seed: int = 0,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> MLP:
    """The paper's MLP, initialised reproducibly from ``seed`` (no global RNG)."""
    return MLP(input_dim, hidden, generator=torch.Generator().manual_seed(seed), dtype=dtype,
               device=device)


class Conv4(nn.Module):
    """The few-shot classification backbone of MAML (Finn et al. 2017): four blocks of
    64 3x3 filters (padding 1), BatchNorm, ReLU and 2x2 max-pooling, then a linear layer
    to ``ways`` logits.

    A 28 x 28 grey image (Omniglot, glyphs) leaves the blocks as 64 x 1 x 1, an 84 x 84 RGB
    image (mini-ImageNet) as 64 x 5 x 5.

    Args:
        input_shape: ``(channels, height, width)`` of one image.
        ways: Number of classes N >= 2.
        width: Filters per block (64 in the MAML paper).
        generator: Seeded generator of the initial weights (``None``: seed 0); the global
            RNG is never touched. Convolutions and the head are drawn uniformly from
            ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``; BatchNorm starts at weight 1, bias 0.
        dtype: Parameter dtype.
        device: Parameter device.

    BatchNorm keeps running statistics as usual; :func:`amaml.adapt` never updates them
    (in the inner loop each batch is normalised with its own statistics).
    """

    def __init__(self, input_shape: Sequence[int], ways: int, *, width: int = 64,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        shape = tuple(input_shape)
        if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                  for s in shape):
            raise ValueError(f"input_shape must be (channels, height, width); got {shape!r}.")
        if isinstance(ways, bool) or not isinstance(ways, int) or ways < 2:
            raise ValueError(f"ways must be an int >= 2; got {ways!r}.")
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        channels, h, w = shape
        blocks: list[nn.Module] = []
        for _ in range(4):
            conv = nn.utils.skip_init(nn.Conv2d, channels, width, 3, padding=1, dtype=dtype,
                                      device=device)
            _uniform_(conv, channels * 9, gen)
            blocks += [conv, nn.BatchNorm2d(width, dtype=dtype, device=device), nn.ReLU(),
                       nn.MaxPool2d(2)]
            channels, h, w = width, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"input_shape {shape} is too small for four 2x2 poolings.")
        self.features = nn.Sequential(*blocks)
        self.head = nn.utils.skip_init(nn.Linear, width * h * w, ways, dtype=dtype,
                                       device=device)
        _uniform_(self.head, width * h * w, gen)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[n, ways]`` for images ``[n, C, H, W]``."""
        return self.head(self.features(x).flatten(1))


def _uniform_(layer: nn.Linear | nn.Conv2d, fan_in: int, gen: torch.Generator) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        for p in (layer.weight, layer.bias):
            if p is None:
                continue
            draw = torch.rand(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(((2 * draw - 1) * bound).to(p.dtype))


def make_conv4(input_shape: Sequence[int], ways: int, *, width: int = 64, seed: int = 0,
               dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Conv4:
    """The Conv-4 classifier (``width`` filters per block), initialised reproducibly from
    ``seed`` (no global RNG)."""
    return Conv4(input_shape, ways, width=width, generator=torch.Generator().manual_seed(seed),
                 dtype=dtype, device=device)
