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
    if model == "cnn":  # the recipe's defaults are recorded
        assert res["cnn"] == {"width": 32, "norm": "instance", "logit_scale": 0.1, "depth": 2}
        assert res["clip"] == 1.0 and res["lr_init"] == 0.3 and res["meta_lr"] == 0.1
        for m in res["methods"].values():
            assert len(m["meta_grad_norm_history"]) == res["meta_iters"]
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


def test_convnet_recipe() -> None:
    """Normalisation before each ReLU, average pooling, logits scaled; depth from the side."""
    net = dc.make_model("cnn", side=28, n_classes=20, width=4, norm="batch", logit_scale=0.5)
    kinds = [type(m).__name__ for m in net.features]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "AvgPool2d"] * 3
    assert not net.features[1].track_running_stats  # batch statistics, always
    x = torch.rand(5, 784)
    unscaled = net.head(net.features(x.reshape(-1, 1, 28, 28)).flatten(1))
    assert torch.allclose(net(x), 0.5 * unscaled)
    gn = dc.make_model("cnn", width=4).features[1]
    assert isinstance(gn, torch.nn.GroupNorm) and gn.num_groups == gn.num_channels == 4
    with pytest.raises(ValueError, match="norm must be one of"):
        dc.make_model("cnn", norm="layer")


def test_omniglot_quick(tmp_path: Path) -> None:
    """Omniglot from the minimal background zip (4-way here): 15 drawers train, 5 test."""
    import omniglot_small

    root = omniglot_small.default_root()
    if not (root / omniglot_small.ZIP_NAME).is_file():
        pytest.skip(f"no {omniglot_small.ZIP_NAME} under {root}")
    xtr, ytr, xte, yte = omniglot_small.load_omniglot_split(root, n_way=4)  # 80 PNGs
    assert xtr.shape == (60, 784) and xte.shape == (20, 784)
    assert ytr.bincount().tolist() == [15] * 4 and yte.bincount().tolist() == [5] * 4
    assert ytr[:12].tolist() == [0, 1, 2, 3] * 3  # drawer-major: a leading fifth has all
    assert 0.0 <= float(xtr.min()) and float(xtr.max()) <= 1.0
    assert float(xtr.mean()) < 0.3  # strokes are 1 on a background of 0
    res = dd.main(["--quick", "--no-progress", "--dataset", "omniglot", "--model", "cnn",
                   "--n-way", "4", "--width", "4", "--methods", "amaml", "--out", str(tmp_path)])
    assert res["dataset"] == "omniglot" and len(res["methods"]["amaml"]["images"]) == 4
    assert 0.0 <= res["distilled_accuracy"] <= 1.0
    missing = dd.main(["--quick", "--dataset", "omniglot", "--omniglot-root",
                       str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")])
    assert "not found" in missing["skipped"]


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


@pytest.mark.parametrize("model_kind,opt,norm", [
    ("mlp", "sgd", None), ("mlp", "adam", None), ("small-cnn", "sgd", None),
    ("cnn", "sgd", "instance"), ("cnn", "sgd", "batch"), ("cnn", "adam", "instance")])
def test_image_gradient_exact(float64: None, model_kind: str, opt: str, norm: str | None
                              ) -> None:
    """amaml (revolve) = unrolled autograd for the images and the inner rate; truncated to
    all N steps is unrolled, truncated to fewer is not."""
    xtr, ytr, _, _ = dc.load_digits_split(0, torch.float64)
    kw = {"width": 6, "norm": norm} if norm else {}  # narrow: seconds, not minutes
    model = dc.reinit_(dc.make_model(model_kind, **kw).double(), 3)
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
