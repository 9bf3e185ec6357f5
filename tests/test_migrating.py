"""docs/migrating.md: every snippet runs, and the peers' meta-gradients equal amaml's.

The snippets are read from the page (each ```python block starts with a ``# tag`` line), run
after the page's set-up in a fresh namespace, and the meta-gradient each leaves in
``net``'s ``.grad`` is compared in float64. A peer that is not installed is skipped;
learn2learn does not build on Python 3.11, so its snippet is only compiled there.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import Tensor

PAGE = Path(__file__).resolve().parents[1] / "docs" / "migrating.md"
# Tolerances: float64 round-off of two exact computations of the same gradient through 50
# steps of a 3-16-1 tanh network; measured 3e-16 (SGD) and 8e-15 (Adam) relative.
EXACT = 1e-12
ADAM = 1e-10


def _snippets() -> dict[str, str]:
    text = PAGE.read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n# ([^\n]+)\n(.*?)^```", text, flags=re.M | re.S)
    out: dict[str, str] = {}
    for tag, code in blocks:
        assert tag not in out, f"two snippets tagged {tag!r} in {PAGE.name}"
        out[tag] = code
    return out


SNIPPETS = _snippets()


def _run(*tags: str) -> dict[str, object]:
    """Run the set-up then ``tags`` in order; return the namespace."""
    namespace: dict[str, object] = {"__name__": "__migrating__"}
    default = torch.get_default_dtype()  # the set-up sets float64, as the page explains
    try:
        for tag in ("set-up", *tags):
            exec(compile(SNIPPETS[tag], f"{PAGE.name} [{tag}]", "exec"), namespace)
    finally:
        torch.set_default_dtype(default)
    return namespace


def _meta_grad(namespace: dict[str, object]) -> Tensor:
    net = namespace["net"]
    assert isinstance(net, torch.nn.Module)
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads), "a parameter has no meta-gradient"
    return torch.cat([g.reshape(-1) for g in grads if g is not None])


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_the_page_has_every_snippet() -> None:
    assert set(SNIPPETS) == {"set-up", "higher", "learn2learn", "TorchOpt", "amaml",
                             "TorchOpt, Adam", "amaml, Adam", "a feature that is always zero"}


def test_amaml_snippets_run_and_give_a_meta_gradient() -> None:
    for tags in (("amaml",), ("amaml, Adam",), ("a feature that is always zero", "amaml, Adam")):
        g = _meta_grad(_run(*tags))
        assert g.dtype == torch.float64
        assert bool(torch.isfinite(g).all()) and float(g.abs().max()) > 0


def test_amaml_leaves_the_model_as_it_was() -> None:
    before = _run()
    after = _run("amaml")
    for p, q in zip(before["net"].parameters(), after["net"].parameters(), strict=True):
        assert torch.equal(p, q)


def test_higher_gives_amaml_meta_gradient() -> None:
    pytest.importorskip("higher")
    assert _rel(_meta_grad(_run("higher")), _meta_grad(_run("amaml"))) < EXACT


def test_torchopt_gives_amaml_meta_gradient() -> None:
    pytest.importorskip("torchopt")
    assert _rel(_meta_grad(_run("TorchOpt")), _meta_grad(_run("amaml"))) < EXACT


def test_learn2learn_snippet() -> None:
    code = SNIPPETS["learn2learn"]
    compile(code, "learn2learn snippet", "exec")  # at least valid Python
    assert "MAML(net, lr=lr).clone()" in code and "learner.adapt(" in code
    pytest.importorskip("learn2learn", reason="learn2learn does not build on Python 3.11")
    assert _rel(_meta_grad(_run("learn2learn")), _meta_grad(_run("amaml"))) < EXACT


def test_torchopt_adam_gives_amaml_meta_gradient() -> None:
    pytest.importorskip("torchopt")
    assert _rel(_meta_grad(_run("TorchOpt, Adam")), _meta_grad(_run("amaml, Adam"))) < ADAM


def test_adam_at_an_exactly_zero_gradient() -> None:
    torchopt = pytest.importorskip("torchopt")
    dead = "a feature that is always zero"
    ours = _run(dead, "amaml, Adam")
    g = _meta_grad(ours)
    # What the page says of TorchOpt: NaN reaches every entry on this network.
    assert not bool(torch.isfinite(_meta_grad(_run(dead, "TorchOpt, Adam"))).any())
    # amaml: finite; zero for the dead input's weights (the query loss does not read them).
    net = ours["net"]
    w = net[0].weight.grad
    assert bool(torch.isfinite(g).all())
    assert torch.equal(w[:, 0], torch.zeros_like(w[:, 0]))
    # The rest equals TorchOpt's on the same network with the dead input removed, where
    # no gradient is zero: that network's inner loop is the same loop.
    start = _run()
    full = start["net"]
    small = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 1)).double()
    with torch.no_grad():
        small[0].weight.copy_(full[0].weight[:, 1:])
        small[0].bias.copy_(full[0].bias)
        small[2].weight.copy_(full[2].weight)
        small[2].bias.copy_(full[2].bias)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # TorchOpt's Adam reads it (see the page)
    try:
        x, y, xq, yq = (start[k] for k in ("x", "y", "xq", "yq"))
        inner = torchopt.MetaAdam(small, lr=start["lr"])
        saved = torchopt.extract_state_dict(small, by="reference", detach_buffers=True)
        for _ in range(start["steps"]):
            inner.step(torch.nn.functional.mse_loss(small(x[:, 1:]), y))
        torch.nn.functional.mse_loss(small(xq[:, 1:]), yq).backward()
        torchopt.recover_state_dict(small, saved)
    finally:
        torch.set_default_dtype(default)
    reference = torch.cat([small[0].weight.grad.reshape(-1), small[0].bias.grad,
                           small[2].weight.grad.reshape(-1), small[2].bias.grad])
    rest = torch.cat([w[:, 1:].reshape(-1), net[0].bias.grad,
                      net[2].weight.grad.reshape(-1), net[2].bias.grad])
    assert _rel(rest, reference) < ADAM
