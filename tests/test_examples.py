"""The scripts in examples/ run end to end (their --quick mode) and print finite results."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script,pattern", [
    ("meta_sgd_sinusoid.py", r"meta-test MSE .*: ([0-9.]+) from the initial network, "
                             r"([0-9.]+) meta-learned"),
    ("few_shot_classification.py", r"meta-test accuracy .*: ([0-9.]+) from the initial "
                                   r"network, ([0-9.]+) meta-learned"),
])
def test_example_runs(script: str, pattern: str) -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    match = re.search(pattern, proc.stdout)
    assert match, proc.stdout
    before, after = (float(g) for g in match.groups())
    assert math.isfinite(before) and math.isfinite(after)
    assert after != before  # meta-training changed the initialisation
