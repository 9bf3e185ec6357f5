"""The long-horizon examples (dataset distillation, learned schedules) on the sklearn digits.

Their --quick modes run end to end and write results.json; the meta-gradients they use
from amaml equal back-propagation through the inner loop written out in the example
(float64, 1e-10).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import dataset_distillation as dd  # noqa: E402
import digits_common as dc  # noqa: E402
import learned_schedule as ls  # noqa: E402

import amaml  # noqa: E402


def _run(script: str, out: Path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--quick", "--no-progress",
                           "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_dataset_distillation_quick(tmp_path: Path, model: str) -> None:
    res = _run("dataset_distillation.py", tmp_path, "--model", model)
    for key in ("distilled_accuracy", "random_real_accuracy", "full_data_accuracy"):
        assert 0.0 <= res[key] <= 1.0, key
    assert set(res["methods"]) == {"amaml", "unrolled", "truncated"}
    for m in res["methods"].values():
        ci = m["test_accuracy"]
        assert 0.0 <= ci["mean"] <= 1.0 and math.isfinite(ci["ci95"])
        assert len(m["images"]) == 10 and min(min(r) for r in m["images"]) >= 0.0
    assert (tmp_path / "distilled_images.png").stat().st_size > 0
    assert (tmp_path / "accuracy_vs_steps.png").stat().st_size > 0
    if model == "mlp":  # the modes that read finished runs
        rows = dd.main(["--cross-eval", "2,3", "--eval-nets", "2", "--plot-from", str(tmp_path),
                        "--out", str(tmp_path / "ce")])["rows"]
        assert len(rows) == 3 and set(rows[0]["test_accuracy_at"]) == {"2", "3"}
        dd.main(["--plot-only", "--plot-from", str(tmp_path), "--out", str(tmp_path / "plot")])
        assert (tmp_path / "plot" / "accuracy_vs_steps.png").exists()


def test_learned_schedule_quick(tmp_path: Path) -> None:
    res = _run("learned_schedule.py", tmp_path)
    assert set(res["methods"]) == {"exact", "truncated"}
    for r in [res["best_constant"], *res["methods"].values()]:
        assert 0.0 <= r["test_accuracy"]["mean"] <= 1.0
        assert math.isfinite(r["test_loss"]["mean"])
    sched = res["methods"]["exact"]["schedule"]
    assert len(sched) == 4 and all(len(s) == res["steps"] for s in sched.values())
    assert (tmp_path / "schedule.png").stat().st_size > 0


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("model_kind,opt", [("mlp", "sgd"), ("mlp", "adam"), ("cnn", "sgd")])
def test_image_gradient_exact(float64: None, model_kind: str, opt: str) -> None:
    """amaml (revolve) = unrolled autograd for the images and the inner rate; truncated to
    all N steps is unrolled, truncated to fewer is not."""
    xtr, ytr, _, _ = dc.load_digits_split(0, torch.float64)
    model = dc.reinit_(dc.make_model(model_kind).double(), 3)
    inner = dc.InnerOpt(opt)
    xs = torch.rand(20, 64, generator=torch.Generator().manual_seed(1))
    ys = torch.arange(10).repeat_interleave(2)
    lr = torch.tensor(0.1 if opt == "sgd" else 0.01)
    steps, q = 12, (xtr[:64], ytr[:64])
    exact = dd.image_gradient("amaml", model, xs, ys, lr, steps, inner, *q)
    unrolled = dd.image_gradient("unrolled", model, xs, ys, lr, steps, inner, *q)
    for a, b in zip(exact, unrolled):
        assert _rel(a, b) < 1e-10
    full = dd.image_gradient("truncated", model, xs, ys, lr, steps, inner, *q, truncate=steps)
    short = dd.image_gradient("truncated", model, xs, ys, lr, steps, inner, *q, truncate=3)
    assert _rel(full[0], unrolled[0]) < 1e-12
    assert _rel(short[0], unrolled[0]) > 1e-3


def test_schedule_hypergradient_exact(float64: None) -> None:
    """Per-step per-layer rates and per-layer weight decay: amaml = unrolled autograd."""
    xtr, ytr, _, _ = dc.load_digits_split(0, torch.float64)
    log_wd = torch.tensor([-5.0, -6.0], requires_grad=True)
    model = ls.Regularised(dc.make_model("mlp").double(), log_wd)
    dc.reinit_(model, 1)
    steps = 15
    gen = torch.Generator().manual_seed(0)
    log_lr = {n: (math.log(0.05) + 0.1 * torch.randn(steps, generator=gen)).requires_grad_()
              for n, _ in model.named_parameters()}
    support = amaml.MiniBatches(xtr[:500], ytr[:500], batch_size=100, seed=3)
    exact = ls.hypergradient("exact", model, support, steps, log_lr, xtr[500:], ytr[500:])
    unrolled = ls.hypergradient("unrolled", model, support, steps, log_lr, xtr[500:], ytr[500:])
    assert len(exact) == 5
    for a, b in zip(exact, unrolled):
        assert _rel(a, b) < 1e-10
    trunc = ls.hypergradient("truncated", model, support, steps, log_lr, xtr[500:], ytr[500:],
                             truncate=5)
    assert float(trunc[0][: steps - 5].abs().max()) == 0.0  # no gradient before the window
