"""The fused MLP's written-out loss derivatives (F.cross_entropy with class indices and
F.mse_loss, both with their defaults) against autograd's, in float64: the gradient in the
prediction and its derivative along a direction, per task and batched; any other form of
the call falls back to autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amaml.mlp import _closed_form

DT = torch.float64


def _autograd(loss_fn, pred, y, r, batched):
    p = pred.detach().requires_grad_(True)
    total = (torch.func.vmap(loss_fn)(p, y).sum() if batched else loss_fn(p, y))
    (e,) = torch.autograd.grad(total, p, create_graph=True)
    (r_e,) = torch.autograd.grad(e, p, r)
    return e.detach(), r_e


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("loss_fn", [F.cross_entropy, F.mse_loss], ids=["ce", "mse"])
def test_closed_form_equals_autograd(loss_fn, batched: bool) -> None:
    g = torch.Generator().manual_seed(0)
    lead = (3, 7) if batched else (7,)
    pred = torch.randn(*lead, 5, dtype=DT, generator=g)
    y = (torch.randint(0, 5, lead, generator=g) if loss_fn is F.cross_entropy
         else torch.randn(*lead, 5, dtype=DT, generator=g))
    r = torch.randn(pred.shape, dtype=DT, generator=g)
    own = _closed_form(loss_fn, pred, y, batched, r)
    assert own is not None
    e_ref, re_ref = _autograd(loss_fn, pred, y, r, batched)
    torch.testing.assert_close(own[0], e_ref, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(own[1], re_ref, rtol=1e-13, atol=1e-15)
    e_only = _closed_form(loss_fn, pred, y, batched, None)
    assert e_only is not None and e_only[1] is None
    torch.testing.assert_close(e_only[0], e_ref, rtol=1e-13, atol=1e-15)


def test_other_calls_fall_back_to_autograd() -> None:
    pred = torch.randn(4, 3, dtype=DT)
    ignored = torch.tensor([0, -100, 2, 1])  # ignore_index changes the mean's divisor
    assert _closed_form(F.cross_entropy, pred, ignored, False, None) is None
    probs = torch.softmax(torch.randn(4, 3, dtype=DT), -1)  # probability targets
    assert _closed_form(F.cross_entropy, pred, probs, False, None) is None
    assert _closed_form(F.mse_loss, pred, torch.randn(4, 1, dtype=DT), False, None) is None
    assert _closed_form(lambda p, y: F.cross_entropy(p, y), pred, torch.tensor([0, 1, 2, 0]),
                        False, None) is None
    assert _closed_form(F.cross_entropy, pred.requires_grad_(), torch.tensor([0, 1, 2, 0]),
                        False, None) is None


def test_negative_targets_checked_once_per_version() -> None:
    """The ignore_index check is cached per target tensor and redone after an in-place
    change (the tensor's version moves)."""
    pred = torch.randn(4, 3, dtype=DT)
    y = torch.tensor([0, 1, 2, 1])
    assert _closed_form(F.cross_entropy, pred, y, False, None) is not None
    assert _closed_form(F.cross_entropy, pred, y, False, None) is not None
    y[1] = -100  # now an ignored row: the cached answer must not be reused
    assert _closed_form(F.cross_entropy, pred, y, False, None) is None
    y[1] = 2
    assert _closed_form(F.cross_entropy, pred, y, False, None) is not None
