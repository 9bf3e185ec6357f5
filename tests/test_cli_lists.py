"""Every list has one source: the CLI's help, defaults and config keys come from the
registries and from ``dataclasses.fields(TrainConfig)``; the summary's settings and the
resume rules from the fields' metadata."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amaml.algorithms import ALGORITHMS
from amaml.cli import build_parser, main
from amaml.experiments import DEFAULT_METHODS, TrainConfig
from amaml.experiments.config import RESULT_FIELDS, RESUME_MUTABLE
from amaml.experiments.summary import SETTING_KEYS
from amaml.flow import MEMORIES, SOLVERS
from amaml.tasks import list_families

TINY = ["--family", "cosmixture", "--shots", "5", "--queries", "5", "--steps", "3",
        "--meta-iters", "2", "--meta-batch", "2", "--n-train", "6", "--n-test", "4",
        "--finetune-epochs", "2", "--finetune-every", "1", "--hidden", "8", "--no-progress"]


@pytest.fixture(scope="module")
def train_help() -> str:
    proc = subprocess.run([sys.executable, "-m", "amaml", "train", "--help"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    return " ".join(proc.stdout.split())


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_train_help_lists_every_registered_name(train_help: str) -> None:
    for name in [*list_families(), *ALGORITHMS, *SOLVERS, *MEMORIES]:
        assert re.search(rf"\b{re.escape(name)}\b", train_help), name


def test_every_config_field_has_a_flag(train_help: str) -> None:
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in train_help, f.name


def test_every_config_flag_sets_its_field() -> None:
    args = build_parser().parse_args(["train"])
    for f in dataclasses.fields(TrainConfig):
        assert hasattr(args, f.name), f.name


def test_compare_default_methods_are_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    # The registry's order is the paper's.
    assert tuple(ALGORITHMS) == ("amaml", "maml", "maml1", "fomaml", "reptile", "imaml")
    assert DEFAULT_METHODS == tuple(ALGORITHMS)
    assert build_parser().parse_args(["compare", "--out", "x"]).methods == \
        ",".join(ALGORITHMS)
    assert ",".join(ALGORITHMS) in _help("compare", capsys)


def test_result_settings_and_resume_rules_come_from_the_fields() -> None:
    by_name = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert RESUME_MUTABLE == {"data_dir", "download", "save_every", "compile"}
    bookkeeping = {"protocol", "compile", "data_dir", "download", "log_every", "save_every",
                   "device"}
    assert set(RESULT_FIELDS) == set(by_name) - bookkeeping
    assert set(SETTING_KEYS) == set(RESULT_FIELDS) - {"seed", "method"}
    for key in ("family", "shots", "queries", "steps", "inner_lr", "meta_iters",
                "meta_batch", "meta_lr", "solver", "memory", "proximal", "maml_steps",
                "hidden", "n_train", "n_test", "eval_steps", "finetune_epochs",
                "finetune_every", "dtype", "meta_optimizer", "loss", "proximal_in_query",
                "pool", "finetune_optimizer", "finetune_lr", "finetune_weight_decay"):
        assert key in SETTING_KEYS, key
    assert "protocol" not in SETTING_KEYS and "seed" not in SETTING_KEYS


def test_save_every_and_its_deprecated_alias(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(["train", "--save-every", "7"]).save_every == 7
    assert parser.parse_args(["train", "--checkpoint-every", "7"]).save_every == 7
    text = _help("train", capsys)
    assert "--save-every SAVE_EVERY, --checkpoint-every SAVE_EVERY" in text
    assert "--checkpoint-every is a deprecated alias" in text
    # Configs saved before the rename still load (and resume).
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "save_every"}
    assert TrainConfig.from_dict({**old, "checkpoint_every": 3}).save_every == 3
    with pytest.raises(ValueError, match="both 'checkpoint_every' and its new name"):
        TrainConfig.from_dict({**old, "checkpoint_every": 3, "save_every": 3})


def test_run_saved_before_the_rename_resumes(tmp_path: Path) -> None:
    from amaml.experiments.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "run"
    assert main(["train", *TINY, "--meta-iters", "4", "--save-every", "2",
                 "--out", str(out)]) == 0
    state = load_checkpoint(out / "checkpoint.pt")
    config = state["config"]
    config["checkpoint_every"] = config.pop("save_every")
    state.update(finished=False, iteration=2, history=state["history"][:2])
    save_checkpoint(out / "checkpoint.pt",
                    {k: v for k, v in state.items() if k not in ("format", "version")})
    (out / "metrics.json").unlink()
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["resumes"] == 1


def test_eval_of_a_cuda_run_on_a_cpu_machine(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``--device cpu`` applies before the stored config (device ``cuda``) is validated."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    init = out / "init.pt"
    state = torch.load(init, map_location="cpu", weights_only=True)
    state["config"]["device"] = "cuda"
    torch.save(state, init)  # same format tag and version as the loader checks
    if not torch.cuda.is_available():
        # The stored config alone is invalid here; the flag makes it usable.
        assert main(["eval", "--checkpoint", str(init), "--no-progress"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(init), "--device", "cpu", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((out / "metrics.json").read_text())
    assert printed["nrmse_mean"] == pytest.approx(saved["nrmse_mean"], rel=1e-6)
