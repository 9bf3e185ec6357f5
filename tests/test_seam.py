"""The seam, traced at run time (``scripts/trace_seam.py``): one Adam step under checkpoint
goes from the memory strategy to the flow's loop, to its kernel, and back; nothing else of
the plumbing is entered (the step map's, the loss's and the model's own code aside)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "trace_seam.py"


@pytest.mark.parametrize("kind", ["fused", "autograd"])
def test_one_adam_step_goes_from_the_loop_to_its_kernel_and_back(kind: str) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), kind], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    seam = {line.split(" (seam)")[0].split(" ", 1)[1]: line.split(": ", 1)[1]
            for line in out.splitlines() if "(seam)" in line}
    kernel = f"flow/kernels/{kind}.py"
    assert seam["one step VJP"].endswith(f"files: flow/loop.py -> {kernel} -> flow/loop.py")
    forward = seam["forward to the first update"]
    assert forward.endswith(f"-> flow/loop.py -> {kernel}")
    assert set(forward.split("files: ")[1].split(" -> ")) == {"flow/memory.py", "flow/loop.py",
                                                              kernel}
    assert int(forward.split(" returns")[0].split(", ")[-1]) <= 2
