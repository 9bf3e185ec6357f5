"""Experiments of the paper: meta-training, evaluation, comparison, checkpoints, plots.

The command line (``amaml train | compare | eval | summarize``) sits on top of these functions::

    from amaml.experiments import TrainConfig, train
    result = train(TrainConfig(method="amaml", steps=100, meta_iters=200), "runs/a")
    result.metrics["nrmse_mean"]
"""

from .checkpoint import CheckpointError, load_checkpoint, load_state_file
from .compare import DEFAULT_METHODS, compare, format_table, parse_methods
from .config import TrainConfig
from .distributed import DistInfo, init_distributed
from .evaluate import evaluate_adaptation, finetune_curve
from .models import MLP, make_model
from .summary import format_summary, summarize_seeds, write_summary
from .train import (
    MetaLossError,
    RunDirError,
    TrainingInterrupted,
    TrainResult,
    build_algorithm,
    build_family,
    build_model,
    evaluate_run,
    resume_config,
    train,
)

__all__ = [
    "DEFAULT_METHODS", "MLP", "CheckpointError", "DistInfo", "MetaLossError", "RunDirError",
    "TrainConfig",
    "TrainResult", "TrainingInterrupted", "build_algorithm", "build_family", "build_model",
    "compare", "evaluate_adaptation", "evaluate_run", "finetune_curve", "format_table",
    "init_distributed", "load_checkpoint", "load_state_file", "make_model", "parse_methods",
    "resume_config", "summarize_seeds", "format_summary", "train", "write_summary",
]
