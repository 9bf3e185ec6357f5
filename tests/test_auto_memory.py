"""``memory="auto"``: the fastest exact strategy whose predicted peak fits a budget.

Exactness: 1e-10 relative in float64 against unrolled autograd (helpers.py), as for every
exact strategy; whatever auto picks is one of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DT,
    amaml_meta_grad,
    conv_bn_apply,
    conv_bn_net,
    mlp,
    regression_data,
    rel_err,
    unrolled_meta_grad,
    unrolled_meta_grad_apply,
)

import amaml
from amaml.flow import Budget, Checkpoint, Revolve, Store
from amaml.flow.auto import (
    BUDGET_ENV,
    REBUILT_GRAPHS_SLACK,
    TAPES_MAX_BYTES,
    TAPES_MIN_FLOPS_PER_BYTE,
    Auto,
    StepCost,
    predict_peak,
)

TOL = 1e-10
ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


def _conv_task() -> tuple:
    torch.manual_seed(3)
    net = conv_bn_net()
    x, y = torch.randn(9, 1, 8, 8, dtype=DT), torch.randint(0, 3, (9,))
    xq, yq = torch.randn(9, 1, 8, 8, dtype=DT), torch.randint(0, 3, (9,))
    return net, x, y, xq, yq


def _choice(megabytes: float, steps: int = 20) -> str:
    net, x, y, _, _ = _conv_task()
    text = amaml.explain(net, F.cross_entropy, (x, y), steps=steps, lr=0.3,
                         memory=Auto(megabytes=megabytes))
    return next(t for t in text.splitlines() if t.startswith("memory: auto: "))


def test_auto_is_the_default_and_registered() -> None:
    assert isinstance(amaml.api.resolve_memory("auto"), Auto)
    net, x, y, _, _ = _conv_task()
    text = amaml.explain(net, F.cross_entropy, (x, y), steps=5, lr=0.3)
    assert "memory: auto: every step's graph kept" in text
    assert "predicted peak (MiB, 5 steps): unrolled" in text
    with pytest.raises(ValueError, match="megabytes"):
        Auto(megabytes=-1.0)
    with pytest.raises(ValueError, match="share"):
        Auto(share=0.0)


def test_auto_choice_follows_the_budget() -> None:
    """Room for the whole loop: every graph kept; less: the last steps' graphs; less:
    checkpoint segments; none: revolve with the snapshots that fit."""
    cost = StepCost(state=1 * MIB, graph=10 * MIB, kernel="autograd")
    n = 100
    big = Auto.choose(n, cost, (10**12, "test"))
    assert isinstance(big[0], Budget) and big[1] == n
    unrolled = predict_peak(None, n, cost)
    assert unrolled is not None
    mid = Auto.choose(n, cost, (unrolled // 2, "test"))
    assert isinstance(mid[0], Budget) and mid[1] is not None and 0 < mid[1] < n
    assert (predict_peak(mid[0], n, cost, mid[1]) or 0) <= unrolled // 2
    ckpt = predict_peak(Checkpoint(), n, cost) or 0
    small = Auto.choose(n, cost, (ckpt, "test"))
    assert isinstance(small[0], (Budget, Checkpoint))
    assert (predict_peak(small[0], n, cost, small[1]) or 0) <= ckpt
    tiny = Auto.choose(n, cost, (25 * MIB, "test"))
    assert isinstance(tiny[0], Revolve)
    assert (predict_peak(tiny[0], n, cost) or 0) <= 25 * MIB
    nothing = Auto.choose(n, cost, (0, "test"))
    assert nothing[0] == Revolve(snapshots=1) and "over the budget" in nothing[2]
    # a kernel of its own (fused MLP): graphs unused; store if it fits, else checkpoint
    fused = StepCost(state=1 * MIB, graph=0, kernel="fused")
    assert isinstance(Auto.choose(n, fused, (10**12, "test"))[0], Store)
    assert isinstance(Auto.choose(n, fused, (30 * MIB, "test"))[0], Checkpoint)
    # with the fused tapes: store them too while they fit (and total at most
    # TAPES_MAX_BYTES), then store alone
    taped = StepCost(state=1 * MIB, graph=0, kernel="fused", tape=MIB // 2)
    assert n * taped.tape <= TAPES_MAX_BYTES
    assert Auto.choose(n, taped, (10**12, "test"))[0] == Store(tapes=True)
    assert Auto.choose(n, taped, (130 * MIB, "test"))[0] == Store()
    many = StepCost(state=1 * MIB, graph=0, kernel="fused", tape=2 * MIB)
    assert n * many.tape > TAPES_MAX_BYTES
    assert Auto.choose(n, many, (10**12, "test"))[0] == Store()
    # beyond the cap, tapes that save enough arithmetic a byte (large layers) are kept
    # while they fit; just below that intensity they are not
    dense = StepCost(state=1 * MIB, graph=0, kernel="fused", tape=2 * MIB,
                     tape_flops=TAPES_MIN_FLOPS_PER_BYTE * 2 * MIB)
    assert Auto.choose(n, dense, (10**12, "test"))[0] == Store(tapes=True)
    assert Auto.choose(n, dense, (200 * MIB, "test"))[0] == Store()
    thin = StepCost(state=1 * MIB, graph=0, kernel="fused", tape=2 * MIB,
                    tape_flops=TAPES_MIN_FLOPS_PER_BYTE * 2 * MIB - 1)
    assert Auto.choose(n, thin, (10**12, "test"))[0] == Store()


def test_auto_choice_on_a_model() -> None:
    assert "every step's graph kept" in _choice(1024.0)
    assert "revolve" in _choice(0.0)


@pytest.mark.parametrize("megabytes", [0.0, 0.05, 0.2, 1024.0])
def test_auto_matches_unrolled_conv_batchnorm(megabytes: float) -> None:
    net, x, y, xq, yq = _conv_task()
    p = amaml.adapt(net, F.cross_entropy, (x, y), steps=9, lr=0.3,
                    memory=Auto(megabytes=megabytes))
    F.cross_entropy(amaml.functional_call(net, p, xq), yq).backward()
    got = torch.cat([t.grad.reshape(-1) for t in net.parameters()])
    ref = unrolled_meta_grad_apply(lambda q, z: conv_bn_apply(q, z), dict(net.named_parameters()),
                                   F.cross_entropy, x, y, xq, yq, steps=9, lr=0.3)
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("megabytes", [0.0, 1024.0])
def test_auto_matches_unrolled_fused_mlp_and_adam(megabytes: float) -> None:
    from optim_reference import query_grad, unrolled_optimizer

    model = mlp(hidden=16)
    x, y, xq, yq = regression_data()
    got = amaml_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=25, lr=0.03,
                          memory=Auto(megabytes=megabytes))
    assert rel_err(got, unrolled_meta_grad(model, F.mse_loss, x, y, xq, yq, steps=25,
                                           lr=0.03)) < TOL
    wrt = list(model.parameters())
    for t in wrt:
        t.grad = None
    p = amaml.adapt(model, F.mse_loss, (x, y), steps=12, lr=0.02, optimizer="adam",
                    memory=Auto(megabytes=megabytes))
    F.mse_loss(amaml.functional_call(model, p, xq), yq).backward()
    got = torch.cat([t.grad.reshape(-1) for t in wrt])
    u = unrolled_optimizer(model, F.mse_loss, lambda k: (x, y), steps=12, lr=lambda k: 0.02,
                           kind="adam", h={})
    assert rel_err(got, query_grad(model, F.mse_loss, u, xq, yq, wrt)) < TOL


def test_auto_budget_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BUDGET_ENV, "0")
    net, x, y, _, _ = _conv_task()
    text = amaml.explain(net, F.cross_entropy, (x, y), steps=20, lr=0.3)
    assert f"({BUDGET_ENV}=0)" in text and "memory: auto: revolve" in text
    monkeypatch.setenv(BUDGET_ENV, "4096")
    assert "every step's graph kept" in amaml.explain(net, F.cross_entropy, (x, y), steps=20,
                                                      lr=0.3)
    # the argument wins over the environment
    assert "revolve" in _choice(0.0)
    monkeypatch.setenv(BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=BUDGET_ENV):
        amaml.explain(net, F.cross_entropy, (x, y), steps=20, lr=0.3)


def test_auto_budget_from_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    limit, source = Auto(share=0.25).budget_bytes(torch.device("cpu"))
    assert limit > 0 and "0.25 x" in source


_LONG = textwrap.dedent("""
    import json, sys, torch, amaml
    import torch.nn.functional as F
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                              torch.nn.Tanh(), torch.nn.Linear(64, 1))
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    budget = float(sys.argv[1])
    memory = amaml.Auto(megabytes=budget)
    def rss(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    amaml.adapt(net, F.mse_loss, (x, y), steps=50, lr=1e-3, memory=memory)
    text = amaml.explain(net, F.mse_loss, (x, y), steps=10000, lr=1e-3,
                         memory=memory)
    open("/proc/self/clear_refs", "w").write("5")
    base = rss("VmRSS")
    p = amaml.adapt(net, F.mse_loss, (x, y), steps=10000, lr=1e-3, memory=memory)
    F.mse_loss(amaml.functional_call(net, p, x), y).backward()
    print(json.dumps({"growth": rss("VmHWM") - base, "explain": text,
                      "finite": bool(torch.isfinite(net[0].weight.grad).all())}))
""")


def test_auto_at_ten_thousand_steps_stays_within_its_budget() -> None:
    """N = 10,000 steps of a 4.8k-parameter MLP (a state 19 KiB: store would hold 186 MiB)
    under a 1 MiB budget: revolve with the snapshots that fit, and the process's peak grows
    by less than the budget (plus 3 MiB for the allocator's and Python's own)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    p = subprocess.run([sys.executable, "-c", _LONG, "1"], env=env, capture_output=True,
                       text=True, timeout=600, check=True)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert "memory: auto: revolve with" in out["explain"]
    assert out["finite"]
    assert out["growth"] < 1 + 3, out


@pytest.mark.parametrize("optimizer", [None, "adam", "sgd"])
def test_store_with_tapes_reuses_every_step_and_is_exact(optimizer: str | None) -> None:
    """The fused path's tapes kept from the forward pass: the meta-gradient (theta, lr) is
    store's without them, and auto takes them where they fit."""
    from amaml.flow import DiscreteAdjoint

    model = mlp(hidden=16)
    x, y, xq, yq = regression_data()
    grads = []
    for memory in (Store(), Store(tapes=True)):
        lr = torch.tensor(0.03, dtype=torch.float64, requires_grad=True)
        for t in model.parameters():
            t.grad = None
        adjoint = DiscreteAdjoint(memory)
        p = amaml.adapt(model, F.mse_loss, (x, y), steps=17, lr=lr, optimizer=optimizer,
                        adjoint=adjoint)
        F.mse_loss(amaml.functional_call(model, p, xq), yq).backward()
        grads.append(torch.cat([*(t.grad.reshape(-1) for t in model.parameters()),
                                lr.grad.reshape(1)]))
    assert rel_err(grads[1], grads[0]) < 1e-13
    assert "every state and every step's fused tapes stored" in amaml.explain(
        model, F.mse_loss, (x, y), steps=17, lr=0.03, optimizer=optimizer)
    with pytest.raises(TypeError, match="tapes"):
        Store(tapes=1)  # type: ignore[arg-type]


def test_auto_leaves_the_heap_room_where_graphs_are_rebuilt() -> None:
    """Budget with some graphs and checkpoint segments with graphs free graphs and build
    others in the sweep: auto takes them only where REBUILT_GRAPHS_SLACK x their predicted
    peak fits; every graph kept (nothing rebuilt) fits at its predicted peak."""
    cost = StepCost(state=1 * MIB, graph=10 * MIB, kernel="autograd")
    n = 100
    fifty = predict_peak(Budget(megabytes=50 * 10.0), n, cost, 50)
    assert fifty is not None
    memory, taped, why = Auto.choose(n, cost, (fifty, "test"))
    assert isinstance(memory, Budget) and taped is not None and taped < 50
    assert (predict_peak(memory, n, cost, taped) or 0) * REBUILT_GRAPHS_SLACK <= fifty
    assert "heap's slack" in why
    whole = predict_peak(Budget(megabytes=n * 10.0), n, cost, n)
    assert whole is not None
    memory, taped, why = Auto.choose(n, cost, (whole, "test"))
    assert taped == n and "slack" not in why
    ckpt = predict_peak(Checkpoint(), n, cost)
    assert ckpt is not None
    memory, _, _ = Auto.choose(n, cost, (ckpt, "test"))  # graphs: no room for the slack
    assert memory == Checkpoint(tapes=False)
