"""The paper's meta-regression network: an MLP with tanh activations."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP", "make_model"]


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
