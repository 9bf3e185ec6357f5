"""``--inner-optimizer`` and its options: config validation, config.json, the CLI flags, the
algorithms they build, and tiny runs of ``train``, ``compare``, ``eval`` and ``sweep-steps``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from amaml import optim
from amaml.algorithms import GradientMetaLearner, Reptile, make_algorithm
from amaml.cli import build_parser, main
from amaml.experiments import TrainConfig
from amaml.experiments.build import build_algorithm, resolve_compile
from amaml.experiments.config import INNER_DEFAULTS, describe_inner_fields
from amaml.flow import Euler, Unrolled

TINY = ["--family", "cosmixture", "--shots", "5", "--queries", "5", "--steps", "3",
        "--meta-iters", "2", "--meta-batch", "2", "--n-train", "6", "--n-test", "4",
        "--finetune-epochs", "2", "--finetune-every", "1", "--hidden", "8", "--no-progress"]
TINY_CONFIG = dict(family="cosmixture", shots=5, queries=5, steps=3, meta_iters=2,
                   meta_batch=2, n_train=6, n_test=4, finetune_epochs=2, finetune_every=1,
                   hidden=(8,))


def tiny(**changes: object) -> TrainConfig:
    return TrainConfig(**{**TINY_CONFIG, **changes})


# --- config validation -------------------------------------------------------------------

@pytest.mark.parametrize("changes,match", [
    ({"inner_optimizer": "nadam"}, r"Unknown inner_optimizer 'nadam' for --inner-optimizer"),
    ({"inner_optimizer": "adam", "inner_momentum": 0.9},
     r"inner_momentum \(--inner-momentum\) is an option of --inner-optimizer sgd or "
     r"rmsprop; --inner-optimizer adam does not take it"),
    ({"inner_betas": (0.8, 0.99)},
     r"inner_betas \(--inner-betas\) is an option of --inner-optimizer adam or adamw; "
     r"--inner-optimizer gd does not take it"),
    ({"inner_optimizer": "sgd", "inner_alpha": 0.9}, r"inner_alpha \(--inner-alpha\)"),
    ({"inner_optimizer": "adam", "inner_nesterov": True}, r"--inner-nesterov"),
    ({"inner_optimizer": "sgd", "inner_eps": 1e-6}, r"inner_eps \(--inner-eps\)"),
    ({"inner_weight_decay": 0.1}, r"--inner-weight-decay.*gd does not take it"),
    ({"inner_optimizer": "sgd", "inner_nesterov": True},
     r"--inner-nesterov\) needs inner_momentum \(--inner-momentum\) > 0"),
    ({"inner_optimizer": "adam", "solver": "rk4"},
     r"--inner-optimizer adam needs --solver euler \(got --solver rk4\): an optimiser step "
     r"is a discrete map.*no Heun or Runge-Kutta version"),
    ({"inner_optimizer": "rmsprop", "solver": "heun"}, r"needs --solver euler"),
    ({"inner_optimizer": "adam", "memory": "backsolve"}, r"--memory backsolve"),
    ({"inner_optimizer": "adamw", "inner_betas": (1.0, 0.9)},
     r"inner_betas \(--inner-betas\) must lie in \[0, 1\); got 1.0"),
    ({"inner_optimizer": "adam", "inner_betas": (0.9,)}, r"must be two numbers B1 B2"),
    ({"inner_optimizer": "adam", "inner_eps": 0.0}, r"inner_eps \(--inner-eps\) must be"),
    ({"inner_optimizer": "sgd", "inner_momentum": -0.5}, r"inner_momentum \(--inner-momentum\)"),
    ({"inner_optimizer": "rmsprop", "inner_weight_decay": float("inf")},
     r"inner_weight_decay \(--inner-weight-decay\) must be a finite number >= 0"),
    ({"inner_optimizer": "adam", "method": "imaml"},
     r"--inner-optimizer adam does not apply to imaml: its implicit gradient"),
])
def test_config_refuses_bad_inner_optimizer_settings(changes: dict[str, object],
                                                     match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny(**changes)


def test_the_paper_protocol_rk4_is_refused_with_an_optimiser_unless_euler_is_given() -> None:
    with pytest.raises(ValueError, match="needs --solver euler"):
        TrainConfig.from_protocol("paper", inner_optimizer="adam")
    c = TrainConfig.from_protocol("paper", inner_optimizer="adam", solver="euler")
    assert c.inner_optimizer_instance() == optim.Adam()


@pytest.mark.parametrize("changes,expected", [
    ({}, None),
    ({"inner_optimizer": "sgd"}, optim.SGD()),
    ({"inner_optimizer": "sgd", "inner_momentum": 0.9, "inner_nesterov": True,
      "inner_weight_decay": 1e-3},
     optim.SGD(momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ({"inner_optimizer": "adam"}, optim.Adam()),
    ({"inner_optimizer": "adam", "inner_betas": (0.8, 0.99), "inner_eps": 1e-6},
     optim.Adam(betas=(0.8, 0.99), eps=1e-6)),
    # None: the optimiser's own weight decay (AdamW's is 0.01, the others' 0).
    ({"inner_optimizer": "adamw"}, optim.AdamW(weight_decay=0.01)),
    ({"inner_optimizer": "adamw", "inner_weight_decay": 0.0}, optim.AdamW(weight_decay=0.0)),
    ({"inner_optimizer": "rmsprop", "inner_alpha": 0.9, "inner_momentum": 0.5},
     optim.RMSprop(alpha=0.9, momentum=0.5)),
])
def test_config_builds_the_optimiser(changes: dict[str, object],
                                     expected: optim.AbstractInnerOptimizer | None) -> None:
    assert tiny(**changes).inner_optimizer_instance() == expected


def test_imaml_takes_no_inner_optimiser_in_the_registry() -> None:
    with pytest.raises(ValueError, match="'imaml' does not use optimizer"):
        make_algorithm("imaml", n_steps=3, inner_lr=0.01, optimizer="adam")


# --- config.json --------------------------------------------------------------------------

def test_config_json_round_trip_with_the_inner_optimizer() -> None:
    c = tiny(inner_optimizer="adamw", inner_betas=(0.8, 0.99), inner_eps=1e-7,
             inner_weight_decay=0.05)
    stored = json.loads(json.dumps(c.to_dict()))
    assert stored["inner_optimizer"] == "adamw" and stored["inner_betas"] == [0.8, 0.99]
    assert stored["inner_weight_decay"] == 0.05
    back = TrainConfig.from_dict(stored)
    assert back == c and back.inner_betas == (0.8, 0.99)
    assert back.inner_optimizer_instance() == optim.AdamW(betas=(0.8, 0.99), eps=1e-7,
                                                          weight_decay=0.05)


def test_a_config_saved_before_the_inner_optimizer_loads_with_gd() -> None:
    old = {k: v for k, v in tiny().to_dict().items() if k not in INNER_DEFAULTS}
    assert not any(k.startswith("inner_") and k != "inner_lr" for k in old)
    c = TrainConfig.from_dict(old)
    assert c == tiny() and c.inner_optimizer == "gd" and c.inner_optimizer_instance() is None
    assert describe_inner_fields(old) == "euler"
    # A summary's setting gives None for a key that an old config.json lacks.
    assert describe_inner_fields({**old, "inner_optimizer": None, "solver": "rk4"}) == "rk4"


def test_a_run_saved_before_the_inner_optimizer_resumes(tmp_path: Path) -> None:
    from amaml.experiments.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "run"
    assert main(["train", *TINY, "--meta-iters", "4", "--save-every", "2",
                 "--out", str(out)]) == 0
    state = load_checkpoint(out / "checkpoint.pt")
    for key in INNER_DEFAULTS:
        del state["config"][key]
    state.update(finished=False, iteration=2, history=state["history"][:2])
    save_checkpoint(out / "checkpoint.pt",
                    {k: v for k, v in state.items() if k not in ("format", "version")})
    (out / "metrics.json").unlink()
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["resumes"] == 1
    assert json.loads((out / "config.json").read_text())["inner_optimizer"] == "gd"
    # ... but not with another inner optimiser: it changes the results.
    assert main(["train", "--out", str(out), "--resume", "--no-progress",
                 "--inner-optimizer", "adam"]) == 2


def test_summary_reads_old_and_new_config_json_alike(tmp_path: Path) -> None:
    from amaml.experiments.summary import load_comparison

    d = tmp_path / "cmp"
    (d / "amaml").mkdir(parents=True)
    (d / "results.json").write_text(json.dumps([{"method": "amaml", "nrmse_mean": 0.5}]))
    old = {k: v for k, v in tiny().to_dict().items() if k not in INNER_DEFAULTS}
    (d / "amaml" / "config.json").write_text(json.dumps(old))
    assert load_comparison(d)["configs"]["amaml"] == tiny().to_dict()


# --- the CLI ------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "compare", "sweep-steps"])
def test_cli_flags_set_the_config(command: str) -> None:
    from amaml._cli_flags import config_from_args

    args = build_parser().parse_args([
        command, "--out", "x", "--inner-optimizer", "adam", "--inner-betas", "0.8", "0.99",
        "--inner-eps", "1e-6", "--inner-weight-decay", "0.1"])
    c = config_from_args(args)
    assert (c.inner_optimizer, c.inner_betas, c.inner_eps, c.inner_weight_decay) == \
        ("adam", (0.8, 0.99), 1e-6, 0.1)
    args = build_parser().parse_args([
        command, "--out", "x", "--inner-optimizer", "sgd", "--inner-momentum", "0.9",
        "--inner-nesterov"])
    assert config_from_args(args).inner_optimizer_instance() == \
        optim.SGD(momentum=0.9, nesterov=True)
    args = build_parser().parse_args([command, "--out", "x", "--inner-optimizer", "rmsprop",
                                      "--inner-alpha", "0.9"])
    assert config_from_args(args).inner_alpha == 0.9
    # No flag given: today's gradient flow.
    assert config_from_args(build_parser().parse_args([command, "--out", "x"])) \
        .inner_optimizer_instance() is None


@pytest.mark.parametrize("argv,match", [
    (["train", "--inner-optimizer", "adam", "--solver", "rk4"],
     "--inner-optimizer adam needs --solver euler"),
    (["train", "--inner-optimizer", "adam", "--inner-momentum", "0.9"], "--inner-momentum"),
    (["train", "--inner-optimizer", "nadam"], "invalid choice"),
    (["train", "--inner-betas", "0.9"], "--inner-betas: expected 2 arguments"),
    (["compare", "--inner-optimizer", "adam", "--methods", "amaml,imaml", "--out", "x"],
     "does not apply to imaml.*--methods amaml"),
    (["sweep-steps", "--inner-optimizer", "sgd", "--methods", "imaml", "--out", "x"],
     "does not apply to imaml"),
])
def test_cli_errors_are_one_line(argv: list[str], match: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code  # type: ignore[assignment]
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("amaml: error: ")
    assert re.search(match, err[0]), err[0]
    assert not (tmp_path / "x").exists()  # refused before anything was written


# --- the algorithms -----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["amaml", "maml", "maml1", "fomaml", "reptile"])
def test_build_algorithm_passes_the_optimiser_to_every_method(method: str) -> None:
    assert build_algorithm(tiny(method=method)).optimizer is None
    algorithm = build_algorithm(tiny(method=method, inner_optimizer="adam",
                                     inner_betas=(0.8, 0.9)))
    assert algorithm.optimizer == optim.Adam(betas=(0.8, 0.9))


def test_an_optimiser_compiles_like_gradient_descent() -> None:
    choice, why = resolve_compile(tiny(inner_optimizer="adam", compile=True))
    assert choice is True and "compiled" in why


def _tasks() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(),
                              torch.nn.Linear(6, 1)).double()
    xs, xq = torch.randn(2, 5, 2, generator=g).double(), torch.randn(2, 5, 2, generator=g).double()
    return net, (xs, xs.sum(-1, keepdim=True).sin(), xq, xq.sum(-1, keepdim=True).sin())


def _torch_adam(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
                lr: float) -> dict[str, torch.Tensor]:
    """A hand-written reference: ``steps`` of torch.optim.Adam on one task."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(torch.func.functional_call(net, params, (x,)), y).backward()
        opt.step()
    return {n: p.detach() for n, p in params.items()}


@pytest.mark.parametrize("algorithm", [
    GradientMetaLearner("maml", 4, 0.05, Euler(), Unrolled(), optimizer=optim.Adam()),
    Reptile(4, 0.05, optimizer=optim.Adam()),
])
def test_algorithms_adapt_with_the_optimiser(algorithm: object) -> None:
    """The algorithm's adaptation is torch.optim.Adam's, task by task (float64, 1e-10:
    round-off of a few elementwise steps)."""
    net, (xs, ys, _, _) = _tasks()
    got = algorithm.adapt(net, F.mse_loss, (xs, ys))  # type: ignore[attr-defined]
    for b in range(xs.shape[0]):
        ref = _torch_adam(net, xs[b], ys[b], steps=4, lr=0.05)
        for n in ref:
            torch.testing.assert_close(got[n][b], ref[n], rtol=1e-10, atol=1e-10)


def test_meta_gradient_with_sgd_is_that_of_gradient_descent() -> None:
    """``optim.SGD()`` is gradient descent: the same meta-gradient as the default flow
    (float64; 1e-10 is round-off), and Adam's differs, so the optimiser reaches meta_step."""
    net, batch = _tasks()
    grads = {}
    for name, opt in (("gd", None), ("sgd", optim.SGD()), ("adam", optim.Adam())):
        algorithm = GradientMetaLearner("maml", 4, 0.05, Euler(), Unrolled(), optimizer=opt)
        net.zero_grad(set_to_none=True)
        algorithm.meta_step(net, F.mse_loss, batch)
        grads[name] = torch.cat([p.grad.flatten() for p in net.parameters()])  # type: ignore[union-attr]
    torch.testing.assert_close(grads["sgd"], grads["gd"], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(grads["adam"], grads["gd"], rtol=1e-3)


def test_an_algorithm_refuses_an_optimiser_name() -> None:
    with pytest.raises(TypeError, match="optimizer must be an amaml.optim optimiser"):
        GradientMetaLearner("maml", 4, 0.05, optimizer="adam")  # type: ignore[arg-type]


# --- tiny runs ----------------------------------------------------------------------------

def test_train_with_adam_writes_it_and_eval_uses_it(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--inner-optimizer", "adam", "--inner-betas", "0.8", "0.99",
                 "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["inner_optimizer"] == "adam" and config["inner_betas"] == [0.8, 0.99]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["meta_iters"] == 2
    capsys.readouterr()
    # eval of the saved initialisation adapts with the stored optimiser: the same score.
    assert main(["eval", "--checkpoint", str(out / "init.pt"), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["nrmse_mean"] == pytest.approx(metrics["nrmse_mean"], rel=1e-6)


def test_compare_with_adam_names_it_in_the_table(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "amaml,maml", *TINY, "--inner-optimizer", "adam",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for text in (printed, (out / "results.md").read_text()):
        assert "inner optimiser: adam(betas=(0.9, 0.999)" in text
    for method in ("amaml", "maml"):
        assert json.loads((out / method / "config.json").read_text())["inner_optimizer"] \
            == "adam"


@pytest.mark.slow
def test_sweep_steps_with_adam_stops_maml_at_the_memory_budget(tmp_path: Path) -> None:
    """The budget is measured on a real meta-gradient, so Adam's buffers (kept by MAML's
    unrolled graph at every step) count. Measured here: MAML at N = 20 needs about 55 MiB
    under gradient descent; under Adam about 50 MiB at N = 2 and 250 MiB at N = 40 (157 at
    N = 20 since Adam's update is one autograd node; 320 before): a budget of 150 MiB sits
    far from all three."""
    from amaml.experiments import sweep
    from amaml.experiments.build import build_family

    config = TrainConfig(family="sinusoid", shots=5, queries=5, meta_iters=2, meta_batch=2,
                         n_train=4, n_test=3, hidden=(256, 256), finetune_epochs=0,
                         dtype="float64", compile=False, inner_optimizer="adam")
    budget = 150.0
    gd = sweep._method_config(config.replace(inner_optimizer="gd"), "maml", 20, 0)
    assert sweep._probe(gd, build_family(gd)) < budget
    result = sweep.sweep_steps(config, "maml", "2,40", tmp_path / "sw",
                               max_memory_mb=budget, progress=False)
    status = {r["steps"]: r["status"] for r in result["rows"]}
    assert status == {2: "ok", 40: "over budget"}
    assert "inner optimiser: adam(" in (tmp_path / "sw" / "sweep.md").read_text()
    cfg = json.loads((tmp_path / "sw" / "seed0" / "maml-N2" / "config.json").read_text())
    assert cfg["inner_optimizer"] == "adam" and cfg["maml_steps"] == 2
