"""The model zoo of the differential suite: small float64 models and their data.

Each :class:`Entry` builds a model (seeded, float64, small enough that a case runs in well
under a second or two) and draws a task: support and query sets in the form
:func:`amaml.adapt` takes, ``(inputs, y)`` with ``inputs`` a tensor or a dict of keyword
inputs, or for the HuggingFace models optionally a dict holding the targets too
(``labels``), with a one-argument loss ``out -> out.loss``.

Nothing here calls amaml: the same model and data feed amaml and the references.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DT = torch.float64
VOCAB = 30  # token models: ids 1..VOCAB-1, 0 the padding id
SEQ = 5  # token / sequence length


@dataclass(frozen=True)
class Entry:
    """One kind of model.

    ``build(seed)`` -> model (float64, train mode). ``task(gen, n, form)`` -> ``(support,
    query)``, each ``(inputs, y)`` (``form="pair"``) or a dict holding the targets
    (``form="dict"``, HuggingFace models only). ``loss(form)`` -> the loss of that form:
    ``loss(out, y)`` or ``loss(out)``.
    """

    name: str
    build: Callable[[int], nn.Module]
    task: Callable[[torch.Generator, int, str], tuple[Any, Any]]
    loss: Callable[..., Callable[..., Tensor]]
    float_inputs: bool = True  # support inputs may require grad (data distillation)
    dropout: bool = False  # draws random numbers in training mode
    batchnorm: bool = False
    # Normalises by its input's own statistics besides BatchNorm (LayerNorm, GroupNorm):
    # compiled adapt_batch refuses these models up front (torch.func's batched second
    # derivative of such statistics is wrong in torch 2.13; found by this suite).
    stat_norm: bool = False
    buffer: str | None = None  # a floating buffer the forward pass reads
    forms: tuple[str, ...] = ("pair",)
    hf: bool = False
    # Forms whose loss is float64 throughout, so that a finite difference of it is
    # meaningful. GPT-2's own loss (labels in the dict) casts the logits to float32
    # (transformers' ForCausalLMLoss: ``logits.float()``), 1e-7 round-off in J.
    fd_forms: tuple[str, ...] = ("pair", "dict")


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(seed)
    return make().to(DT).train()


# --- losses -------------------------------------------------------------------------
# ``loss(form, inside)``: ``inside`` (or None) is applied to the prediction (the logits of
# a HuggingFace model) before the loss reads it, e.g. ``lambda z: w * z``: a captured tensor
# inside the loss's nonlinearity, which autograd saves for the backward pass.

_Inside = Callable[[Tensor], Tensor] | None


def _same(z: Tensor) -> Tensor:
    return z


def _mse(form: str, inside: _Inside = None) -> Callable[..., Tensor]:
    f = inside or _same
    return lambda out, y: F.mse_loss(f(out), y)


def _ce(form: str, inside: _Inside = None) -> Callable[..., Tensor]:
    f = inside or _same
    return lambda out, y: F.cross_entropy(f(out), y)


def _hf_dict_loss(inside: _Inside) -> Callable[..., Tensor]:
    if inside is None:
        return lambda out: out.loss
    # The model's own loss (its labels) plus a small penalty that reads the tensor.
    return lambda out: out.loss + 0.01 * inside(out.logits).square().mean()


def _hf_cls_loss(form: str, inside: _Inside = None) -> Callable[..., Tensor]:
    if form == "dict":
        return _hf_dict_loss(inside)
    f = inside or _same
    return lambda out, y: F.cross_entropy(f(out.logits), y)


def _hf_lm_loss(form: str, inside: _Inside = None) -> Callable[..., Tensor]:
    if form == "dict":
        return _hf_dict_loss(inside)
    f = inside or _same
    # The same next-token loss as GPT2LMHeadModel's with labels (-100 ignored).
    return lambda out, y: F.cross_entropy(f(out.logits)[:, :-1].reshape(-1, VOCAB),
                                          y[:, 1:].reshape(-1), ignore_index=-100)


# --- models -------------------------------------------------------------------------

class CustomMLP(nn.Module):
    """A custom nn.Module (the generic path), reading a floating buffer ``scale`` between
    its layers (so that autograd saves it)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(3, 8), nn.Linear(8, 2)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inp(x)) * self.scale)


class Tied(nn.Module):
    """Two layers sharing one weight (``b.weight is a.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class Recurrent(nn.Module):
    """Embedding(padding_idx=0) + LSTM or GRU + a linear head on the last state."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 6, padding_idx=0)
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(6, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h, _ = self.rnn(self.emb(tokens))
        return self.head(h[:, -1])


class Encoder(nn.Module):
    """nn.TransformerEncoder (1 layer, d_model 8, 2 heads, no dropout, batch_first) + head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                           batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(x).mean(1))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def _dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 2))


def _frozen() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    net[0].requires_grad_(False)
    return net


def _conv_bn() -> nn.Module:
    # No convolution bias before BatchNorm: its gradient would be round-off only, which
    # Adam / RMSprop divide by its own size (noise, not a property of amaml).
    return nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3))


def _conv_norm() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                         nn.LayerNorm(64), nn.Linear(64, 3))


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=16, max_position_embeddings=16,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    return BertForSequenceClassification(cfg)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=16,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


# --- data ---------------------------------------------------------------------------

def _float_task(shape: tuple[int, ...], target: Callable[[Tensor], Tensor]):
    def task(gen: torch.Generator, n: int, form: str):
        sets = []
        for _ in range(2):
            x = torch.randn(n, *shape, generator=gen, dtype=DT)
            sets.append((x, target(x)))
        return sets[0], sets[1]
    return task


def _regression(x: Tensor) -> Tensor:
    return torch.stack([torch.sin(2 * x).sum(-1), torch.cos(x[..., 0] * x[..., 1])], -1)


def _labels_of(x: Tensor) -> Tensor:
    # Deterministic classes from the inputs (not random noise, so that a step of descent
    # means something); the classes themselves do not matter to exactness.
    s = x.reshape(x.shape[0], -1).sum(-1)
    return (torch.floor(s).long() % 3)


def _tokens(gen: torch.Generator, n: int, pad_rows: bool) -> tuple[Tensor, Tensor]:
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=gen)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    if pad_rows:  # right padding on every other example: 1 or 2 padded positions
        for i in range(0, n, 2):
            k = 1 + int(torch.randint(0, 2, (), generator=gen))
            ids[i, SEQ - k:] = 0
            mask[i, SEQ - k:] = 0
    return ids, mask


def _token_task(gen: torch.Generator, n: int, form: str):
    sets = []
    for _ in range(2):
        ids, _ = _tokens(gen, n, pad_rows=True)
        sets.append((ids, ids[:, 1] % 3))
    return sets[0], sets[1]


def _bert_task(gen: torch.Generator, n: int, form: str):
    sets = []
    for _ in range(2):
        ids, mask = _tokens(gen, n, pad_rows=True)
        y = torch.randint(0, 3, (n,), generator=gen)
        if form == "dict":
            sets.append({"input_ids": ids, "attention_mask": mask, "labels": y})
        else:
            sets.append(({"input_ids": ids, "attention_mask": mask}, y))
    return sets[0], sets[1]


def _gpt2_task(gen: torch.Generator, n: int, form: str):
    sets = []
    for _ in range(2):
        ids, mask = _tokens(gen, n, pad_rows=True)
        labels = ids.masked_fill(mask == 0, -100)
        if form == "dict":
            sets.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        else:
            sets.append(({"input_ids": ids, "attention_mask": mask}, labels))
    return sets[0], sets[1]


def _ce_float(shape):
    return _float_task(shape, _labels_of)


ZOO: dict[str, Entry] = {e.name: e for e in [
    Entry("mlp", lambda s: _seeded(s, _mlp), _float_task((3,), _regression), _mse),
    Entry("custom_mlp", lambda s: _seeded(s, CustomMLP), _float_task((3,), _regression), _mse,
          buffer="scale"),
    Entry("conv_bn", lambda s: _seeded(s, _conv_bn), _ce_float((1, 6, 6)), _ce,
          batchnorm=True),
    Entry("conv_gn_ln", lambda s: _seeded(s, _conv_norm), _ce_float((1, 6, 6)), _ce,
          stat_norm=True),
    Entry("dropout_mlp", lambda s: _seeded(s, _dropout_mlp), _float_task((3,), _regression),
          _mse, dropout=True),
    Entry("lstm", lambda s: _seeded(s, lambda: Recurrent("lstm")), _token_task, _ce,
          float_inputs=False),
    Entry("gru", lambda s: _seeded(s, lambda: Recurrent("gru")), _token_task, _ce,
          float_inputs=False),
    Entry("transformer", lambda s: _seeded(s, Encoder), _ce_float((SEQ, 8)), _ce,
          stat_norm=True),
    Entry("bert", lambda s: _seeded(s, _bert), _bert_task, _hf_cls_loss, float_inputs=False,
          forms=("pair", "dict"), hf=True, stat_norm=True),
    Entry("gpt2", lambda s: _seeded(s, _gpt2), _gpt2_task, _hf_lm_loss, float_inputs=False,
          forms=("pair", "dict"), hf=True, fd_forms=("pair",), stat_norm=True),
    Entry("frozen_mlp", lambda s: _seeded(s, _frozen), _float_task((3,), _regression), _mse),
    Entry("tied", lambda s: _seeded(s, Tied), _float_task((3,), _regression), _mse),
]}


def stack_tasks(tasks: list[Any]) -> Any:
    """``B`` tasks' sets (each a tensor, a pair or a dict) stacked on a leading task axis."""
    first = tasks[0]
    if isinstance(first, Tensor):
        return torch.stack(tasks)
    if isinstance(first, dict):
        return {k: torch.stack([t[k] for t in tasks]) for k in first}
    return tuple(stack_tasks([t[i] for t in tasks]) for i in range(len(first)))


def task_of(batch: Any, b: int) -> Any:
    """Task ``b`` of a stacked set (the inverse of :func:`stack_tasks`)."""
    if isinstance(batch, Tensor):
        return batch[b]
    if isinstance(batch, dict):
        return {k: v[b] for k, v in batch.items()}
    return tuple(task_of(t, b) for t in batch)
