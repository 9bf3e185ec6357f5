"""The benchmark scripts of this change run and agree with unrolled autograd (tiny sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def test_resnet12_memory_bench_runs_and_agrees(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_resnet12_memory.py"),
                    "--device", "cpu", "--scale", "0.0625", "--image", "16", "--N", "2",
                    "--methods", "unrolled", "checkpoint", "--json", str(out)],
                   check=True, env=ENV, timeout=300, capture_output=True)
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["unrolled", "checkpoint"]
    err = float(rows[1]["err"].split()[-1])
    assert err < 1e-4  # float32, two steps


def test_profile_conv4_runs() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_conv4.py"),
                        "--width", "4", "--tasks", "2", "--repeats", "2"],
                       check=True, env=ENV, timeout=300, capture_output=True, text=True)
    assert "tasks folded into channels" in p.stdout and "F+B1+B2" in p.stdout


def test_real_models_bench_runs_predicts_and_agrees(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_real_models.py"),
                    "--models", "resnet18", "--width", "4", "--images", "2", "--N", "2",
                    "--methods", "unrolled", "auto", "--repeats", "1", "--json", str(out)],
                   check=True, env=ENV, timeout=300, capture_output=True)
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["unrolled", "auto"]
    assert all(r["pred_mib"] > 0 and r["mib"] >= 0 for r in rows)
    assert rows[1]["err"] < 1e-4  # float32, two Adam steps
