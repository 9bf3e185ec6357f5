"""Models with BatchNorm: ``batch_norm="batch"`` / ``"running"`` in adapt, adapt_batch and
the functional calls.

The reference is :func:`helpers.conv_bn_apply`, the Conv-BatchNorm network written out with
``torch.nn.functional`` (batch statistics by ``F.batch_norm(training=True)`` without running
buffers), differentiated by plain autograd through hand-written gradient steps. Tolerance
1e-10 (relative, float64), as in test_flow_exactness.py: the adjoint and the unrolled
reference sum the same terms in different orders (round-off ~1e-15, a few steps deep); a
statistic taken over the wrong batch (e.g. across tasks) or a running statistic used in
place of a batch one shows at 1e-3 or above.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DT,
    conv_bn_apply,
    conv_bn_net,
    mlp,
    regression_data,
    rel_err,
    unrolled_meta_grad_apply,
)
from torch import Tensor, nn

import amaml

TOL = 1e-10
STEPS, LR = 5, 0.3
MEMORIES = {"store": amaml.Store(), "checkpoint": amaml.Checkpoint(every=2),
            "revolve": amaml.Revolve(snapshots=2)}  # small budgets: segments are recomputed


def _images(n: int = 9, batch: int | None = None) -> tuple[Tensor, Tensor]:
    lead = () if batch is None else (batch,)
    return torch.randn(*lead, n, 1, 8, 8, dtype=DT), torch.randint(0, 3, (*lead, n))


def _tracked_net() -> nn.Module:
    """The network with non-trivial running statistics, so that using them would show."""
    net = conv_bn_net()
    bn = net[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4, dtype=DT))
        bn.running_var.copy_(torch.rand(4, dtype=DT) + 0.5)
    bn.num_batches_tracked.fill_(7)
    return net


def _state(net: nn.Module) -> dict[str, object]:
    """Everything amaml must leave alone: buffers, parameters, flags."""
    return {
        "buffers": {n: b.clone() for n, b in net.named_buffers()},
        "params": {n: p.detach().clone() for n, p in net.named_parameters()},
        "flags": [(m.training, getattr(m, "track_running_stats", None)) for m in net.modules()],
    }


def _assert_unchanged(net: nn.Module, before: dict[str, object]) -> None:
    after = _state(net)
    assert after["flags"] == before["flags"]
    for key in ("buffers", "params"):
        old, new = before[key], after[key]
        assert isinstance(old, dict) and isinstance(new, dict) and old.keys() == new.keys()
        for n in old:
            assert torch.equal(old[n], new[n]), f"{key} {n} changed"


def _reference(net: nn.Module, x: Tensor, y: Tensor, xq: Tensor, yq: Tensor,
               running: bool = False) -> Tensor:
    bn = net[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone()) if running else None
    return unrolled_meta_grad_apply(lambda p, z: conv_bn_apply(p, z, stats),
                                    dict(net.named_parameters()), F.cross_entropy, x, y, xq, yq,
                                    steps=STEPS, lr=LR)


def _grads(net: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


@pytest.mark.parametrize("memory", list(MEMORIES))
def test_adapt_meta_grad_equals_unrolled(memory: str) -> None:
    net = _tracked_net()
    (x, y), (xq, yq) = _images(), _images()
    before = _state(net)
    params = amaml.adapt(net, F.cross_entropy, (x, y), steps=STEPS, lr=LR,
                         memory=MEMORIES[memory])
    F.cross_entropy(amaml.functional_call(net, params, xq), yq).backward()
    assert rel_err(_grads(net), _reference(net, x, y, xq, yq)) < TOL
    _assert_unchanged(net, before)


@pytest.mark.parametrize("memory", list(MEMORIES))
def test_adapt_batch_meta_grad_equals_unrolled_task_by_task(memory: str) -> None:
    net = _tracked_net()
    (xs, ys), (xqs, yqs) = _images(batch=3), _images(batch=3)
    before = _state(net)
    params = amaml.adapt_batch(net, F.cross_entropy, (xs, ys), steps=STEPS, lr=LR,
                               memory=MEMORIES[memory])
    losses = torch.func.vmap(F.cross_entropy)(amaml.functional_call_batch(net, params, xqs),
                                              yqs)
    for b in range(3):
        got = torch.autograd.grad(losses[b], list(net.parameters()), retain_graph=b < 2)
        want = _reference(net, xs[b], ys[b], xqs[b], yqs[b])
        assert rel_err(torch.cat([g.reshape(-1) for g in got]), want) < TOL
    _assert_unchanged(net, before)


def test_running_mode_meta_grad_equals_unrolled_with_running_statistics() -> None:
    net = _tracked_net()
    (x, y), (xq, yq) = _images(), _images()
    before = _state(net)
    params = amaml.adapt(net, F.cross_entropy, (x, y), steps=STEPS, lr=LR, memory="store",
                         batch_norm="running")
    F.cross_entropy(amaml.functional_call(net, params, xq, batch_norm="running"), yq).backward()
    assert rel_err(_grads(net), _reference(net, x, y, xq, yq, running=True)) < TOL
    assert net.training  # put in eval mode only during each call
    _assert_unchanged(net, before)


@pytest.mark.parametrize("batch_norm", ["batch", "running"])
@pytest.mark.parametrize("training", [True, False])
def test_buffers_and_flags_unchanged_by_adapt_batch_and_backward(batch_norm: str,
                                                                 training: bool) -> None:
    net = _tracked_net().train(training)
    (xs, ys), (xqs, yqs) = _images(batch=2), _images(batch=2)
    before = _state(net)
    params = amaml.adapt_batch(net, F.cross_entropy, (xs, ys), steps=3, lr=LR,
                               memory="checkpoint", batch_norm=batch_norm)
    _assert_unchanged(net, before)
    torch.func.vmap(F.cross_entropy)(
        amaml.functional_call_batch(net, params, xqs, batch_norm=batch_norm), yqs).sum().backward()
    _assert_unchanged(net, before)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_running_mode_equals_eval_mode_module() -> None:
    net = _tracked_net()  # in training mode: "running" must still read the running statistics
    x, _ = _images()
    params = dict(net.named_parameters())
    got = amaml.functional_call(net, params, x, batch_norm="running")
    got_batch = amaml.functional_call_batch(
        net, {n: p.expand(2, *p.shape) for n, p in params.items()}, x.expand(2, *x.shape),
        batch_norm="running")
    assert net.training
    with torch.no_grad():
        want = net.eval()(x)
    assert torch.equal(got, want)
    # Under vmap the convolution runs as one batched kernel: the same sums in another
    # order, so equal to round-off only (float64, ~1e-16 relative).
    for b in range(2):
        torch.testing.assert_close(got_batch[b], want, rtol=1e-13, atol=1e-13)


def test_batch_mode_equals_training_mode_module_without_touching_it() -> None:
    net = _tracked_net().eval()  # in eval mode: "batch" must still use batch statistics
    x, _ = _images()
    got = amaml.functional_call(net, dict(net.named_parameters()), x)
    assert torch.equal(got, conv_bn_apply(dict(net.named_parameters()), x))
    assert not net.training and int(net[1].num_batches_tracked) == 7


@pytest.mark.parametrize("setup", ["eval", "untracked"])
def test_eval_mode_and_untracked_models_adapt_exactly(setup: str) -> None:
    if setup == "eval":
        net = _tracked_net().eval()
    else:
        net = conv_bn_net()
        net[1] = nn.BatchNorm2d(4, track_running_stats=False).to(DT)
    (xs, ys), (xqs, yqs) = _images(batch=2), _images(batch=2)
    before = _state(net)
    params = amaml.adapt_batch(net, F.cross_entropy, (xs, ys), steps=STEPS, lr=LR,
                               memory="store")
    losses = torch.func.vmap(F.cross_entropy)(amaml.functional_call_batch(net, params, xqs),
                                              yqs)
    got = torch.autograd.grad(losses[1], list(net.parameters()))
    want = _reference(net, xs[1], ys[1], xqs[1], yqs[1])
    assert rel_err(torch.cat([g.reshape(-1) for g in got]), want) < TOL
    _assert_unchanged(net, before)


def test_batchnorm_as_the_whole_model() -> None:
    """A top-level BatchNorm: its buffers have no module prefix."""
    net = nn.BatchNorm1d(3).to(DT)
    x, y = torch.randn(2, 6, 3, dtype=DT), torch.randn(2, 6, 3, dtype=DT)
    before = _state(net)
    params = amaml.adapt_batch(net, F.mse_loss, (x, y), steps=2, lr=0.1)
    amaml.functional_call_batch(net, params, x).sum().backward()
    _assert_unchanged(net, before)


def test_model_without_batchnorm_is_a_plain_functional_call() -> None:
    net = mlp()
    x, _, _, _ = regression_data()
    params = {n: p + 0.01 for n, p in net.named_parameters()}
    want = torch.func.functional_call(net, params, (x,))
    assert torch.equal(amaml.functional_call(net, params, x), want)
    assert torch.equal(amaml.functional_call(net, params, x, batch_norm="running"), want)


@pytest.mark.parametrize("bad", ["eval", "Batch", None, True])
def test_bad_batch_norm_refused(bad: object) -> None:
    net = _tracked_net()
    x, y = _images()
    with pytest.raises(ValueError, match=r"batch_norm=.*expected one of \['batch', 'running'\]"):
        amaml.adapt(net, F.cross_entropy, (x, y), steps=1, lr=0.1,
                    batch_norm=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_norm="):
        amaml.functional_call(net, dict(net.named_parameters()), x,
                              batch_norm=bad)  # type: ignore[arg-type]


def test_running_mode_without_running_statistics_refused() -> None:
    net = conv_bn_net()
    net[1] = nn.BatchNorm2d(4, track_running_stats=False).to(DT)
    x, y = _images(batch=2)
    with pytest.raises(ValueError, match=r"batch_norm='running'.*\['1'\].*"
                                         "track_running_stats=False"):
        amaml.adapt_batch(net, F.cross_entropy, (x, y), steps=1, lr=0.1, batch_norm="running")


def test_compiled_adapt_batch_with_batch_statistics_loops() -> None:
    """torch.func's vjp of vmap of grad is wrong for batch-statistics BatchNorm after a
    convolution in torch 2.13 (1e-2 relative): compiled, such a model's tasks run as a
    loop (tasks='auto'), and tasks='batched' is refused rather than a wrong gradient."""
    net = _tracked_net()
    x, y = _images(batch=2)
    how = amaml.explain(net, F.cross_entropy, (x, y), steps=1, lr=0.1, compile=True,
                        batched=True)
    assert "tasks one after another (compiled" in how.splitlines()[0]
    for kw in ({"compile": True}, {"adjoint": amaml.DiscreteAdjoint(compile=True)}):
        with pytest.raises(ValueError, match="cannot batch this model exactly: compiled"):
            amaml.adapt_batch(net, F.cross_entropy, (x, y), steps=1, lr=0.1, tasks="batched",
                              **kw)
