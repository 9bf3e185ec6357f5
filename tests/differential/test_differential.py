"""The differential suite: seeded random cases, each amaml against an independent reference.

Cases are drawn from seeds ``0 .. N-1`` (``N`` = env ``AMAML_DIFFERENTIAL_EXAMPLES``,
default 40; ``AMAML_DIFFERENTIAL_COMPILE`` = the chance of ``compile=True``, default 0) by
:func:`.cases.draw`; each test id names its seed and case, and
``python -m tests.differential.run --examples N`` runs the same cases with a tally.
The tolerances and where they come from: :mod:`.cases`.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import pytest
import torch

import amaml

from . import cases as C
from .zoo import ZOO

N = int(os.environ.get("AMAML_DIFFERENTIAL_EXAMPLES", "40"))
CASES = [C.draw(seed) for seed in range(N)]


def _id(case: C.Case) -> str:
    return case.describe().replace(" ", ",")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_case(case: C.Case) -> None:
    """amaml's outcome is the promised one: exact (rel. error <= 1e-8 against unrolled
    autograd, and a finite difference agrees to 1e-6), or the promised refusal."""
    res = C.run(case)
    assert res.outcome == case.expected, (
        f"{case.describe()}\n  expected {case.expected}, got {res.outcome}: {res.detail}")


# --- the harness itself -------------------------------------------------------------

def test_draw_is_reproducible_and_covers_every_dimension() -> None:
    """The same seed gives the same case; 400 seeds reach every value of every axis (so
    the CI sample and long runs explore the whole grid, not a corner of it)."""
    assert [C.draw(s) for s in range(50)] == [C.draw(s) for s in range(50)]
    seen = collections.defaultdict(set)
    for s in range(400):
        c = C.draw(s, compile_rate=0.5)
        for f in ("model", "form", "optimizer", "memory", "batch", "compiled", "action",
                  "meta", "mode", "lr_shape"):
            seen[f].add(getattr(c, f))
        seen["expected"].add(c.expected)
        if c.action == "inplace":
            seen["inplace"].add(c.inplace)
    assert seen["model"] == set(ZOO)
    assert seen["optimizer"] == {"gd", "sgd", "adam", "rmsprop"}
    assert seen["memory"] == set(C.MEMORIES)
    assert seen["batch"] == {0, 2, 3}
    assert seen["action"] == set(C.ACTIONS)
    assert seen["meta"] == set(C.METAS)
    assert seen["form"] == {"pair", "dict"} and seen["mode"] == {"train", "eval"}
    assert seen["compiled"] == {False, True}
    assert seen["lr_shape"] == {"scalar", "per-step"}
    assert seen["inplace"] == {"weight", "buffer", "running"}
    assert seen["expected"] == {"exact", "refused-in-backward"}


def test_draw_never_asks_integer_inputs_to_require_grad() -> None:
    for s in range(300):
        c = C.draw(s)
        if c.meta == "data":
            assert ZOO[c.model].float_inputs, c.describe()


_case = C.make_case


def test_harness_catches_a_wrong_meta_gradient(monkeypatch) -> None:
    """A first-order meta-gradient (no second derivatives) is reported as failed, with the
    finite difference siding with the reference: the comparison can fail."""
    real = amaml.adapt

    def first_order(*args, **kw):
        kw.pop("memory", None)
        kw.pop("compile", None)
        return real(*args, adjoint=amaml.FirstOrder(), **kw)

    monkeypatch.setattr(C.amaml, "adapt", first_order)
    res = C.run(_case())
    assert res.outcome == "failed"
    assert res.errors["rel_err"] > 1e-4
    assert res.errors["fd_reference"] < C.FD_TOL < res.errors["fd_amaml"]


def test_harness_catches_a_missing_refusal(monkeypatch) -> None:
    """An in-place change that amaml would silently absorb (simulated: the change undone
    before backward) is not counted as a refusal."""
    case = _case(action="inplace", inplace="buffer")
    monkeypatch.setattr(C._Setup, "act", lambda self: None)
    res = C.run(case)
    assert res.outcome == "exact" and not res.ok


@pytest.mark.parametrize("model", sorted(ZOO))
def test_reference_agrees_with_finite_differences(model: str) -> None:
    """The reference checked on its own, no amaml involved: on every model (Adam: the
    steepest step map), its meta-gradient is the derivative of its own forward pass."""
    e = ZOO[model]
    form = [f for f in e.forms if f in e.fd_forms][-1]
    case = _case(model=model, form=form, optimizer="adam",
                 meta="data" if e.float_inputs else "lr", batch=2 if model == "mlp" else 0)
    assert C.reference_fd_error(case) < C.FD_TOL


def test_reference_batch_norm_leaves_running_statistics() -> None:
    """The reference's BatchNorm convention: batch statistics, running buffers untouched."""
    from . import reference as ref

    model = ZOO["conv_bn"].build(0).eval()
    before = [b.clone() for b in model.buffers()]
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    out = ref.call(model, ref.trainable(model), x)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert not model.training and not model[1].training
    model.train()
    with torch.no_grad():  # a training-mode call normalises with the same statistics
        assert torch.allclose(out, torch.func.functional_call(
            model, {n: b.clone() for n, b in model.named_buffers()}, (x,)), atol=0, rtol=0)


def test_dataclass_replace_keeps_the_description_honest() -> None:
    c = dataclasses.replace(_case(), model="gru", action="switch", batch=3)
    assert "gru" in c.describe() and "adapt_batch(B=3)" in c.describe()
    assert c.kind == "gru/batch/switch"
