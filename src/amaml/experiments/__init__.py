"""Experiments of the paper: meta-training, evaluation, comparison, checkpoints, plots.

The command line (``amaml train | compare | eval | summarize``) sits on top of these functions::

    from amaml.experiments import TrainConfig, train
    result = train(TrainConfig(method="amaml", steps=100, meta_iters=200), "runs/a")
    result.metrics["nrmse_mean"]

Modules: :mod:`.config` (the settings), :mod:`.build` (the objects they describe),
:mod:`.loop` (the meta-training loop), :mod:`.training` (:func:`train`),
:mod:`.rundir` (run directories and their lock), :mod:`.signals`, :mod:`.evaluate`,
:mod:`.comparison` (:func:`compare`), :mod:`.summary`, :mod:`.sweep`,
:mod:`.references`, :mod:`.checkpoint`, :mod:`.distributed`, :mod:`.memory`,
:mod:`.plots`, :mod:`.models`.
"""

from .build import build_algorithm, build_family, build_model
from .checkpoint import CheckpointError, load_checkpoint, load_state_file
from .comparison import DEFAULT_METHODS, compare, format_table, parse_methods
from .config import TrainConfig
from .distributed import DistInfo, init_distributed
from .evaluate import evaluate_adaptation, evaluate_run, finetune_curve, paired_difference
from .loop import MetaLossError
from .models import MLP, make_model
from .rundir import RunDirError, RunDirLock, resume_config
from .signals import TrainingInterrupted
from .summary import format_summary, summarize_seeds, write_summary
from .training import TrainResult, train

__all__ = [
    "DEFAULT_METHODS", "MLP", "CheckpointError", "DistInfo", "MetaLossError", "RunDirError",
    "RunDirLock", "TrainConfig",
    "TrainResult", "TrainingInterrupted", "build_algorithm", "build_family", "build_model",
    "compare", "evaluate_adaptation", "evaluate_run", "finetune_curve", "format_table",
    "init_distributed", "load_checkpoint", "load_state_file", "make_model", "paired_difference",
    "parse_methods", "resume_config", "summarize_seeds", "format_summary", "train",
    "write_summary",
]
