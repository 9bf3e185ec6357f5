"""``amaml summarize``: several seeds of one comparison, aggregated."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from amaml.cli import main
from amaml.experiments.summary import format_summary, summarize_seeds

# Per-task nRMSE of each method in each seed (three meta-test tasks).
PER_TASK = {
    3: {"amaml": [0.50, 0.70, 0.90], "maml": [0.52, 0.71, 0.93], "reptile": [0.60, 0.80, 1.0]},
    7: {"amaml": [0.40, 0.60, 0.80], "maml": [0.39, 0.58, 0.80], "reptile": [0.50, 0.70, 0.9]},
    11: {"amaml": [0.45, 0.65, 0.85], "maml": [0.47, 0.66, 0.84], "reptile": [0.55, 0.75, 0.9]},
}


def _fake_compare(root: Path, seed: int, per_task: dict[str, list[float]],
                  **overrides: Any) -> Path:
    d = root / f"cmp-{seed}"
    records = []
    for method, values in per_task.items():
        cfg = {"family": "cosmixture", "method": method, "shots": 50, "queries": 50,
               "steps": 50, "inner_lr": 0.01, "meta_iters": 200,
               "meta_batch": 5, "meta_lr": 0.001, "seed": seed, "solver": "euler",
               "memory": "store", "proximal": 0.0, "hidden": [32, 32], "n_test": 3,
               "dtype": "float32", **overrides}
        (d / method).mkdir(parents=True)
        (d / method / "config.json").write_text(json.dumps(cfg))
        steps = 5 if method == "maml" else 50  # MAML runs steps / 10, as compare records it
        records.append({"method": method, "steps": steps, "eval_steps": steps,
                        "nrmse_mean": sum(values) / len(values),
                        "nrmse_sem": 0.1, "nrmse_per_task": values})
    (d / "results.json").write_text(json.dumps(records))
    return d


def test_summary_values_against_hand_computation(tmp_path: Path) -> None:
    dirs = [_fake_compare(tmp_path, s, PER_TASK[s]) for s in (11, 3, 7)]  # any order
    summary = summarize_seeds(dirs)
    assert summary["seeds"] == [3, 7, 11] and summary["reference"] == "amaml"
    by = {e["method"]: e for e in summary["methods"]}
    for m in ("amaml", "maml", "reptile"):
        means = [statistics.fmean(PER_TASK[s][m]) for s in (3, 7, 11)]
        assert by[m]["nrmse_per_seed"] == pytest.approx(means, abs=1e-15)
        assert by[m]["nrmse_mean"] == pytest.approx(statistics.fmean(means), abs=1e-15)
        assert by[m]["nrmse_sem"] == pytest.approx(statistics.stdev(means) / math.sqrt(3),
                                                   abs=1e-15)
    for m in ("maml", "reptile"):
        diffs = [statistics.fmean(a - b for a, b in zip(PER_TASK[s][m], PER_TASK[s]["amaml"]))
                 for s in (3, 7, 11)]
        assert by[m]["diff_per_seed"] == pytest.approx(diffs, abs=1e-15)
        assert by[m]["diff_mean"] == pytest.approx(statistics.fmean(diffs), abs=1e-15)
        assert by[m]["diff_sem"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(3),
                                                  abs=1e-15)
    assert by["amaml"]["diff_per_seed"] is None and by["amaml"]["diff_mean"] is None
    # seed 3: amaml lowest (0.70 < 0.72); seed 7: maml (0.59 < 0.60); seed 11: amaml.
    assert (by["amaml"]["lowest_in"], by["maml"]["lowest_in"], by["reptile"]["lowest_in"]) \
        == (2, 1, 0)
    table = format_summary(summary)
    assert "| maml | 5 / 5 | 0.7200 / 0.5900 / 0.6567 |" in table
    assert "2 of 3" in table and "seeds 3 / 7 / 11" in table


def test_summary_reference_and_single_seed(tmp_path: Path) -> None:
    d = _fake_compare(tmp_path, 3, PER_TASK[3])
    summary = summarize_seeds([d], reference="maml")
    by = {e["method"]: e for e in summary["methods"]}
    assert by["maml"]["diff_per_seed"] is None
    assert by["amaml"]["diff_mean"] == pytest.approx(-0.02, abs=1e-12)
    assert by["amaml"]["diff_sem"] is None and by["amaml"]["nrmse_sem"] is None  # one seed
    assert "| amaml | 50 / 50 | 0.7000 | **0.7000** | -0.0200 | -0.0200 | 1 of 1 |" in \
        format_summary(summary)


def test_diverged_method_has_no_mean(tmp_path: Path) -> None:
    runs = {s: {m: list(v) for m, v in PER_TASK[s].items()} for s in (3, 7)}
    runs[7]["reptile"] = [0.5, float("nan"), 0.9]
    dirs = [_fake_compare(tmp_path, s, runs[s]) for s in (3, 7)]
    by = {e["method"]: e for e in summarize_seeds(dirs)["methods"]}
    assert by["reptile"]["nrmse_per_seed"][1] is None and by["reptile"]["nrmse_mean"] is None
    assert by["reptile"]["diff_per_seed"][1] is None and by["reptile"]["diff_mean"] is None
    assert by["maml"]["nrmse_mean"] is not None


@pytest.mark.parametrize("make,match", [
    (lambda p: [_fake_compare(p, 3, PER_TASK[3]), _fake_compare(p, 7, PER_TASK[7],
                                                               inner_lr=0.1)],
     "differ in inner_lr"),
    (lambda p: [_fake_compare(p, 3, PER_TASK[3]),
                _fake_compare(p, 7, {"amaml": PER_TASK[7]["amaml"]})], "same methods"),
    (lambda p: [_fake_compare(p, 3, PER_TASK[3]), p / "nothing"], "not a directory"),
    (lambda p: [(p / "empty").mkdir() or p / "empty"], "results.json"),
])
def test_summary_refuses_mismatched_input(tmp_path: Path, make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        summarize_seeds(make(tmp_path))


def test_summary_refuses_same_seed_twice_and_bad_json(tmp_path: Path) -> None:
    a = _fake_compare(tmp_path / "a", 3, PER_TASK[3])
    b = _fake_compare(tmp_path / "b", 3, PER_TASK[3])
    with pytest.raises(ValueError, match="both have seed 3"):
        summarize_seeds([a, b])
    (b / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        summarize_seeds([b])
    with pytest.raises(ValueError, match="--reference 'sgd'"):
        summarize_seeds([a], reference="sgd")


def test_compare_seeds_then_summarize(tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    tiny = ["--family", "cosmixture", "--shots", "5", "--queries", "5", "--steps", "3",
            "--meta-iters", "2", "--meta-batch", "2", "--n-train", "6", "--n-test", "4",
            "--finetune-epochs", "1", "--hidden", "8", "--no-progress",
            "--methods", "amaml,maml1"]
    out = tmp_path / "cmp"
    assert main(["compare", *tiny, "--seeds", "1,0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| maml1 |" in printed and "2 seeds" in printed
    dirs = [out / "seed0", out / "seed1"]
    for s, d in zip((0, 1), dirs):
        config = json.loads((d / "amaml" / "config.json").read_text())
        assert config["seed"] == s
    saved = json.loads((out / "summary.json").read_text())
    assert saved["seeds"] == [0, 1]
    for s, d in zip((0, 1), dirs):
        records = {r["method"]: r for r in json.loads((d / "results.json").read_text())}
        by = {e["method"]: e for e in saved["methods"]}
        assert by["maml1"]["nrmse_per_seed"][s] == pytest.approx(
            records["maml1"]["nrmse_mean"], rel=1e-12)
    assert (out / "summary.md").read_text() in printed
    assert (out / "seeds.png").stat().st_size > 0
    # summarize on the same directories gives the same table.
    assert main(["summarize", *map(str, dirs), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "summary.md").read_text() == (out / "summary.md").read_text()
    capsys.readouterr()
    # Running it again without --resume is refused before anything is trained.
    assert main(["compare", *tiny, "--seeds", "0,1", "--out", str(out)]) == 2
    assert "already hold" in capsys.readouterr().err
    # --resume skips the finished runs and rewrites the same summary.
    assert main(["compare", *tiny, "--seeds", "0,1", "--out", str(out), "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["methods"] == saved["methods"]
    # A missing directory: one line, exit status 2, nothing written.
    capsys.readouterr()
    assert main(["summarize", str(dirs[0]), str(tmp_path / "missing"), "--out",
                 str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a directory" in err[0]
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("extra,match", [
    (["--seeds", "0,x"], "comma-separated integers"),
    (["--seeds", "2,2"], "repeats"),
    (["--seeds", ","], "empty"),
    (["--seeds", "0,1", "--seed", "3"], "either --seed or --seeds"),
])
def test_compare_bad_seeds(tmp_path: Path, extra: list[str], match: str,
                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--no-progress", *extra, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not (tmp_path / "o").exists()


def test_compare_seeds_interrupt_names_the_whole_command(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from amaml.experiments import TrainingInterrupted
    from amaml.experiments.config import TrainConfig

    compare_module = importlib.import_module("amaml.experiments.comparison")

    def interrupted(config: TrainConfig, methods: Any, out: Path, **kw: Any) -> None:
        raise TrainingInterrupted(Path(out) / "amaml", 7, "SIGTERM")

    monkeypatch.setattr(compare_module, "compare", interrupted)
    with pytest.raises(TrainingInterrupted, match=r"--seeds 0,1 --out .*cmp --resume") as exc:
        compare_module.compare_seeds(TrainConfig(), ["amaml"], "0,1", tmp_path / "cmp",
                                     progress=False)
    assert exc.value.iteration == 7 and exc.value.signal_name == "SIGTERM"
