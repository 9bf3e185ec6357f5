"""benchmarks/plot_peers.py: the peers' harness JSON as a table of ratios and a figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "plot_peers.py"


def _run(rows: dict[str, dict[str, object]], path: Path) -> None:
    path.write_text(json.dumps(rows))


def test_ratios_to_torchopt_and_figure(tmp_path: Path) -> None:
    after = {
        "float32|torchopt|100": {"median": 0.4, "growth": 11 * 2**20, "status": "ok"},
        "float32|amaml-store|100": {"median": 0.3, "growth": 2**20, "status": "ok"},
        "float32|torchopt|1000": {"median": 4.0, "growth": 112 * 2**20, "status": "ok"},
        "float32|amaml-store|1000": {"median": 2.0, "growth": 9 * 2**20, "status": "ok"},
        "float32|amaml-revolve|1000": {"status": "timeout"},  # unfinished rows are skipped
        "float64|amaml-store|1000": {"median": 9.0, "growth": 0, "status": "ok"},
    }
    before = {
        "float32|torchopt|100": {"median": 0.5, "growth": 0, "status": "ok"},
        "float32|amaml-store|100": {"median": 0.6, "growth": 0, "status": "ok"},
    }
    _run(after, tmp_path / "after.json")
    _run(before, tmp_path / "before.json")
    out = tmp_path / "fig" / "peers.png"
    res = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "after.json"), "--before",
                          str(tmp_path / "before.json"), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "| amaml-store | 0.750x (before 1.200x) | 0.500x |" in res.stdout
    assert "| torchopt | 1.000x (before 1.000x) | 1.000x |" in res.stdout
    assert "revolve" not in res.stdout
    assert out.stat().st_size > 10_000


def test_a_run_without_the_reference_is_refused(tmp_path: Path) -> None:
    _run({"float32|amaml-store|100": {"median": 0.3, "growth": 0, "status": "ok"}},
         tmp_path / "run.json")
    res = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "run.json"), "--out",
                          str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "no 'torchopt' rows" in res.stderr
