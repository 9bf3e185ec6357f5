"""Real Omniglot files: the minimal background splits and the data set's 20 one-shot runs.

The files are read from ``<repo>/../shared/data/omniglot/`` or from ``$AMAML_OMNIGLOT_DIR``;
every test here skips, saying so, where they are absent (they are never committed).
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from amaml.experiments.build import build_algorithm, build_model
from amaml.experiments.config import TrainConfig
from amaml.experiments.lake_runs import lake_report, run_errors, wilson_interval
from amaml.tasks import (
    ARCHIVES,
    DataError,
    make_family,
    mhd_predictions,
    modified_hausdorff,
    pixel_nn_predictions,
    read_lake_runs,
    read_minimal,
)
from amaml.tasks.lake_runs import ink_points

DATA_ENV = "AMAML_OMNIGLOT_DIR"
_DEFAULT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "omniglot"
DATA = Path(os.environ.get(DATA_ENV, _DEFAULT))
_FILES = ("all_runs.zip", "images_background_small1.zip", "images_background_small2.zip")

pytestmark = pytest.mark.skipif(
    not all((DATA / f).is_file() for f in _FILES),
    reason=f"real Omniglot not found in {DATA} (needs {', '.join(_FILES)}; set {DATA_ENV} "
           "to the folder holding them)",
)


@pytest.fixture(scope="module")
def runs():  # type: ignore[no-untyped-def]
    return read_lake_runs(DATA)


def _labels_from_zip(run: str) -> dict[int, int]:
    """item -> class (1-based) of one run, parsed here independently of the reader."""
    text = zipfile.ZipFile(DATA / "all_runs.zip").read(f"{run}/class_labels.txt").decode()
    out = {}
    for line in text.split("\n"):
        if line.strip():
            test, train = line.split()
            out[int(re.findall(r"\d+", test)[-1])] = int(re.findall(r"\d+", train)[-1])
    return out


def test_runs_reader(runs) -> None:  # type: ignore[no-untyped-def]
    assert [r.name for r in runs] == [f"run{i:02d}" for i in range(1, 21)]
    for r in runs:
        assert r.training.shape == r.test.shape == (20, 1, 105, 105)
        assert r.training.dtype == np.uint8
        # black ink on white: most pixels are paper (255), some ink (0)
        assert (r.training == 255).mean() > 0.8 and (r.test == 0).any()
        pairs = _labels_from_zip(r.name)
        assert [r.labels[i - 1] + 1 for i in sorted(pairs)] == [pairs[i] for i in sorted(pairs)]
        # every class image has exactly one test item in every run
        assert sorted(r.labels.tolist()) == list(range(20))
        xs, xq = r.support(), r.query()
        assert xs.shape == xq.shape == (20, 1, 28, 28) and xs.dtype == np.float32
        # inverted as the background images are: ink 1, paper 0
        assert 0 <= xs.min() and xs.max() <= 1 and xs.mean() < 0.3


def test_runs_match_a_background_image_pipeline(runs) -> None:  # type: ignore[no-untyped-def]
    # A run image and a background image go through the same resize and inversion.
    fam = make_family("omniglot-small1", shots=1, queries=1, ways=5, n_test=1, root=DATA)
    xs = fam.test.batch([0])[0]
    assert xs.max() == pytest.approx(1.0, abs=0.05) and xs.min() >= 0
    assert abs(float(xs.mean()) - float(runs[0].support().mean())) < 0.1


def _mhd_brute(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.spatial.distance import cdist  # all pairs, as the data set's demo does

    d = cdist(a, b)
    return max(d.min(1).mean(), d.min(0).mean())


def test_modified_hausdorff_one_run(runs) -> None:  # type: ignore[no-untyped-def]
    run = runs[0]
    pred = mhd_predictions(run)
    # An independent brute-force reimplementation (all pairwise distances, no tree) gives
    # the same decisions (on 6 test images, to keep the test short).
    train = [ink_points(x) for x in run.training]
    cost = np.array([[_mhd_brute(ink_points(q), t) for t in train] for q in run.test[:6]])
    assert np.array_equal(pred[:6], cost.argmin(1))
    error = float((pred != run.labels).mean())
    assert error == pytest.approx(0.45)  # 9 of run01's 20 test images
    # Properties: zero on itself, symmetric, blind to translation (points are centred).
    a, b = ink_points(run.test[0]), ink_points(run.training[0])
    assert modified_hausdorff(a, a) == 0
    assert modified_hausdorff(a, b) == pytest.approx(modified_hausdorff(b, a))
    shifted = np.roll(run.test[0], (3, -4), axis=(-2, -1))  # paper wraps in: still ink-free
    assert modified_hausdorff(ink_points(shifted), a) == pytest.approx(0, abs=1e-9)


def test_pixel_nn_is_far_worse_than_mhd_but_above_chance(runs) -> None:  # type: ignore[no-untyped-def]
    errors = [float((pixel_nn_predictions(r) != r.labels).mean()) for r in runs[:4]]
    assert 0.3 < np.mean(errors) < 0.95  # chance is 0.95


def test_minimal_families() -> None:
    expect = {"omniglot-small1": (["Latin"], 440, 104),
              "omniglot-small2": (["Tagalog"], 556, 68),
              "omniglot-minimal": (["Sanskrit", "Tagalog"], 732, 236)}
    for name, (held_out, n_train, n_test) in expect.items():
        fam = make_family(name, shots=1, queries=2, ways=20, n_test=2, root=DATA)
        assert fam.info["alphabets_test"] == held_out
        assert (fam.info["classes_train"], fam.info["classes_test"]) == (n_train, n_test)
        xs, ys, xq, yq = fam.test.batch([0, 1])
        assert xs.shape == (2, 20, 1, 28, 28) and xq.shape == (2, 40, 1, 28, 28)
        assert float(xs.mean()) < 0.3 and float(xs.max()) > 0.9  # ink is 1
    # Greek and Latin are in both archives: read once in the union.
    chars = read_minimal(DATA, ("images_background_small1", "images_background_small2"))
    assert len(chars) == 242


def test_minimal_reads_extracted_folders_as_zips(tmp_path: Path) -> None:
    with zipfile.ZipFile(DATA / "images_background_small1.zip") as zf:
        zf.extractall(tmp_path)
    tops = ("images_background_small1",)
    from_folder = read_minimal(tmp_path, tops)
    assert from_folder == read_minimal(DATA, tops)
    a = make_family("omniglot-small1", shots=1, queries=1, ways=5, n_test=1, root=tmp_path)
    b = make_family("omniglot-small1", shots=1, queries=1, ways=5, n_test=1, root=DATA)
    for x, y in zip(a.test.batch([0]), b.test.batch([0]), strict=True):
        assert torch.equal(x, y)


def test_missing_archive_names_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--download"):
        make_family("omniglot-minimal", shots=1, queries=1, ways=5, root=tmp_path)
    with pytest.raises(DataError, match="--download"):
        read_lake_runs(tmp_path)


def test_pinned_checksums_match_the_files() -> None:
    for name, file in (("omniglot-runs", "all_runs.zip"),
                       ("omniglot-small1", "images_background_small1.zip"),
                       ("omniglot-small2", "images_background_small2.zip")):
        (archive,) = ARCHIVES[name]
        assert archive.filename == file
        assert hashlib.sha256((DATA / file).read_bytes()).hexdigest() == archive.sha256
    assert ARCHIVES["omniglot-minimal"] == ARCHIVES["omniglot-small1"] + ARCHIVES["omniglot-small2"]


def test_wilson_interval_against_scipy() -> None:
    from scipy.stats import binomtest

    for k in (0, 9, 155, 400):
        ci = binomtest(k, 400).proportion_ci(confidence_level=0.95, method="wilson")
        lo, hi = wilson_interval(k, 400)
        # scipy uses the exact normal quantile, this 1.96
        assert lo == pytest.approx(ci.low, abs=1e-4) and hi == pytest.approx(ci.high, abs=1e-4)
    with pytest.raises(ValueError, match="errors <= n"):
        wilson_interval(401, 400)


def _tiny_config(**changes) -> TrainConfig:  # type: ignore[no-untyped-def]
    base = dict(family="omniglot-minimal", method="maml", ways=20, shots=1, queries=1,
                model="conv4", conv_width=4, steps=1, maml_steps=1, inner_lr=0.1,
                data_dir=str(DATA), dtype="float32")
    return TrainConfig(**{**base, **changes})


def test_lake_report_rows(runs) -> None:  # type: ignore[no-untyped-def]
    config = _tiny_config()
    model = build_model(config, (1, 28, 28))
    report = lake_report(config, model, runs[:2], eval_steps=(1,), episodes=2,
                         baselines=False)
    rows = report["rows"]
    assert [r["row"] for r in rows] == ["meta-learned", "no-meta"]
    # the model is the config's own random initialisation: the two rows coincide
    assert rows[0]["runs_error_per_run"] == rows[1]["runs_error_per_run"]
    assert rows[0]["runs_n"] == 40 and len(rows[0]["episodes_5way"]) == 2
    lo, hi = rows[0]["runs_wilson95"]
    assert lo <= rows[0]["runs_error"] <= hi


def test_run_errors_refuses_other_ways(runs) -> None:  # type: ignore[no-untyped-def]
    config = _tiny_config(ways=5)
    model = build_model(config, (1, 28, 28))
    with pytest.raises(ValueError, match="--ways 20"):
        run_errors(model, build_algorithm(config), config, runs[:1], 1)


@pytest.mark.slow
def test_cli_lake_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from amaml.cli import main

    out = tmp_path / "run"
    common = ["--family", "omniglot-minimal", "--data-dir", str(DATA), "--shots", "1",
              "--queries", "1", "--model", "conv4", "--conv-width", "4", "--steps", "1",
              "--maml-steps", "1", "--meta-batch", "1", "--n-test", "1",
              "--finetune-epochs", "0", "--dtype", "float32", "--no-progress"]
    assert main(["train", *common, "--ways", "20", "--method", "maml", "--meta-iters", "1",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["lake-runs", "--checkpoint", str(out / "init.pt"), "--eval-steps", "1,2",
                 "--no-baselines", "--output", str(tmp_path / "lake.json")]) == 0
    text = capsys.readouterr().out
    assert text.count("| meta-learned | maml |") == 2 and "| no-meta | maml | 2 |" in text
    assert "deep ConvNet (background: small1 / small2): 24.0 / 22.3 %" in text
    assert (tmp_path / "lake.json").is_file()
    # a 5-way run cannot take the 20-way runs: one line, status 2
    five = tmp_path / "five"
    assert main(["train", *common, "--ways", "5", "--method", "maml", "--meta-iters", "1",
                 "--out", str(five)]) == 0
    assert main(["lake-runs", "--checkpoint", str(five / "init.pt"), "--no-baselines"]) == 2
    assert "--ways 20" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_omniglot_memory_runs(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "mem.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "bench_omniglot_memory.py"),
                    "--data-dir", str(DATA), "--steps", "1", "2", "3", "--conv-width", "4",
                    "--meta-batch", "1", "--repeats", "1", "--max-mb", "1e-9",
                    "--out", str(out)], check=True, timeout=300, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["n_steps"]) for r in rows] == [
        (m, n) for m in ("amaml", "maml") for n in (1, 2, 3)]
    assert rows[2]["peak_mib"] is None and rows[0]["peak_mib"] > 0  # N=3 over the budget
