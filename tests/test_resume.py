"""Checkpoint/resume: kill -9 and resume is bit-exact; bad checkpoints are refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from amaml.cli import main
from amaml.experiments import TrainConfig, load_checkpoint, train

ARGS = ["--family", "cosmixture", "--shots", "5", "--queries", "5", "--steps", "10",
        "--meta-batch", "2", "--n-train", "6", "--n-test", "3", "--finetune-epochs", "2",
        "--hidden", "8", "--save-every", "2", "--seed", "3"]
CONFIG = TrainConfig(family="cosmixture", shots=5, queries=5, steps=10, meta_batch=2,
                     n_train=6, n_test=3, finetune_epochs=2, hidden=(8,), save_every=2,
                     seed=3)


def _start(out: Path, meta_iters: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "amaml", "train", *ARGS, "--meta-iters",
                             str(meta_iters), "--out", str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc: subprocess.Popen[str], path: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 60 s"
        time.sleep(0.01)


def test_sigkill_then_resume_is_bit_exact(tmp_path: Path) -> None:
    out, iters = tmp_path / "run", 60
    proc = _start(out, iters)
    _wait_for_checkpoint(proc, out / "checkpoint.pt")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = load_checkpoint(out / "checkpoint.pt")
    assert not saved["finished"] and saved["iteration"] < iters  # really killed mid-way
    assert not (out / "init.pt").exists()

    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    resumed = torch.load(out / "init.pt", weights_only=True)["model"]
    reference = train(CONFIG.replace(meta_iters=iters), None, progress=False).model
    for name, value in reference.state_dict().items():
        assert torch.equal(resumed[name], value), name
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, iters + 1))
    assert json.loads((out / "metrics.json").read_text())["resumes"] == 1


def test_sigterm_saves_and_says_how_to_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(out, 100_000)
    _wait_for_checkpoint(proc, out / "checkpoint.pt")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "--resume" in err and "Traceback" not in err
    state = load_checkpoint(out / "checkpoint.pt")
    assert not state["finished"] and 2 <= state["iteration"] < 100_000
    assert len(state["history"]) == state["iteration"]


@pytest.fixture(scope="module")
def _finished_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("template") / "done"
    train(CONFIG.replace(meta_iters=2), out, progress=False)
    return out


@pytest.fixture
def finished_run(_finished_template: Path, tmp_path: Path) -> Path:
    # A fresh copy per test: the tests damage it.
    return Path(shutil.copytree(_finished_template, tmp_path / "done"))


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir()}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"not a torch file at all",
                                     "truncate"])
def test_corrupted_checkpoint_refused_untouched(finished_run: Path, content: object,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = finished_run / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2] if content == "truncate" else content)
    before = _snapshot(finished_run)
    code, err = _run(["train", "--out", str(finished_run), "--resume", "--no-progress"], capsys)
    assert code == 2 and err.startswith("amaml: error: ") and err.count("\n") == 1
    assert "corrupted" in err
    assert _snapshot(finished_run) == before
    # Without --resume the directory is refused as well (never silently restarted).
    code, err = _run(["train", *ARGS, "--out", str(finished_run), "--no-progress"], capsys)
    assert code == 2 and "--resume" in err
    assert _snapshot(finished_run) == before


def test_foreign_checkpoint_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "foreign"
    out.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, out / "checkpoint.pt")
    before = _snapshot(out)
    code, err = _run(["train", "--out", str(out), "--resume"], capsys)
    assert code == 2 and "not an amaml checkpoint" in err
    code, err = _run(["eval", "--checkpoint", str(out / "checkpoint.pt")], capsys)
    assert code == 2 and "not an amaml checkpoint" in err
    assert _snapshot(out) == before


def test_newer_format_version_refused(finished_run: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = finished_run / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "version": 99}, ckpt)
    code, err = _run(["train", "--out", str(finished_run), "--resume"], capsys)
    assert code == 2 and "version 99" in err


def test_resume_with_other_config_refused(finished_run: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(finished_run)
    code, err = _run(["train", "--out", str(finished_run), "--resume", "--steps", "7"], capsys)
    assert code == 2 and "--steps 7 (checkpoint: 10)" in err
    assert _snapshot(finished_run) == before


def test_resume_finished_run_is_idempotent(finished_run: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(finished_run)
    assert main(["train", "--out", str(finished_run), "--resume", "--no-progress"]) == 0
    assert "meta-test nRMSE" in capsys.readouterr().out
    assert _snapshot(finished_run) == before


def test_resume_without_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(["train", "--out", str(tmp_path / "empty"), "--resume"], capsys)
    assert code == 2 and "Nothing to resume" in err
