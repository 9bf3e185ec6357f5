"""Few-shot classification through the experiments layer and the CLI: glyphs with a
narrow Conv-4, accuracy with its 95% confidence interval, compare with the no-meta row,
and the one-line errors of bad --model / --ways.

Kept fast: 5-way 1-shot, 2 queries per class, 4 meta-test episodes, 2 inner steps,
Conv-4 width 4 (a few seconds per run on one CPU thread).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from amaml.cli import main
from amaml.experiments import TrainConfig
from amaml.experiments.build import build_family, build_model, config_loss
from amaml.experiments.evaluate import ACCURACY, ci95, evaluate_adaptation

TINY = ["--family", "glyphs", "--ways", "5", "--shots", "1", "--queries", "2",
        "--model", "conv4", "--conv-width", "4", "--steps", "2", "--meta-iters", "2",
        "--meta-batch", "2", "--n-test", "4", "--inner-lr", "0.4", "--finetune-epochs", "2",
        "--finetune-every", "1", "--no-progress"]


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("amaml: error: "), err
    return err


def test_config_resolves_the_kind_defaults() -> None:
    cls = TrainConfig(family="glyphs")
    assert (cls.model, cls.loss, cls.ways, cls.kind) == ("conv4", "cross-entropy", 5,
                                                           "classification")
    assert (cls.finetune_epochs, cls.finetune_every) == (10, 2)
    reg = TrainConfig()
    assert (reg.model, reg.loss, reg.ways, reg.kind) == ("mlp", "mse", None, "regression")
    assert (reg.finetune_epochs, reg.finetune_every) == (200, 10)
    # A config saved before these fields existed reads as it was run.
    old = {k: v for k, v in reg.to_dict().items()
           if k not in ("model", "ways", "conv_width", "loss")}
    assert TrainConfig.from_dict(old) == reg


@pytest.mark.parametrize("changes,match", [
    ({"family": "glyphs", "model": "mlp"}, r"--model mlp is a regression network.*--model conv4"),
    ({"model": "conv4"}, r"--model conv4 is a classification network.*--model mlp"),
    ({"family": "glyphs", "ways": 1}, r"ways \(--ways\) must be >= 2"),
    ({"ways": 5}, r"--ways\) is for classification families"),
    ({"family": "glyphs", "loss": "mse"}, r"--loss mse does not apply.*cross-entropy"),
    ({"loss": "cross-entropy"}, r"--loss cross-entropy does not apply"),
    ({"family": "glyphs", "conv_width": 0}, r"conv_width \(--conv-width\)"),
])
def test_config_refuses_what_does_not_fit_the_kind(changes: dict[str, object],
                                                   match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**changes)  # type: ignore[arg-type]


def test_accuracy_and_ci95_on_fixed_episodes() -> None:
    config = TrainConfig(family="glyphs", shots=1, queries=2, n_test=4, conv_width=4, steps=2,
                         inner_lr=0.4)
    family = build_family(config)
    model = build_model(config, family.input_shape)
    from amaml.experiments.build import build_algorithm

    result = evaluate_adaptation(model, build_algorithm(config), config_loss(config),
                                 family.test)
    per_task = result["accuracy_per_task"]
    assert result["metric"] == "accuracy" and len(per_task) == 4
    # 10 queries per episode: every accuracy is a multiple of 1/10.
    assert all(abs(10 * a - round(10 * a)) < 1e-9 for a in per_task)
    t = torch.tensor(per_task, dtype=torch.float64)
    assert result["accuracy_mean"] == pytest.approx(float(t.mean()))
    # The field's convention: 1.96 * std (ddof=1) / sqrt(n).
    assert result["accuracy_ci95"] == pytest.approx(1.96 * float(t.std()) / math.sqrt(4))
    assert ci95([0.5]) == (0.5, 0.0)
    assert ACCURACY.best([0.2, float("nan"), 0.6, None]) == 0.6
    # Running statistics are left alone (BatchNorm uses each batch's own statistics).
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 0


def test_train_writes_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--method", "amaml", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "meta-test accuracy" in printed and "no-meta" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["metric"] == "accuracy" and m["kind"] == "classification" and m["ways"] == 5
    assert 0.0 <= m["accuracy_mean"] <= 1.0 and m["accuracy_ci95"] >= 0.0
    assert len(m["accuracy_per_task"]) == 4 and "nrmse_mean" not in m
    assert m["finetune"]["epochs"] == [0, 1, 2] and len(m["finetune"]["accuracy_mean"]) == 3
    assert set(m["references"]) == {"no-meta"}  # no oracle for classification
    assert (out / "finetune.png").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model"], cfg["loss"], cfg["ways"]) == ("conv4", "cross-entropy", 5)
    # The saved initialisation evaluates again to the same accuracy.
    assert main(["eval", "--checkpoint", str(out / "init.pt"), "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["accuracy_mean"] == pytest.approx(m["accuracy_mean"])
    # A finished run resumes to its saved metrics (its Conv-4 rebuilt from the checkpoint).
    assert main(["train", *TINY, "--method", "amaml", "--out", str(out), "--resume"]) == 0


def test_compare_and_summarize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--methods", "amaml,maml", "--out", str(out)]) == 0
    records = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in records] == ["amaml", "maml", "no-meta"]
    for r in records:
        assert r["metric"] == "accuracy" and 0.0 <= r["accuracy_mean"] <= 1.0
        assert r["accuracy_ci95"] >= 0.0 and len(r["accuracy_per_task"]) == 4
    table = (out / "results.md").read_text()
    assert "5-way 1-shot" in table and "accuracy (%)" in table and "95% confidence" in table
    capsys.readouterr()
    assert main(["summarize", str(out), "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert "accuracy (%)" in summary and "highest in" in summary


def test_sweep_steps_reports_accuracy(tmp_path: Path) -> None:
    from amaml.experiments.sweep import sweep_steps

    config = TrainConfig(family="glyphs", shots=1, queries=2, n_test=4, conv_width=4,
                         meta_iters=1, meta_batch=2, inner_lr=0.4, finetune_epochs=0)
    result = sweep_steps(config, "amaml", "1,2", tmp_path / "sweep", progress=False)
    assert result["metric"] == "accuracy"
    rows = [e for e in result["summary"] if e["method"] == "amaml"]
    assert all(e["accuracy_mean"] is not None and e["accuracy_ci95"] is not None for e in rows)
    assert "accuracy" in (tmp_path / "sweep" / "sweep.md").read_text()


def test_cli_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert "--ways" in _error(["train", *TINY, "--ways", "1"], capsys)
    assert "--model conv4" in _error(["train", *TINY, "--model", "mlp"], capsys)
    # More ways than the 1,600 meta-test classes of glyphs (the tasks layer refuses).
    err = _error(["train", *TINY, "--ways", "1601", "--out", str(tmp_path / "w")], capsys)
    assert "--ways" in err and "1600" in err
    assert not (tmp_path / "w" / "config.json").exists()
    assert "--ways" in _error(["train", "--family", "cosmixture", "--ways", "5"], capsys)
