"""The flags of ``amaml``'s subcommands, derived from TrainConfig's fields and the registries.

Every flag defaults to ``None`` so that the flags a user gave are known: they override the
``--protocol`` preset (:func:`config_from_args`).
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_config_flags", "add_eval_flags", "add_runtime_flags", "config_from_args",
           "explicit_fields"]


def _hidden(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"invalid --hidden {text!r}; give comma-separated widths such as 32,32") from err


def add_config_flags(p: argparse.ArgumentParser, *, method: bool) -> None:
    """Flags of TrainConfig fields; all default to None so that explicit ones are known."""
    from .algorithms import list_algorithms
    from .experiments.config import (
        DTYPES,
        KIND_LOSSES,
        LOSSES,
        META_OPTIMIZERS,
        PROTOCOLS,
        TrainConfig,
    )
    from .experiments.models import MODEL_KINDS
    from .flow import MEMORIES, SOLVERS
    from .tasks import list_families

    d = TrainConfig()
    p.add_argument("--protocol", choices=list(PROTOCOLS),
                   help="preset of the settings below; every flag given overrides it. "
                        "amaml (default): this project's; paper: the authors' released "
                        "protocol (SGD meta-lr 0.01, 5000 meta-updates, 0.5*MSE, RK4, "
                        "proximal 1 in the inner and query loss, float64, 1000-point pools, "
                        "Adam fine-tuning lr 1e-3 / weight decay 1e-6 for 1000 epochs)")
    g = p.add_argument_group("task family")
    g.add_argument("--family", help=f"task family (default {d.family}); one of "
                   f"{', '.join(list_families())}")
    g.add_argument("--shots", type=int, help=f"support points per task, per class for "
                   f"classification (default {d.shots})")
    g.add_argument("--queries", type=int,
                   help=f"query points per task, per class for classification (default "
                        f"{d.queries})")
    g.add_argument("--ways", type=int, help="classes per episode N >= 2 (classification "
                   "families only; default 5)")
    g.add_argument("--n-train", type=int,
                   help="meta-training tasks (default: 100 functions / all other users)")
    g.add_argument("--n-test", type=int, help=f"meta-test tasks (default {d.n_test})")
    g.add_argument("--pool", type=int, help="points per meta-training function from which "
                   "each meta-iteration draws a fresh support and query set (synthetic "
                   "families; default: one fixed set per function)")
    g.add_argument("--data-dir", help="folder of the collaborative-filtering data "
                   "(default $AMAML_DATA or ~/.cache/amaml)")
    g.add_argument("--download", action="store_true", default=None,
                   help="download missing data (official archives)")
    g = p.add_argument_group("method")
    if method:
        g.add_argument("--method", help=f"algorithm (default {d.method}); one of "
                       f"{', '.join(list_algorithms())}")
    g.add_argument("--steps", type=int, help=f"inner steps N (default {d.steps})")
    g.add_argument("--inner-lr", type=float,
                   help=f"inner learning rate / solver step (default {d.inner_lr})")
    g.add_argument("--solver", help=f"inner solver: {', '.join(sorted(SOLVERS))} "
                   f"(default {d.solver})")
    g.add_argument("--memory", help=f"A-MAML memory strategy: {', '.join(sorted(MEMORIES))} "
                   f"(default {d.memory})")
    _add_inner_optimizer_flags(g, d)
    g.add_argument("--proximal", type=float,
                   help=f"proximal weight mu >= 0 of A-MAML's inner flow and of iMAML "
                        f"(default {d.proximal}; iMAML uses 1 if 0)")
    g.add_argument("--proximal-in-query", action=argparse.BooleanOptionalAction, default=None,
                   help="A-MAML's meta-objective carries the proximal term too (the "
                        "authors' code)")
    g.add_argument("--loss", choices=list(LOSSES),
                   help="inner and query loss (default: the family kind's first; "
                        + "; ".join(f"{k}: {', '.join(v)}" for k, v in KIND_LOSSES.items())
                        + ")")
    g.add_argument("--compile", nargs="?", const=True, default=None, metavar="MODE",
                   type=_compile_flag,
                   help="compile A-MAML's solver steps with torch.compile: same gradients, "
                        "several times faster per step after a one-off compilation of tens "
                        "of seconds (kept on disk: a later run of the same shapes reuses it); "
                        "MODE: auto (the default: compile when the run is long enough to pay "
                        "for it), off (never), or a torch.compile mode, e.g. reduce-overhead "
                        "(CUDA graphs, for GPUs)")
    g.add_argument("--maml-steps", type=int, help="MAML's inner steps (default steps // 10)")
    g.add_argument("--model", choices=list(MODEL_KINDS),
                   help="network (default: the family kind's; "
                        + ", ".join(f"{m} for {k}" for m, k in MODEL_KINDS.items()) + ")")
    g.add_argument("--hidden", type=_hidden, help="MLP hidden widths, e.g. 32,32 (default)")
    g.add_argument("--conv-width", type=int,
                   help=f"filters per Conv-4 block (default {d.conv_width}, MAML's)")
    g = p.add_argument_group("meta-training")
    g.add_argument("--meta-iters", type=int,
                   help=f"meta-iterations (default {d.meta_iters})")
    g.add_argument("--meta-batch", type=int, help=f"tasks per meta-iteration "
                   f"(default {d.meta_batch})")
    g.add_argument("--meta-lr", type=float,
                   help=f"meta-optimiser learning rate (default {d.meta_lr})")
    g.add_argument("--meta-optimizer", choices=list(META_OPTIMIZERS),
                   help=f"meta-optimiser (default {d.meta_optimizer})")
    g.add_argument("--seed", type=int, help=f"seed of everything (default {d.seed})")
    g.add_argument("--log-every", type=int,
                   help=f"metrics.jsonl line every k iterations (default {d.log_every})")
    g.add_argument("--save-every", "--checkpoint-every", type=int, dest="save_every",
                   help="save a resumable checkpoint (checkpoint.pt) every k iterations; 0: "
                        f"only at the end and on a signal (default {d.save_every}); "
                        "--checkpoint-every is a deprecated alias")
    g.add_argument("--dtype", help=f"{' or '.join(DTYPES)} (default {d.dtype})")
    g.add_argument("--device", help=f"cpu or cuda (default {d.device})")
    add_eval_flags(p)


#: What each ``--inner-*`` option is, for its help (the optimisers that take it and its
#: default come from the config and the optimisers' fields).
_INNER_HELP: dict[str, str] = {
    "inner_momentum": "momentum", "inner_nesterov": "Nesterov momentum",
    "inner_betas": "moment decay rates", "inner_eps": "eps in the denominator",
    "inner_weight_decay": "weight decay (L2; decoupled in adamw)",
    "inner_alpha": "smoothing constant"}


def _add_inner_optimizer_flags(g: Any, d: Any) -> None:
    """``--inner-optimizer`` and one flag per option of :data:`INNER_OPTIONS`."""
    from .experiments.inner_optimizer import INNER_OPTIMIZERS, INNER_OPTIONS, inner_option_users

    g.add_argument("--inner-optimizer", choices=list(INNER_OPTIMIZERS),
                   help=f"how every method adapts (default {d.inner_optimizer}): gd, the "
                        "gradient flow of --solver (Euler: gradient descent), or an inner "
                        "optimiser (torch.optim's rule, at --inner-lr; needs --solver euler)")
    for option in INNER_OPTIONS:
        kwargs: dict[str, Any] = {"type": float}
        default = getattr(d, option)
        if option == "inner_nesterov":
            kwargs = {"action": argparse.BooleanOptionalAction, "default": None}
        elif option == "inner_betas":
            kwargs["nargs"] = 2
            kwargs["metavar"] = ("B1", "B2")
            default = " ".join(map(str, default))
        elif option == "inner_weight_decay":
            default = "the optimiser's own: 0, adamw 0.01"
        needs = "; needs --inner-momentum > 0" if option == "inner_nesterov" else ""
        g.add_argument(f"--{option.replace('_', '-')}", **kwargs,
                       help=f"{_INNER_HELP[option]} of --inner-optimizer "
                            f"{', '.join(inner_option_users(option))} (default {default}"
                            f"{needs})")


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    from .experiments.config import FINETUNE_OPTIMIZERS, TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-steps", type=int, help="adaptation steps at meta-test time "
                   "(default: each method's own inner loop)")
    g.add_argument("--finetune-epochs", type=int, help="length of the fine-tuning curve "
                   f"(default {d.finetune_epochs})")
    g.add_argument("--finetune-every", type=int,
                   help=f"record the curve every k epochs (default {d.finetune_every})")
    g.add_argument("--finetune-optimizer", choices=list(FINETUNE_OPTIMIZERS),
                   help=f"fine-tuning optimiser (default {d.finetune_optimizer})")
    g.add_argument("--finetune-lr", type=float,
                   help="fine-tuning learning rate (default: --inner-lr)")
    g.add_argument("--finetune-weight-decay", type=float, help="fine-tuning L2 penalty "
                   f"(default {d.finetune_weight_decay})")


def _compile_flag(value: str) -> str | bool:
    from .flow.kernels import COMPILE_MODES

    if value == "off":
        return False
    if value not in (*COMPILE_MODES, "auto"):
        raise argparse.ArgumentTypeError(f"expected off, auto or one of "
                                         f"{', '.join(COMPILE_MODES)}; got {value!r}")
    return value


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1; more threads can be far slower on "
                        "shared machines)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _config_keys() -> tuple[str, ...]:
    """Every TrainConfig field but ``protocol`` (the preset is applied, not copied)."""
    import dataclasses

    from .experiments.config import TrainConfig

    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "protocol")


def explicit_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in _config_keys()
            if getattr(args, k, None) is not None}


def config_from_args(args: argparse.Namespace) -> Any:
    """The TrainConfig of the flags: the --protocol preset, overridden by explicit flags."""
    from .experiments.config import TrainConfig

    return TrainConfig.from_protocol(getattr(args, "protocol", None) or "amaml",
                                     **explicit_fields(args))
