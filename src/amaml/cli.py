"""The ``amaml`` command: ``train``, ``compare``, ``sweep-steps``, ``eval``, ``lake-runs``,
``summarize``.

Flags mirror :class:`amaml.experiments.config.TrainConfig` (``--meta-iters`` sets
``meta_iters``). Bad values, missing data, a diverged inner loop or a damaged
checkpoint print one line ``amaml: error: ...`` on stderr and exit with status 2, and so
does a missing optional dependency (``amaml train needs matplotlib: pip install
'amaml[experiments]'``);
an interrupted run (SIGINT/SIGTERM) saves its checkpoint, says how to resume and exits
with status 130.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ._cli_flags import (
    add_config_flags,
    add_eval_flags,
    add_runtime_flags,
    config_from_args,
    explicit_fields,
)
from ._extras import MissingExtraError, require

__all__ = ["build_parser", "main"]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class _CliError(Exception):
    """A user error detected by the CLI itself."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``amaml: error: ...``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"amaml: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_ERROR)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``amaml``."""
    parser = _Parser(prog="amaml", description="Meta-learning with adjoint methods (A-MAML): "
                     "meta-train, compare and evaluate initialisations.")
    from . import __version__
    from .experiments.comparison import DEFAULT_METHODS
    from .experiments.references import REFERENCES

    parser.add_argument("--version", action="version", version=f"amaml {__version__}")
    sub = parser.add_subparsers(dest="command",
                                metavar="{train,compare,sweep-steps,eval,lake-runs,summarize}",
                                parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="meta-train one method and evaluate it",
                       description="Meta-train an initialisation with one method, evaluate "
                       "it on the meta-test tasks and write the run to --out.")
    add_config_flags(t, method=True)
    t.add_argument("--out", help="run directory (config.json, metrics.json, metrics.jsonl, "
                   "init.pt, checkpoint.pt, training_curve.png); default: write nothing")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint")
    t.add_argument("--nproc", type=int, default=1,
                   help="local processes for distributed meta-training (torchrun)")
    add_runtime_flags(t)

    c = sub.add_parser("compare", help="meta-train several methods under one budget",
                       description="Meta-train and evaluate several methods with the same "
                       "tasks, initialisation and budget; writes results.json, results.md "
                       "and finetune.png to --out, and each run to --out/<method>.")
    c.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)}); "
                        f"the reference rows ({', '.join(REFERENCES)}) follow where they apply")
    add_config_flags(c, method=False)
    c.add_argument("--seeds", help="comma-separated seeds (e.g. 0,1,2,3,4): one comparison "
                   "per seed in --out/seed<S>, summarised in --out (summary.md, seeds.png); "
                   "instead of --seed")
    c.add_argument("--out", required=True, help="comparison directory")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted comparison (give the same flags)")
    add_runtime_flags(c)

    w = sub.add_parser("sweep-steps", help="meta-test error against inner steps N under one "
                       "memory budget",
                       description="Meta-train each method at every N of --steps-list (A-MAML "
                       "with its --memory strategy, MAML unrolled through all N steps) and "
                       "evaluate it after N adaptation steps. A method whose meta-gradient "
                       "needs more than --max-memory-mb stops there. Writes sweep.json, "
                       "sweep.md and sweep.png to --out.")
    w.add_argument("--methods", default="amaml,maml", help="comma-separated methods (default "
                   "amaml,maml)")
    w.add_argument("--steps-list", default="1,10,100,1000",
                   help="inner steps N, comma-separated (default 1,10,100,1000)")
    w.add_argument("--max-memory-mb", type=float,
                   help="memory budget of one meta-gradient in MiB (default: none)")
    add_config_flags(w, method=False)
    w.add_argument("--seeds", help="comma-separated seeds (default: --seed)")
    w.add_argument("--out", required=True, help="sweep directory")
    add_runtime_flags(w)

    e = sub.add_parser("eval", help="evaluate a saved initialisation",
                       description="Evaluate a saved initialisation (init.pt or "
                       "checkpoint.pt) on its meta-test tasks; prints JSON.")
    e.add_argument("--checkpoint", required=True, help="init.pt or checkpoint.pt of a run")
    e.add_argument("--n-test", type=int, help="meta-test tasks (default: the run's)")
    e.add_argument("--data-dir", help="data folder (default: the run's)")
    e.add_argument("--download", action="store_true", default=None,
                   help="download missing data")
    e.add_argument("--device", help="cpu or cuda (default: the run's)")
    add_eval_flags(e)
    e.add_argument("--output", help="also write the result as JSON to this file")
    add_runtime_flags(e)

    k = sub.add_parser("lake-runs", help="score a saved initialisation on Omniglot's own "
                       "one-shot test (20 within-alphabet 20-way 1-shot runs)",
                       description="Adapt a saved 20-way initialisation (init.pt or "
                       "checkpoint.pt) with its method on each run's 20 training images of "
                       "all_runs.zip, classify its 20 test images, and print the error over "
                       "the 400 test images with its 95%% Wilson interval, beside the random "
                       "initialisation adapted the same way (no-meta), nearest neighbour on "
                       "pixels, the modified Hausdorff distance and the published rates; "
                       "optionally the accuracy on random 5- and 20-way 1-shot episodes of "
                       "the run's held-out alphabets.")
    k.add_argument("--checkpoint", required=True, help="init.pt or checkpoint.pt of a run "
                   "meta-trained with --ways 20 on an Omniglot family")
    k.add_argument("--runs-dir", help="folder holding all_runs.zip or all_runs/ (default: "
                   "the run's --data-dir)")
    k.add_argument("--download", action="store_true",
                   help="download all_runs.zip (and the run's data) where missing")
    k.add_argument("--eval-steps", type=_int_list, help="adaptation steps, comma-separated "
                   "(default: the method's own inner loop)")
    k.add_argument("--episodes", type=int, default=0, help="held-out episodes per way "
                   "count (5 and 20) of the run's family (default 0: none)")
    k.add_argument("--method", help="adapt with this method's inner loop instead of the "
                   "run's (e.g. amaml on a maml run)")
    k.add_argument("--no-baselines", action="store_true",
                   help="leave out the pixel nearest-neighbour and Hausdorff rows")
    k.add_argument("--output", help="also write the report as JSON to this file")
    add_runtime_flags(k)

    s = sub.add_parser("summarize", help="summarise comparisons of several seeds",
                       description="Summarise `amaml compare` runs of one setting that "
                       "differ only in --seed: each method's nRMSE per seed and mean over "
                       "seeds, its paired difference to the reference method, and in how "
                       "many seeds it was lowest. Prints the table; --out also writes "
                       "summary.json, summary.md and seeds.png.")
    s.add_argument("dirs", nargs="+", metavar="DIR", help="--out directories of compare runs")
    s.add_argument("--reference", help="method to take differences against (default: the "
                   "first compared)")
    s.add_argument("--out", help="directory for summary.json, summary.md, seeds.png")
    add_runtime_flags(s)
    return parser


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress


def _run_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .experiments import resume_config, train

    if args.nproc < 1:
        raise _CliError(f"--nproc must be >= 1; got {args.nproc}.")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args.nproc, argv)
    explicit = explicit_fields(args)
    if args.resume:
        if args.out is None:
            raise _CliError("--resume needs --out DIR (the run to continue).")
        if args.protocol is not None:
            raise _CliError("--protocol applies to a new run; --resume takes the run's own "
                            "config (drop --protocol).")
        config = resume_config(args.out, **explicit)
    else:
        config = config_from_args(args)
    _say_path(config)
    result = train(config, args.out, resume=args.resume, progress=_progress(args),
                   references=True)
    m = result.metrics
    if m:
        _print_train(m, config, result.out_dir)
    return 0


def _print_train(m: dict[str, Any], config: Any, out_dir: Path | None) -> None:
    """The one-paragraph report of ``amaml train``: the metric and its references."""
    from .experiments.evaluate import metric_of

    metric = metric_of(m)
    where = f"; outputs in {out_dir}" if out_dir is not None else ""
    final = f"finetune_final_{metric.name}"
    if metric.name == "accuracy":
        head = (f"{m['method']} on {m['family']} ({config.ways}-way {config.shots}-shot): "
                f"meta-test accuracy {100 * m['accuracy_mean']:.2f} ± "
                f"{100 * m['accuracy_ci95']:.2f} % (95% CI over {m['n_test_tasks']} "
                f"episodes) after {m['eval_steps']} adaptation steps, "
                f"{100 * m[final]:.2f} % after {config.finetune_epochs} fine-tuning epochs")
    else:
        head = (f"{m['method']} on {m['family']}: meta-test nRMSE {m['nrmse_mean']:.4f} "
                f"± {m['nrmse_sem']:.4f} after {m['eval_steps']} adaptation steps, "
                f"{m[final]:.4f} after {config.finetune_epochs} fine-tuning epochs")
    print(head + where)
    scale = 100.0 if metric.name == "accuracy" else 1.0
    digits = 2 if metric.name == "accuracy" else 4
    for name, r in m.get("references", {}).items():
        what = {"no-meta": "no meta-learning: the random initialisation, adapted and "
                           "fine-tuned the same way",
                "oracle": "the family's own parameters fitted to each support set"}[name]
        line = (f"  {name:8s} {scale * r[metric.mean_key]:.{digits}f} ± "
                f"{scale * r[metric.spread_key]:.{digits}f}")
        if name == "no-meta":
            line += f", {scale * r[final]:.{digits}f} after fine-tuning"
        print(f"{line}  ({what})")


def _launch(nproc: int, argv: Sequence[str]) -> int:
    """Re-run this command under torchrun with ``nproc`` local processes."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "amaml", *rest]
    return subprocess.call(cmd)


def _say_path(config: Any, methods: Sequence[str] | None = None) -> None:
    """Print how the meta-gradients will be computed (eager or compiled, and why)."""
    from .experiments.build import resolve_compile

    for m in [config.method] if methods is None else methods:
        if m == "amaml":  # the other methods' inner loops always run eagerly
            print(resolve_compile(config.replace(method=m))[1], flush=True)


def _run_compare(args: argparse.Namespace) -> int:
    from .experiments.comparison import compare, format_table

    config = config_from_args(args)
    from .experiments.comparison import parse_methods

    _say_path(config, parse_methods(args.methods))
    if args.seeds is not None:
        from .experiments.comparison import compare_seeds
        from .experiments.summary import format_summary

        if args.seed is not None:
            raise _CliError("give either --seed or --seeds, not both.")
        summary = compare_seeds(config, args.methods, args.seeds, args.out,
                                resume=args.resume, progress=_progress(args))
        print(format_summary(summary), end="")
        print(f"Summary in {args.out}/summary.json, summary.md, seeds.png; each seed's "
              f"comparison in {args.out}/seed<S>/")
        return 0
    records = compare(config, args.methods, args.out, resume=args.resume,
                      progress=_progress(args))
    if records:
        print(format_table(records, config), end="")
        print(f"Results in {args.out}/results.json, results.md, finetune.png")
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    from .experiments.sweep import format_sweep, sweep_steps

    if args.seeds is not None and args.seed is not None:
        raise _CliError("give either --seed or --seeds, not both.")
    result = sweep_steps(config_from_args(args), args.methods, args.steps_list, args.out,
                         max_memory_mb=args.max_memory_mb, seeds=args.seeds,
                         progress=_progress(args))
    print(format_sweep(result), end="")
    print(f"Results in {args.out}/sweep.json, sweep.md, sweep.png")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from .experiments.build import build_algorithm, build_family, build_model
    from .experiments.checkpoint import CheckpointError, atomic_write_json, load_state_file
    from .experiments.config import TrainConfig
    from .experiments.evaluate import evaluate_run, metric_of

    state = load_state_file(args.checkpoint)
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{args.checkpoint!r} holds no config.")
    explicit = explicit_fields(args)
    try:
        # Flags first: a run trained on --device cuda is evaluated with --device cpu on a
        # machine without CUDA, so the stored device must not be validated on its own.
        config = TrainConfig.from_dict({**state["config"], **explicit})
    except (TypeError, ValueError) as err:
        if explicit:
            raise
        raise CheckpointError(f"{args.checkpoint!r} holds an invalid config ({err}).") from err
    family = build_family(config)
    model = build_model(config, family.input_shape)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{args.checkpoint!r} does not fit the model of its config "
                              f"({type(err).__name__}).") from err
    result = evaluate_run(config, model, family, build_algorithm(config))
    metric = metric_of(result)
    summary = {"checkpoint": str(args.checkpoint), "family": config.family,
               "method": config.method, "eval_steps": result["eval_steps"],
               "n_tasks": result["n_tasks"], "metric": metric.name,
               metric.mean_key: result[metric.mean_key],
               metric.spread_key: result[metric.spread_key],
               f"finetune_final_{metric.name}": result["finetune"][metric.mean_key][-1]}
    if args.output:
        atomic_write_json(Path(args.output), {**summary, **result})
    from .experiments.checkpoint import jsonable
    print(json.dumps(jsonable(summary)))
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 5,20,100;"
                                         f" got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1; got {text!r}")
    return values


def _run_lake_runs(args: argparse.Namespace) -> int:
    from .experiments.checkpoint import atomic_write_json
    from .experiments.lake_runs import format_lake_report, lake_report, load_initialisation
    from .tasks import read_lake_runs

    if args.episodes < 0:
        raise _CliError(f"--episodes must be >= 0; got {args.episodes}.")
    config, model = load_initialisation(args.checkpoint)
    if args.download:
        config = config.replace(download=True)
    if args.method is not None:
        config = config.replace(method=args.method)
    runs = read_lake_runs(args.runs_dir or config.data_dir, download=args.download)
    steps = args.eval_steps or (config.eval_steps or _own_steps(config),)
    report = lake_report(config, model, runs, eval_steps=steps, episodes=args.episodes,
                         baselines=not args.no_baselines)
    report["checkpoint"] = str(args.checkpoint)
    if args.output:
        atomic_write_json(Path(args.output), report)
    print(format_lake_report(report), end="")
    return 0


def _own_steps(config: Any) -> int:
    from .experiments.build import build_algorithm

    return int(build_algorithm(config).n_steps)


def _run_summarize(args: argparse.Namespace) -> int:
    from .experiments.summary import format_summary, summarize_seeds, write_summary

    summary = summarize_seeds(args.dirs, reference=args.reference)
    if args.out:
        print(write_summary(summary, args.out), end="")
        print(f"Summary in {args.out}/summary.json, summary.md, seeds.png")
    else:
        print(format_summary(summary), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``amaml`` command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.threads < 1:
        sys.stderr.write(f"amaml: error: --threads must be >= 1; got {args.threads}\n")
        return EXIT_ERROR
    try:  # before any work: a run must not fail at its first figure, minutes in
        require(f"amaml {args.command}")
    except MissingExtraError as err:
        _error(str(err))
        return EXIT_ERROR

    from .allocator import tune_cpu_allocator

    tune_cpu_allocator()  # before torch allocates anything; AMAML_MALLOC=system skips it
    import torch

    from .experiments.loop import MetaLossError
    from .experiments.signals import TrainingInterrupted
    from .flow import BacksolveError, DivergenceError

    torch.set_num_threads(args.threads)
    try:
        if args.command == "train":
            return _run_train(args, argv)
        if args.command == "compare":
            return _run_compare(args)
        if args.command == "summarize":
            return _run_summarize(args)
        if args.command == "sweep-steps":
            return _run_sweep(args)
        if args.command == "lake-runs":
            return _run_lake_runs(args)
        return _run_eval(args)
    except TrainingInterrupted as stop:
        sys.stderr.write(f"amaml: {stop}\n")
        return EXIT_INTERRUPTED
    except DivergenceError as err:
        lr = getattr(args, "inner_lr", None)
        hint = f" (e.g. --inner-lr {lr / 10:g})" if lr else " (try a smaller --inner-lr)"
        _error(f"{err}{hint}")
    except MetaLossError as err:
        _error(str(err))
    except BacksolveError as err:
        _error(f"{err} Use --memory checkpoint.")
    except (ValueError, _CliError, OSError) as err:
        _error(str(err))
    except KeyboardInterrupt:
        sys.stderr.write("amaml: interrupted\n")
        return EXIT_INTERRUPTED
    return EXIT_ERROR


def _error(message: str) -> None:
    one_line = " ".join(message.split())
    sys.stderr.write(f"amaml: error: {one_line}\n")
