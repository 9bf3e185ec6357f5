"""Every entry of ``amaml.modelscope.BATCH_EXACT``: ``adapt_batch`` under vmap equals a loop
of ``adapt`` (float64, meta-gradient and adapted parameters), and the layers outside it
run the loop, named by ``explain``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import amaml
from amaml.modelscope import _ACTIVATIONS, BATCH_EXACT, batch_blocker

B, N = 2, 6


def _head(width: int) -> nn.Module:
    return nn.Linear(width, 1)


class _Seq(nn.Module):
    """A token model: ``[n, L]`` integers to ``[n, 1]``."""

    def __init__(self, body: nn.Module, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.body = body
        self.out = nn.Linear(d, 1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.body(self.emb(t))
        h = h[0] if isinstance(h, tuple) else h
        return self.out(h.mean(1))


class _MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.att(h, h, h, need_weights=False)[0]


def _vec(layer: nn.Module, width: int = 4) -> tuple[nn.Module, torch.Tensor]:
    """Linear -> LayerNorm (keeps the fused MLP path away) -> layer -> Linear, on [n, 3]."""
    return nn.Sequential(nn.Linear(3, width), nn.LayerNorm(width), layer, _head(width)), \
        torch.randn(B, N, 3)


def _img(layers: list[nn.Module], flat: int, dims: int = 2) -> tuple[nn.Module, torch.Tensor]:
    shape = (B, N, 2, 6, 6) if dims == 2 else (B, N, 2, 8)
    conv = nn.Conv2d(2, 3, 3, padding=1) if dims == 2 else nn.Conv1d(2, 3, 3, padding=1)
    norm = nn.GroupNorm(1, 3)  # not a foldable layer: keeps the vmap path
    return nn.Sequential(conv, norm, *layers, nn.Flatten(), nn.Linear(flat, 1)), \
        torch.randn(*shape)


_ACTIVATION_CASES = {t: (lambda t=t: _vec(t(dim=-1) if t in (nn.Softmax, nn.LogSoftmax)
                                        else t()))
                     for t in _ACTIVATIONS}

CASES = {
    nn.Linear: lambda: _vec(nn.Linear(4, 4)),
    nn.Conv1d: lambda: _img([nn.Tanh()], 3 * 8, dims=1),
    nn.Conv2d: lambda: _img([nn.Tanh()], 3 * 36),
    nn.Conv3d: lambda: (nn.Sequential(nn.Conv3d(1, 2, 2), nn.GroupNorm(1, 2), nn.Flatten(),
                                      nn.Linear(2 * 8, 1)), torch.randn(B, N, 1, 3, 3, 3)),
    nn.ConvTranspose1d: lambda: _img([nn.ConvTranspose1d(3, 2, 2), nn.Tanh()], 2 * 9, dims=1),
    nn.ConvTranspose2d: lambda: _img([nn.ConvTranspose2d(3, 2, 2), nn.Tanh()], 2 * 49),
    nn.BatchNorm1d: lambda: _vec(nn.BatchNorm1d(4)),
    nn.BatchNorm2d: lambda: _img([nn.BatchNorm2d(3), nn.ReLU()], 3 * 36),
    nn.BatchNorm3d: lambda: (nn.Sequential(nn.Conv3d(1, 2, 2), nn.GroupNorm(1, 2),
                                           nn.BatchNorm3d(2), nn.Flatten(),
                                           nn.Linear(2 * 8, 1)), torch.randn(B, N, 1, 3, 3, 3)),
    nn.LayerNorm: lambda: _vec(nn.LayerNorm(4)),
    nn.GroupNorm: lambda: _img([nn.GroupNorm(3, 3)], 3 * 36),
    nn.InstanceNorm1d: lambda: _img([nn.InstanceNorm1d(3, affine=True)], 3 * 8, dims=1),
    nn.InstanceNorm2d: lambda: _img([nn.InstanceNorm2d(3, affine=True)], 3 * 36),
    nn.Dropout: lambda: _vec(nn.Dropout(0.3)),
    nn.Dropout1d: lambda: _img([nn.Dropout1d(0.3)], 3 * 8, dims=1),
    nn.Dropout2d: lambda: _img([nn.Dropout2d(0.3)], 3 * 36),
    nn.MaxPool1d: lambda: _img([nn.MaxPool1d(2)], 3 * 4, dims=1),
    nn.MaxPool2d: lambda: _img([nn.MaxPool2d(2)], 3 * 9),
    nn.AvgPool1d: lambda: _img([nn.AvgPool1d(2)], 3 * 4, dims=1),
    nn.AvgPool2d: lambda: _img([nn.AvgPool2d(2)], 3 * 9),
    nn.AdaptiveAvgPool1d: lambda: _img([nn.AdaptiveAvgPool1d(3)], 3 * 3, dims=1),
    nn.AdaptiveAvgPool2d: lambda: _img([nn.AdaptiveAvgPool2d(2)], 3 * 4),
    nn.AdaptiveMaxPool2d: lambda: _img([nn.AdaptiveMaxPool2d(2)], 3 * 4),
    nn.Flatten: lambda: _img([], 3 * 36),
    nn.Unflatten: lambda: (nn.Sequential(nn.Linear(3, 8), nn.Unflatten(1, (2, 4)),
                                         nn.LayerNorm(4), nn.Flatten(), nn.Linear(8, 1)),
                           torch.randn(B, N, 3)),
    nn.Embedding: lambda: (_Seq(nn.Identity()), torch.randint(0, 11, (B, N, 5))),
    nn.MultiheadAttention: lambda: (_Seq(_MHA()), torch.randint(0, 11, (B, N, 5))),
    nn.TransformerEncoderLayer: lambda: (_Seq(nn.TransformerEncoderLayer(
        8, 2, 16, dropout=0.0, batch_first=True)), torch.randint(0, 11, (B, N, 5))),
    nn.TransformerEncoder: lambda: (_Seq(nn.TransformerEncoder(nn.TransformerEncoderLayer(
        8, 2, 16, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False)),
        torch.randint(0, 11, (B, N, 5))),
    nn.modules.linear.NonDynamicallyQuantizableLinear: lambda: (_Seq(_MHA()),
                                                             torch.randint(0, 11, (B, N, 5))),
    nn.Sequential: lambda: _vec(nn.Sequential(nn.Tanh())),
    nn.ModuleList: lambda: (_ListNet(), torch.randn(B, N, 3)),
    nn.ModuleDict: lambda: (_DictNet(), torch.randn(B, N, 3)),
    **_ACTIVATION_CASES,
}


class _ListNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.layers:
            x = m(x)
        return x


class _DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({"a": nn.Linear(3, 4), "n": nn.LayerNorm(4),
                                     "b": nn.Linear(4, 1)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers["b"](self.layers["n"](self.layers["a"](x)))


def test_every_entry_has_a_case() -> None:
    assert set(BATCH_EXACT) == set(CASES)


def _meta_grad(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, batched: bool
               ) -> list[torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(3)
    if batched:
        p = amaml.adapt_batch(model, F.mse_loss, (xs, ys), steps=3, lr=0.05, memory="store")
        F.mse_loss(amaml.functional_call_batch(model, p, xs), ys, reduction="sum").backward()
    else:
        for b in range(xs.shape[0]):
            pb = amaml.adapt(model, F.mse_loss, (xs[b], ys[b]), steps=3, lr=0.05,
                             memory="store")
            F.mse_loss(amaml.functional_call(model, pb, xs[b]), ys[b],
                       reduction="sum").backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("layer", list(CASES), ids=lambda t: t.__name__)
def test_vmap_entry_equals_the_loop(layer: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model, xs = CASES[layer]()
    model = model.double()
    xs = xs.double() if xs.is_floating_point() else xs
    ys = torch.randn(B, N, 1, dtype=torch.float64)
    assert any(isinstance(m, layer) for m in model.modules())
    assert batch_blocker(model) is None
    if any(isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d)) for m in model.modules()):
        # Random masks: vmap draws per task from one state, the loop task after task (and
        # tasks="auto" runs a random model as a loop); here the masks are off, the layer's
        # batching exact (test_meta_parameters checks vmap's replayed masks).
        model.eval()
    how = amaml.explain(model, F.mse_loss, (xs, ys), steps=3, lr=0.05, batched=True)
    assert "vmap" in how.splitlines()[0], how.splitlines()[0]
    batched = _meta_grad(model, xs, ys, True)
    looped = _meta_grad(model, xs, ys, False)
    for a, b in zip(batched, looped):
        # float64, 3 steps: the two orders of summation agree to round-off.
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda: _Seq(nn.LSTM(8, 8, batch_first=True)),
    lambda: _Seq(nn.GRU(8, 8, batch_first=True)),
    lambda: _SeqPad(),
], ids=["lstm", "gru", "embedding-padding-idx"])
def test_outside_the_table_runs_the_loop_exactly(make: object) -> None:
    torch.manual_seed(0)
    model = make().double()  # type: ignore[operator]
    xs = torch.randint(0, 11, (B, N, 5))
    ys = torch.randn(B, N, 1, dtype=torch.float64)
    why = batch_blocker(model)
    assert why is not None
    how = amaml.explain(model, F.mse_loss, (xs, ys), steps=3, lr=0.05, batched=True)
    assert "one after another" in how.splitlines()[0] and why in how.splitlines()[0]
    with pytest.raises(ValueError, match="cannot batch this model exactly"):
        amaml.adapt_batch(model, F.mse_loss, (xs, ys), steps=3, lr=0.05, tasks="batched")
    batched = _meta_grad(model, xs, ys, True)
    looped = _meta_grad(model, xs, ys, False)
    for a, b in zip(batched, looped):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # functional_call_batch follows the same rule.
    p = amaml.adapt_batch(model, F.mse_loss, (xs, ys), steps=2, lr=0.05)
    out = amaml.functional_call_batch(model, p, xs)
    ref = torch.stack([amaml.functional_call(model, {n: v[b] for n, v in p.items()}, xs[b])
                       for b in range(B)])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


class _SeqPad(_Seq):
    def __init__(self) -> None:
        super().__init__(nn.Identity())
        self.emb = nn.Embedding(11, 8, padding_idx=0)


def test_vmap_gets_padding_idx_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why ``Embedding(padding_idx=...)`` is outside the table: forced through vmap, the
    padding row gets a meta-gradient that the loop (and unrolled autograd) never gives it
    (if this starts to fail, torch fixed it and the entry can join the table)."""
    torch.manual_seed(0)
    model = _SeqPad().double()
    xs = torch.randint(0, 11, (B, N, 5))
    xs[:, :, 0] = 0  # every sequence reads the padding row
    ys = torch.randn(B, N, 1, dtype=torch.float64)
    looped = _meta_grad(model, xs, ys, False)
    assert bool((looped[0][0] == 0).all())
    monkeypatch.setattr(amaml.api, "batch_blocker", lambda model: None)
    forced = _meta_grad(model, xs, ys, True)
    assert bool((forced[0][0] != 0).any())
