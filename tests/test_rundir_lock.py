"""A run directory belongs to one process: ``DIR/.lock``, held with ``flock``.

A second ``amaml train`` (or ``compare``) on the same ``--out`` is refused, naming the
holder's pid, and leaves the first run's files alone; a lock left by a killed process
is stale and ``--resume`` takes over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amaml.cli import main
from amaml.experiments import RunDirError, RunDirLock, TrainConfig, compare, train

ARGS = ["--family", "cosmixture", "--shots", "5", "--queries", "5", "--steps", "10",
        "--meta-batch", "2", "--n-train", "6", "--n-test", "3", "--finetune-epochs", "2",
        "--hidden", "8", "--save-every", "2", "--seed", "3", "--no-progress"]


def _start(out: Path, meta_iters: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "amaml", "train", *ARGS, "--meta-iters",
                             str(meta_iters), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for(proc: subprocess.Popen[str], ready: object, what: str) -> None:
    deadline = time.monotonic() + 60
    while not ready():  # type: ignore[operator]
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {what} within 60 s"
        time.sleep(0.01)


def _holder(out: Path) -> dict[str, object]:
    try:
        return json.loads((out / ".lock").read_text() or "{}")
    except (OSError, ValueError):
        return {}


def test_second_run_on_the_same_out_is_refused(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    first = _start(out, 150)  # several seconds: the second process starts meanwhile
    _wait_for(first, lambda: _holder(out).get("pid") == first.pid, "lock")
    second = subprocess.run([sys.executable, "-m", "amaml", "train", *ARGS, "--meta-iters",
                             "2", "--out", str(out)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert second.returncode == 2
    assert second.stderr.startswith("amaml: error: ") and second.stderr.count("\n") == 1
    assert f"pid {first.pid}" in second.stderr and "in use" in second.stderr
    # --resume is refused the same way while the run lasts.
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 2
    assert f"pid {first.pid}" in capsys.readouterr().err
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["meta_iters"] == 150 and len(metrics["meta_loss"]["values"]) == 150
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 151))
    assert not (out / ".lock").exists()  # released with the run


def test_stale_lock_of_a_killed_run_is_taken_over_by_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(out, 60)
    _wait_for(proc, lambda: (out / "checkpoint.pt").exists(), "checkpoint")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _holder(out).get("pid") == proc.pid  # left behind, but no process holds it
    with RunDirLock(out) as lock:
        assert lock.stale_holder is not None and lock.stale_holder["pid"] == proc.pid
        assert _holder(out)["pid"] == os.getpid()
    (out / ".lock").write_text(json.dumps({"pid": proc.pid, "host": "h", "since": "t"}))
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumes"] == 1 and len(metrics["meta_loss"]["values"]) == 60
    assert not (out / ".lock").exists()


def test_lock_refuses_a_second_holder_and_names_it(tmp_path: Path) -> None:
    out = tmp_path / "d"
    with RunDirLock(out) as lock:
        assert lock.stale_holder is None
        holder = _holder(out)
        assert holder["pid"] == os.getpid() and holder["host"]
        # flock is per open file description: a second one in this process conflicts too.
        with pytest.raises(RunDirError, match=rf"in use by another amaml run \(pid "
                                              rf"{os.getpid()} on "):
            RunDirLock(out).acquire()
        with pytest.raises(RunDirError, match=rf"pid {os.getpid()}"):
            train(TrainConfig(family="sinusoid", shots=2, queries=2, steps=1, meta_iters=1,
                              meta_batch=1, n_train=2, n_test=1), out, progress=False)
        with pytest.raises(RunDirError, match=r"in use by another amaml run "):
            RunDirLock(out, what="comparison").acquire()
    assert not out.exists()  # created by the lock, empty, removed on release


def test_compare_locks_its_directory(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    out.mkdir()
    with RunDirLock(out, what="comparison"):
        with pytest.raises(RunDirError, match=rf"another amaml comparison \(pid {os.getpid()}"):
            compare(TrainConfig(), "amaml", out, progress=False)
    assert out.is_dir() and not any(out.iterdir())  # not ours to remove


def test_lock_on_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("x")
    with pytest.raises(RunDirError, match="not a directory"):
        RunDirLock(path).acquire()
    assert path.read_text() == "x"
