"""Experiments library: config validation, model, train/evaluate/compare end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from amaml.experiments import (
    MLP,
    RunDirError,
    TrainConfig,
    compare,
    finetune_curve,
    make_model,
    parse_methods,
    train,
)
from amaml.experiments.evaluate import nrmse_per_task, summarise
from amaml.tasks import Task, TaskSet

# A budget of seconds: tiny tasks, few inner steps, few meta-iterations.
TINY = dict(family="cosmixture", shots=5, queries=5, steps=3, meta_iters=4, meta_batch=2,
            n_train=6, n_test=4, finetune_epochs=4, finetune_every=2, save_every=2,
            hidden=(8,))


def tiny(**changes: object) -> TrainConfig:
    return TrainConfig(**{**TINY, **changes})


@pytest.mark.parametrize("field,value,match", [
    ("family", "nope", "Unknown family 'nope' for --family"),
    ("method", "sgd", "Unknown method 'sgd' for --method"),
    ("shots", 0, r"shots \(--shots\) must be in \[1, 100000\]"),
    ("steps", 0, r"steps \(--steps\)"),
    ("steps", 1.5, r"steps \(--steps\) must be an int"),
    ("inner_lr", -1.0, r"inner_lr \(--inner-lr\)"),
    ("meta_lr", float("nan"), r"meta_lr \(--meta-lr\)"),
    ("solver", "leapfrog", "Unknown solver"),
    ("dtype", "float16", "Unknown dtype"),
    ("meta_batch", 10, r"must not exceed n_train"),
    ("hidden", (0,), r"hidden \(--hidden\)"),
])
def test_config_rejects_bad_values(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny(**{field: value})


def test_config_roundtrip_and_defaults() -> None:
    c = TrainConfig()
    assert (c.family, c.method, c.shots, c.queries, c.inner_lr, c.dtype, c.device) == \
        ("cosmixture", "amaml", 50, 50, 0.01, "float32", "cpu")
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c.effective_maml_steps == c.steps // 10
    with pytest.raises(ValueError, match="Unknown config fields"):
        TrainConfig.from_dict({"bogus": 1})


def test_mlp_shape_and_seeded_init() -> None:
    state = torch.get_rng_state()
    a, b = make_model(2, seed=3), make_model(2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # no global RNG used
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert sum(p.numel() for p in a.parameters()) == 2 * 32 + 32 + 32 * 32 + 32 + 32 + 1
    assert a(torch.zeros(7, 2)).shape == (7, 1)
    with pytest.raises(ValueError, match="input_dim"):
        MLP(0)


def test_nrmse_handles_ragged_test_sets() -> None:
    # Collaborative filtering: a different number of test points per task.
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    tasks = TaskSet([Task(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1),
                          torch.zeros(2, 1), torch.zeros(n, 1), torch.full((n, 1), v))
                     for n, v in ((3, 1.0), (5, 2.0))])
    params = {"weight": torch.zeros(2, 1, 1)}
    assert nrmse_per_task(model, params, tasks) == [1.0, 2.0]
    mean, sem = summarise([1.0, 2.0])
    assert mean == 1.5 and math.isclose(sem, math.sqrt(0.5) / math.sqrt(2))
    curve = finetune_curve(model, torch.nn.functional.mse_loss, tasks, lr=0.1, epochs=3,
                           every=2)
    assert curve["epochs"] == [0, 2, 3] and curve["nrmse_mean"][0] == 1.5


def test_train_writes_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(tiny(), out, progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.json", "metrics.jsonl", "init.pt", "checkpoint.pt",
            "training_curve.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 0 and "amaml_version" in config and config["method"] == "amaml"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("family", "method", "steps", "nrmse_mean", "nrmse_sem", "meta_loss",
                "finetune", "timings", "eval_steps"):
        assert key in metrics
    assert metrics["nrmse_mean"] > 0 and len(metrics["meta_loss"]["values"]) == 4
    assert metrics["finetune"]["epochs"] == [0, 2, 4]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["iteration"] for s in lines] == [1, 2, 3, 4]
    assert result.metrics["nrmse_mean"] == metrics["nrmse_mean"]
    # Same seed, same result (no global RNG): a second run without --out agrees exactly.
    again = train(tiny(), None, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(result.model.parameters(),
                                                  again.model.parameters()))
    with pytest.raises(RunDirError, match="already holds a run.*--resume"):
        train(tiny(), out, progress=False)


def test_maml_uses_its_own_steps_in_evaluation() -> None:
    r = train(tiny(method="maml", steps=20, meta_iters=1, finetune_epochs=0), None,
              progress=False)
    assert r.metrics["steps"] == 2 and r.metrics["eval_steps"] == 2
    r1 = train(tiny(method="maml1", meta_iters=1, finetune_epochs=0, eval_steps=5), None,
               progress=False)
    assert r1.metrics["steps"] == 1 and r1.metrics["eval_steps"] == 5


def test_compare_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    records = compare(tiny(meta_iters=2), "amaml,maml,reptile", out, progress=False)
    # The methods, then the reference rows.
    assert [r["method"] for r in records] == ["amaml", "maml", "reptile", "no-meta", "oracle"]
    saved = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in saved] == ["amaml", "maml", "reptile", "no-meta", "oracle"]
    assert all({"nrmse_mean", "nrmse_sem", "steps", "finetune"} <= set(r) for r in saved)
    assert {r["method"]: r["steps"] for r in saved if not r["reference"]} == \
        {"amaml": 3, "maml": 1, "reptile": 3}
    table = (out / "results.md").read_text()
    assert "| amaml |" in table and "| reptile |" in table
    assert "paired difference to amaml" in table
    diffs = [a - b for a, b in zip(saved[2]["nrmse_per_task"], saved[0]["nrmse_per_task"])]
    mean, sem = summarise(diffs)
    assert f"| reptile | 3 / 3 | {saved[2]['nrmse_mean']:.4f} ± {saved[2]['nrmse_sem']:.4f} | " \
        f"{mean:+.4f} ± {sem:.4f} |" in table
    assert (out / "finetune.png").stat().st_size > 0
    # Identical initialisation for every method: the epoch-0 point of the fine-tuning
    # curve differs only through meta-training, so it is finite for all.
    assert all(r["finetune"]["nrmse_mean"][0] > 0 for r in saved if r["finetune"])
    with pytest.raises(RunDirError, match="already holds a comparison"):
        compare(tiny(meta_iters=2), "amaml", out, progress=False)
    # --resume skips finished runs and rewrites the same records.
    again = compare(tiny(meta_iters=2), "amaml,maml,reptile", out, resume=True, progress=False)
    assert [r["nrmse_mean"] for r in again] == [r["nrmse_mean"] for r in records]


@pytest.mark.parametrize("methods,match", [
    ("", "is empty"), ("amaml,foo", "Unknown method"), ("maml,maml", "repeats")])
def test_parse_methods_errors(methods: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_methods(methods)


def test_nonfinite_meta_gradient_is_refused_before_the_update(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN in the meta-gradient (finite meta-loss) stops training before Adam spreads it."""
    import importlib

    train_mod = importlib.import_module("amaml.experiments.training")
    real = train_mod.build_algorithm
    seen: list[torch.Tensor] = []

    class Poisoned:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def meta_step(self, model: torch.nn.Module, *args: object,
                      **kwargs: object) -> torch.Tensor:
            losses = self.inner.meta_step(model, *args, **kwargs)  # type: ignore[attr-defined]
            if len(seen) == 2:  # the third meta-iteration
                next(model.parameters()).grad[0, 0] = float("nan")
            seen.append(next(model.parameters()).detach().clone())
            return losses

    def poisoned(config: TrainConfig) -> object:
        return Poisoned(real(config))

    monkeypatch.setattr(train_mod, "build_algorithm", poisoned)
    with pytest.raises(train_mod.MetaLossError,
                       match=r"meta-gradient of 'layers\.0\.weight'.*meta-iteration 3"):
        train(tiny(), tmp_path / "run", progress=False)
    assert torch.isfinite(seen[-1]).all()
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_paired_difference() -> None:
    from amaml.experiments.comparison import paired_difference

    mean, sem = paired_difference([1.0, 2.0, 4.0], [0.5, 2.0, 3.0])  # diffs .5, 0, 1
    assert math.isclose(mean, 0.5) and math.isclose(sem, 0.5 / math.sqrt(3))
    assert paired_difference([1.0], [1.0, 2.0]) is None
    assert paired_difference(None, [1.0]) is None
    assert paired_difference([float("nan")], [1.0]) is None


def test_compile_flag_reaches_the_adjoint() -> None:
    import importlib

    train_mod = importlib.import_module("amaml.experiments.training")
    assert train_mod.build_algorithm(tiny(compile=True)).adjoint.compile is True
    assert train_mod.build_algorithm(tiny()).adjoint.compile is False
    with pytest.raises(ValueError, match=r"compile \(--compile\) must be a bool"):
        tiny(compile="yes")
    # a speed option, not the maths: a run may be resumed with or without it
    from amaml.experiments.config import RESUME_MUTABLE
    assert "compile" in RESUME_MUTABLE


def test_compile_auto_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast by default: compile where the run pays for it, never where it is not exact."""
    from amaml.experiments.build import resolve_compile

    monkeypatch.setenv("AMAML_CACHE", str(tmp_path / "cache"))
    # A tiny run does not pay for a compilation of tens of seconds.
    choice, why = resolve_compile(tiny())
    assert choice is False and "do not pay" in why
    # A long one does (RK4: four field evaluations a step count towards the break-even),
    # and its compiled code goes to the persistent cache.
    long = tiny(steps=100, solver="rk4", meta_iters=500, meta_batch=5)
    choice, why = resolve_compile(long)
    assert choice is True and "auto" in why and str(tmp_path / "cache") in why
    assert resolve_compile(long.replace(compile=False))[0] is False
    assert resolve_compile(long.replace(method="maml"))[0] is False
    assert resolve_compile(tiny(compile="reduce-overhead"))[0] == "reduce-overhead"
    from amaml.experiments.build import build_algorithm

    assert build_algorithm(long).adjoint.compile is True
