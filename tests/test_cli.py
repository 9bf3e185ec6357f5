"""The ``amaml`` command line: help, end-to-end runs, one-line errors with status 2."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amaml.cli import main

TINY = ["--family", "cosmixture", "--shots", "5", "--queries", "5", "--steps", "3",
        "--meta-iters", "3", "--meta-batch", "2", "--n-train", "6", "--n-test", "4",
        "--finetune-epochs", "2", "--finetune-every", "1", "--hidden", "8", "--no-progress"]


def test_python_m_amaml_help() -> None:
    # One subprocess for the real entry point; the rest runs main() in-process (fast).
    proc = subprocess.run([sys.executable, "-m", "amaml", "train", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--family", "--method", "--inner-lr", "--meta-iters", "--resume", "--nproc",
                 "--save-every", "--checkpoint-every", "--maml-steps", "--download", "--compile"):
        assert flag in proc.stdout


@pytest.mark.parametrize("command", ["compare", "eval", "summarize"])
def test_subcommand_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "--out" in capsys.readouterr().out or command == "eval"


def test_train_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    assert "meta-test nRMSE" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    # eval of the saved initialisation reproduces the run's own evaluation.
    assert main(["eval", "--checkpoint", str(out / "init.pt"), "--no-progress",
                 "--output", str(tmp_path / "eval.json")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["nrmse_mean"] == pytest.approx(metrics["nrmse_mean"], rel=1e-6)
    assert json.loads((tmp_path / "eval.json").read_text())["method"] == "amaml"
    # Flags override evaluation settings; checkpoint.pt is accepted as well.
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--eval-steps", "1",
                 "--finetune-epochs", "0"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["eval_steps"] == 1


def test_train_compile_matches_eager(tmp_path: Path) -> None:
    """--compile changes the speed, not the result (float32 round-off only)."""
    assert main(["train", *TINY, "--out", str(tmp_path / "eager")]) == 0
    assert main(["train", *TINY, "--compile", "--out", str(tmp_path / "compiled")]) == 0
    config = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert config["compile"] is True
    a = torch.load(tmp_path / "eager" / "init.pt", weights_only=False)
    b = torch.load(tmp_path / "compiled" / "init.pt", weights_only=False)
    sa, sb = a["model"], b["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], rtol=1e-4, atol=1e-6), k


def test_compare_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "amaml,maml1", *TINY, "--out", str(out)]) == 0
    assert "| maml1 |" in capsys.readouterr().out
    assert {r["method"] for r in json.loads((out / "results.json").read_text())} == \
        {"amaml", "maml1", "no-meta", "oracle"}


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("amaml: error: ")
    return err[0]


@pytest.mark.parametrize("argv,match", [
    (["train", "--family", "nope"], "Unknown family 'nope'"),
    (["train", "--method", "sgd"], "Unknown method 'sgd'"),
    (["train", "--shots", "0"], "--shots"),
    (["train", "--steps", "-3"], "--steps"),
    (["train", "--inner-lr", "abc"], "--inner-lr"),
    (["train", "--bogus"], "unrecognized arguments"),
    (["compare", "--methods", "amaml,foo", "--out", "x"], "Unknown method"),
    (["eval", "--checkpoint", "/nonexistent/init.pt"], "does not exist"),
    (["train", "--resume"], "--resume needs --out"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_one_line_exit_2(argv: list[str], match: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    assert match in _error_line(capsys)


def test_missing_data_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ml"
    code = main(["train", "--family", "movielens-100k", "--data-dir", str(tmp_path / "none"),
                 "--out", str(out), "--no-progress"])
    assert code == 2
    assert "movielens-100k" in _error_line(capsys)
    assert not out.exists()  # nothing half-written


def test_divergence_names_step_and_suggests_smaller_lr(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "div"
    code = main(["train", *TINY, "--inner-lr", "1e6", "--steps", "20", "--out", str(out)])
    assert code == 2
    line = _error_line(capsys)
    assert "step" in line and "--inner-lr" in line
    assert not out.exists()  # failed before its first checkpoint: nothing left behind


def test_existing_run_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--meta-iters", "1", "--out", str(out)]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main(["train", *TINY, "--meta-iters", "1", "--out", str(out)]) == 2
    assert "--resume" in _error_line(capsys)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_nproc_launches_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert main(["train", "--nproc", "2", "--steps", "4", "--out", "d"]) == 0
    cmd = calls[0]
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=2" in cmd
    assert cmd[-6:] == ["-m", "amaml", "train", "--steps", "4", "--out", "d"][-6:]
    assert "--nproc" not in cmd[cmd.index("amaml"):]
    torch.set_num_threads(1)
    assert os.environ.get("WORLD_SIZE") is None


def test_non_finite_meta_loss_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    train_module = importlib.import_module("amaml.experiments.training")

    real = train_module.build_algorithm

    class _NaN:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def meta_step(self, *args: object, **kwargs: object) -> torch.Tensor:
            return self.inner.meta_step(*args, **kwargs) * float("nan")  # type: ignore[attr-defined]

    monkeypatch.setattr(train_module, "build_algorithm", lambda c: _NaN(real(c)))
    out = tmp_path / "nan"
    assert main(["train", *TINY, "--out", str(out)]) == 2
    assert "meta-iteration 1" in _error_line(capsys)
    assert not out.exists()


def test_compile_flag_takes_an_optional_mode(capsys: pytest.CaptureFixture[str]) -> None:
    from amaml.cli import build_parser
    from amaml.experiments import TrainConfig, build_algorithm

    parser = build_parser()
    assert parser.parse_args(["train", "--compile"]).compile is True
    assert parser.parse_args(["train", "--compile", "--steps", "3"]).compile is True
    args = parser.parse_args(["train", "--compile", "reduce-overhead"])
    assert args.compile == "reduce-overhead"
    config = TrainConfig(compile=args.compile)
    assert build_algorithm(config).adjoint.compile == "reduce-overhead"
    with pytest.raises(SystemExit) as exc:  # argparse's own error, one line
        main(["train", "--compile", "turbo"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile" in err[0] and "reduce-overhead" in err[0]
