"""Configuration of a meta-training run: one frozen, validated dataclass.

Every field has a command-line flag of the same name (``meta_iters`` is
``--meta-iters``); error messages name both. Each field's ``metadata`` says what it is:
``affects_results=False`` for speed and bookkeeping (left out of the settings a summary
requires to agree between seeds, :data:`RESULT_FIELDS`), ``resume_mutable=True`` for what
a resumed run may change (:data:`RESUME_MUTABLE`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..algorithms import list_algorithms, maml_default_steps
from ..flow import MEMORIES, SOLVERS
from ..optim import AbstractInnerOptimizer
from ..tasks import DEFAULT_WAYS, family_kind, list_families
from ._checks import check_choice, check_int, check_number, flag
from .inner_optimizer import (
    INNER_OPTIONS,
    check_inner_optimizer,
    check_methods,
    describe_inner,
    make_inner_optimizer,
)
from .models import MODEL_KINDS

__all__ = ["DTYPES", "FINETUNE_OPTIMIZERS", "INNER_DEFAULTS", "KIND_FINETUNE", "KIND_LOSSES",
           "LOSSES", "META_OPTIMIZERS", "PROTOCOLS", "RENAMED_FIELDS", "RESULT_FIELDS",
           "RESUME_MUTABLE", "TrainConfig", "describe_inner_fields"]

#: Accepted ``dtype`` names.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}

#: Meta-optimisers: ``adam`` (torch.optim.Adam) or ``sgd`` (plain gradient descent, the
#: authors' code).
META_OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")

#: Optimisers of the meta-test fine-tuning curve: ``gd`` (full-batch gradient descent) or
#: ``adam`` (Adam with ``finetune_weight_decay`` as L2 penalty, the authors' evaluation).
FINETUNE_OPTIMIZERS: tuple[str, ...] = ("gd", "adam")

#: Inner and query losses of each kind of task family (:func:`amaml.tasks.family_kind`),
#: the first the default: regression ``mse`` or ``half-mse`` (0.5 * MSE, the authors'
#: code); classification ``cross-entropy``.
KIND_LOSSES: dict[str, tuple[str, ...]] = {"regression": ("mse", "half-mse"),
                                           "classification": ("cross-entropy",)}

#: Default ``(finetune_epochs, finetune_every)`` of each kind of task family.
KIND_FINETUNE: dict[str, tuple[int, int]] = {"regression": (200, 10),
                                             "classification": (10, 2)}

#: Every loss name, in the order of :data:`KIND_LOSSES`.
LOSSES: tuple[str, ...] = tuple(n for names in KIND_LOSSES.values() for n in names)

#: Named presets of ``TrainConfig`` fields (``--protocol``); every field they set can
#: still be overridden. ``amaml`` is this project's default protocol; ``paper`` is the
#: authors' released protocol (shib0li/Adjoint-MAML: run.py, experiment.sh,
#: core/meta_learner.py, infrastructure/misc.py): plain SGD on the meta-gradient with
#: meta-lr 0.01, up to 5000 meta-updates of 5 tasks, inner and query loss 0.5 * MSE, an
#: RK4 inner flow with A-MAML's proximal term (weight 1) in the inner and the query loss,
#: float64, 100 + 100 functions whose 1000-point pools give fresh support and query sets
#: at every meta-iteration, and evaluation by fine-tuning with Adam (lr 1e-3, weight decay
#: 1e-6) for 1000 epochs, recorded every 10.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "amaml": {},
    "paper": {
        "meta_optimizer": "sgd", "meta_lr": 0.01, "meta_iters": 5000, "meta_batch": 5,
        "loss": "half-mse", "inner_lr": 0.01, "steps": 50, "solver": "rk4",
        "proximal": 1.0, "proximal_in_query": True, "dtype": "float64", "n_train": 100,
        "n_test": 100, "pool": 1000, "finetune_optimizer": "adam", "finetune_lr": 1e-3,
        "finetune_weight_decay": 1e-6, "finetune_epochs": 1000, "finetune_every": 10,
    },
}

#: Old field names still read by :meth:`TrainConfig.from_dict` (configs saved before a
#: rename): old -> new.
RENAMED_FIELDS: dict[str, str] = {"checkpoint_every": "save_every"}

#: Speed or bookkeeping: changes no result.
_BOOKKEEPING: dict[str, Any] = {"affects_results": False}
#: Changes no computation: a resumed run may change it.
_RESUME_MUTABLE: dict[str, Any] = {"affects_results": False, "resume_mutable": True}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a meta-training run (and its evaluation).

    The defaults are the paper's synthetic setting (A-MAML on CosMixture, 50 shots,
    50 queries, inner learning rate 0.01, meta-batch 5, MLP 2-32-32-1 tanh) with a
    budget small enough that ``amaml train`` finishes in a few minutes on two CPU cores;
    the paper's own budgets are far larger.

    Attributes:
        family: Task family, one of :func:`amaml.tasks.list_families`.
        method: Algorithm, one of :func:`amaml.algorithms.list_algorithms`.
        shots: Support points per task (1 .. 100000); per class for classification.
        queries: Query points per task (1 .. 100000); per class for classification.
        ways: Classes per episode N >= 2 (classification families only; ``None``: the
            family's default, 5, written into the config).
        steps: Inner steps N of meta-training (1 .. 100000); MAML uses ``maml_steps``.
        inner_lr: Inner learning rate (the solver's step size) > 0.
        meta_iters: Meta-iterations (optimiser steps), >= 1.
        meta_batch: Tasks per meta-iteration, >= 1 (and <= the meta-training tasks).
        meta_lr: The meta-optimiser's learning rate > 0.
        meta_optimizer: ``adam`` or ``sgd`` (plain gradient descent on the mean
            meta-gradient, the authors' code).
        seed: Seed of the tasks, the initialisation and the meta-batch draws, >= 0.
        solver: Inner-loop solver name (``euler``, ``heun``, ``rk4``).
        memory: A-MAML's memory strategy (``store``, ``checkpoint``, ``revolve``,
            ``backsolve``).
        inner_optimizer: How every method adapts
            (:data:`~amaml.experiments.inner_optimizer.INNER_OPTIMIZERS`): ``gd``, the
            gradient flow integrated by ``solver`` (default), or an :mod:`amaml.optim`
            optimiser (``sgd``, ``adam``, ``adamw``, ``rmsprop``) stepped at ``inner_lr``,
            which needs ``solver="euler"`` (an optimiser step is a discrete map: it has no
            Runge-Kutta version).
        inner_momentum: Momentum of ``sgd`` and ``rmsprop``, >= 0.
        inner_nesterov: Nesterov momentum of ``sgd`` (needs ``inner_momentum > 0``).
        inner_betas: ``(beta1, beta2)`` of ``adam`` and ``adamw``, each in [0, 1).
        inner_eps: ``eps`` of ``adam``, ``adamw`` and ``rmsprop``, > 0.
        inner_weight_decay: Weight decay of any optimiser, >= 0 (L2; decoupled in
            ``adamw``); ``None``: the optimiser's own (0; ``adamw`` 0.01). Each
            ``inner_*`` option that the chosen optimiser does not take keeps its default.
        inner_alpha: Smoothing constant of ``rmsprop``, in [0, 1).
        proximal: Proximal weight mu >= 0 of A-MAML's inner flow and of iMAML (which uses
            1.0 when 0); MAML, MAML-1, FOMAML and Reptile adapt without it.
        proximal_in_query: A-MAML's meta-objective also carries the proximal term,
            ``L_query(u(T)) + mu / 2 * ||u(T) - theta||^2`` (the authors' code).
        loss: Inner and query loss, one of the family kind's :data:`KIND_LOSSES`:
            ``mse`` or ``half-mse`` (0.5 * MSE) for regression, ``cross-entropy`` for
            classification; ``None``: the kind's first (written into the config).
        protocol: The preset the other fields started from (``amaml`` or ``paper``, see
            :data:`PROTOCOLS`); recorded only, it changes nothing by itself.
        compile: Compile A-MAML's solver steps with ``torch.compile`` (same gradients to
            round-off, several times faster per step; tens of seconds to compile, cached
            on disk for later processes); a string picks the mode, e.g.
            ``"reduce-overhead"`` (CUDA graphs). ``"auto"`` (default): compile when the
            run is long enough to pay for it (:func:`~amaml.experiments.build.resolve_compile`);
            ``False`` (``--compile off``): never.
        maml_steps: MAML's inner steps; ``None`` means ``max(1, steps // 10)``.
        model: Network, one of :data:`~amaml.experiments.models.MODEL_KINDS`: ``mlp``
            (regression) or ``conv4`` (classification: MAML's Conv-4 with BatchNorm);
            ``None``: the family kind's (written into the config).
        hidden: Hidden layer widths of the MLP.
        conv_width: Filters per block of Conv-4 (64 in MAML), >= 1.
        data_dir: Data folder of the collaborative-filtering families (``None``: cache).
        download: Whether missing data may be downloaded.
        n_train: Meta-training tasks (``None``: the family's default).
        pool: Points per meta-training function from which every meta-iteration draws
            a fresh support and query set (synthetic families; ``None``: one fixed
            support and query set per function).
        n_test: Meta-test tasks >= 1.
        eval_steps: Adaptation steps at meta-test time; ``None`` means the method's own
            inner loop (A-MAML ``steps``, MAML ``maml_steps``, MAML-1 one step, ...).
        finetune_epochs: Length E of the fine-tuning curve, >= 0; ``None``: the family
            kind's (:data:`KIND_FINETUNE`: 200 for regression, 10 for classification,
            whose Conv-4 epochs cost far more).
        finetune_every: Record the curve every k epochs, >= 1; ``None``: the kind's (10
            for regression, 2 for classification).
        finetune_optimizer: ``gd`` (full-batch gradient descent) or ``adam``.
        finetune_lr: Fine-tuning learning rate > 0; ``None`` means ``inner_lr``.
        finetune_weight_decay: L2 penalty of the fine-tuning optimiser, >= 0 (added to
            the gradient, as ``torch.optim.Adam``'s ``weight_decay``).
        log_every: Append a line to ``metrics.jsonl`` every this many iterations, >= 1.
        save_every: Save a resumable checkpoint every this many iterations (0: only
            at the end and on SIGINT/SIGTERM); was ``checkpoint_every``.
        dtype: ``float32`` or ``float64``.
        device: ``cpu``, ``cuda`` or ``cuda:K``.
    """

    family: str = "cosmixture"
    method: str = "amaml"
    shots: int = 50
    queries: int = 50
    ways: int | None = None
    steps: int = 50
    inner_lr: float = 0.01
    meta_iters: int = 300
    meta_batch: int = 5
    meta_lr: float = 1e-3
    meta_optimizer: str = "adam"
    seed: int = 0
    solver: str = "euler"
    memory: str = "checkpoint"
    inner_optimizer: str = "gd"
    inner_momentum: float = 0.0
    inner_nesterov: bool = False
    inner_betas: tuple[float, float] = (0.9, 0.999)
    inner_eps: float = 1e-8
    inner_weight_decay: float | None = None
    inner_alpha: float = 0.99
    proximal: float = 0.0
    proximal_in_query: bool = False
    loss: str | None = None
    protocol: str = field(default="amaml", metadata=_BOOKKEEPING)
    compile: bool | str = field(default="auto", metadata=_RESUME_MUTABLE)
    maml_steps: int | None = None
    model: str | None = None
    hidden: tuple[int, ...] = (32, 32)
    conv_width: int = 64
    data_dir: str | None = field(default=None, metadata=_RESUME_MUTABLE)
    download: bool = field(default=False, metadata=_RESUME_MUTABLE)
    n_train: int | None = None
    pool: int | None = None
    n_test: int = 100
    eval_steps: int | None = None
    finetune_epochs: int | None = None
    finetune_every: int | None = None
    finetune_optimizer: str = "gd"
    finetune_lr: float | None = None
    finetune_weight_decay: float = 0.0
    log_every: int = field(default=1, metadata=_BOOKKEEPING)
    save_every: int = field(default=50, metadata=_RESUME_MUTABLE)
    dtype: str = "float32"
    device: str = field(default="cpu", metadata=_BOOKKEEPING)

    def __post_init__(self) -> None:
        check_choice("family", self.family, list_families())
        check_choice("method", self.method, list_algorithms())
        check_choice("solver", self.solver, sorted(SOLVERS))
        check_choice("memory", self.memory, sorted(MEMORIES))
        check_choice("dtype", self.dtype, sorted(DTYPES))
        check_choice("meta_optimizer", self.meta_optimizer, list(META_OPTIMIZERS))
        check_choice("finetune_optimizer", self.finetune_optimizer, list(FINETUNE_OPTIMIZERS))
        self._resolve_kind_defaults()
        if isinstance(self.inner_betas, list):  # from JSON and argparse
            object.__setattr__(self, "inner_betas", tuple(self.inner_betas))
        check_inner_optimizer(self.inner_optimizer, self._inner_options(),
                              INNER_DEFAULTS, self.solver, self.memory)
        check_methods(self.inner_optimizer, [self.method])
        check_choice("protocol", self.protocol, list(PROTOCOLS))
        for name in ("proximal_in_query",):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{flag(name)} must be a bool; got {getattr(self, name)!r}.")
        if self.pool is not None:
            check_int("pool", self.pool, 1, 10_000_000)
            for name in ("shots", "queries"):
                if getattr(self, name) > self.pool:
                    raise ValueError(f"{flag(name)} ({getattr(self, name)}) must not exceed "
                                     f"{flag('pool')} ({self.pool}): each episode draws "
                                     "its points from the pool.")
        if self.finetune_lr is not None:
            check_number("finetune_lr", self.finetune_lr)
        check_number("finetune_weight_decay", self.finetune_weight_decay, allow_zero=True)
        check_int("shots", self.shots, 1, 100_000)
        check_int("queries", self.queries, 1, 100_000)
        check_int("steps", self.steps, 1, 100_000)
        check_int("meta_iters", self.meta_iters, 1)
        check_int("meta_batch", self.meta_batch, 1)
        check_int("seed", self.seed, 0)
        check_int("n_test", self.n_test, 1)
        check_int("finetune_epochs", self.finetune_epochs, 0)
        check_int("finetune_every", self.finetune_every, 1)
        check_int("log_every", self.log_every, 1)
        check_int("save_every", self.save_every, 0)
        for name in ("maml_steps", "eval_steps"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1, 100_000)
        if self.n_train is not None:
            check_int("n_train", self.n_train, 1)
            if self.meta_batch > self.n_train:
                raise ValueError(f"{flag('meta_batch')} ({self.meta_batch}) must not exceed "
                                 f"{flag('n_train')} ({self.n_train}).")
        check_number("inner_lr", self.inner_lr)
        check_number("meta_lr", self.meta_lr)
        check_number("proximal", self.proximal, allow_zero=True)
        check_int("conv_width", self.conv_width, 1, 4096)
        if not isinstance(self.hidden, tuple) or any(
                isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.hidden):
            raise ValueError(f"{flag('hidden')} must be a tuple of ints >= 1; "
                             f"got {self.hidden!r}.")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise ValueError(f"{flag('data_dir')} must be a path string; got {self.data_dir!r}.")
        from ..flow.kernels import COMPILE_MODES

        if not (isinstance(self.compile, bool) or self.compile in (*COMPILE_MODES, "auto")):
            raise ValueError(f"{flag('compile')} must be a bool, 'auto' or one of "
                             f"{list(COMPILE_MODES)}; got {self.compile!r}.")
        if not isinstance(self.download, bool):
            raise ValueError(f"{flag('download')} must be a bool; got {self.download!r}.")
        if not isinstance(self.device, str):
            raise ValueError(f"{flag('device')} must be a string; got {self.device!r}.")
        try:
            dev = torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"{flag('device')}: {self.device!r} is not a torch device; use "
                             "'cpu' or 'cuda'.") from err
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{flag('device')} is {self.device!r} but CUDA is not available; "
                             "use --device cpu.")

    def _resolve_kind_defaults(self) -> None:
        """Check ``ways``, ``loss`` and ``model`` against the family's kind; fill ``None``.

        ``object.__setattr__``: the dataclass is frozen, and the resolved value is what
        ``config.json`` records, so a resumed run compares like with like.
        """
        kind = family_kind(self.family)
        if kind == "classification":
            if self.ways is None:
                object.__setattr__(self, "ways", DEFAULT_WAYS)
            check_int("ways", self.ways, 2)
        elif self.ways is not None:
            raise ValueError(f"{flag('ways')} is for classification families; "
                             f"{self.family!r} is a {kind} family: leave --ways unset.")
        if self.loss is None:
            object.__setattr__(self, "loss", KIND_LOSSES[kind][0])
        for name, default in zip(("finetune_epochs", "finetune_every"), KIND_FINETUNE[kind]):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        check_choice("loss", self.loss, list(LOSSES))
        if self.loss not in KIND_LOSSES[kind]:
            raise ValueError(f"--loss {self.loss} does not apply to the {kind} family "
                             f"{self.family!r}; use one of {list(KIND_LOSSES[kind])}.")
        if self.model is None:
            object.__setattr__(self, "model",
                               next(m for m, k in MODEL_KINDS.items() if k == kind))
        check_choice("model", self.model, list(MODEL_KINDS))
        model_kind = MODEL_KINDS[str(self.model)]
        if model_kind != kind:
            fits = [m for m, k in MODEL_KINDS.items() if k == kind]
            raise ValueError(f"--model {self.model} is a {model_kind} network but "
                             f"{self.family!r} is a {kind} family; use --model "
                             f"{' or '.join(fits)}.")

    def _inner_options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in INNER_OPTIONS}

    def inner_optimizer_instance(self) -> AbstractInnerOptimizer | None:
        """The run's inner optimiser, an :mod:`amaml.optim` instance, or ``None`` for
        ``gd`` (the gradient flow integrated by ``solver``)."""
        return make_inner_optimizer(self.inner_optimizer, self._inner_options())

    @property
    def inner_description(self) -> str:
        """How the run adapts, for tables: ``euler`` (``gd``: the solver's name) or
        ``inner optimiser: adam(betas=(0.9, 0.999), ...)``."""
        return describe_inner(self.inner_optimizer, self._inner_options(), self.solver)

    @property
    def kind(self) -> str:
        """The family's kind: ``"regression"`` or ``"classification"``."""
        return family_kind(self.family)

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a ``torch.dtype``."""
        return DTYPES[self.dtype]

    @property
    def effective_finetune_lr(self) -> float:
        """The fine-tuning learning rate: ``finetune_lr`` or ``inner_lr``."""
        return self.finetune_lr if self.finetune_lr is not None else self.inner_lr

    @classmethod
    def from_protocol(cls, protocol: str = "amaml", **overrides: Any) -> TrainConfig:
        """A config from a named preset of :data:`PROTOCOLS`, some fields overridden.

        Raises:
            ValueError: Unknown protocol, or invalid fields.
        """
        check_choice("protocol", protocol, list(PROTOCOLS))
        preset = dict(PROTOCOLS[protocol])
        from ..tasks import has_fixed_data

        if has_fixed_data(overrides.get("family", cls.family)):
            preset.pop("pool", None)  # users have their own ratings: no pools to draw from
            preset.pop("n_train", None)  # every eligible user, as the family's default
        return cls(**{**preset, **overrides, "protocol": protocol})

    @property
    def effective_maml_steps(self) -> int:
        """MAML's inner steps: ``maml_steps`` or ``max(1, steps // 10)``."""
        return self.maml_steps if self.maml_steps is not None \
            else maml_default_steps(self.steps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (``hidden`` and ``inner_betas`` as lists)."""
        out = dataclasses.asdict(self)
        out["hidden"] = list(self.hidden)
        out["inner_betas"] = list(self.inner_betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild a config from :meth:`to_dict`'s output; unknown keys are refused.

        Old names of renamed fields (:data:`RENAMED_FIELDS`, e.g. ``checkpoint_every``) are
        read as the new ones, so that runs saved before a rename still resume; fields added
        since (the ``inner_*`` options) take their defaults.

        Raises:
            ValueError: Unknown keys, a field given under both names, or invalid values.
        """
        if not isinstance(data, dict):
            raise ValueError(f"A config must be a dict; got {type(data).__name__}.")
        kwargs = dict(data)
        for old, new in RENAMED_FIELDS.items():
            if old in kwargs:
                if new in kwargs:
                    raise ValueError(f"The config gives both {old!r} and its new name {new!r};"
                                     f" keep {new!r}.")
                kwargs[new] = kwargs.pop(old)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"Unknown config fields {unknown}; expected a subset of "
                             f"{sorted(names)}.")
        if "hidden" in kwargs and isinstance(kwargs["hidden"], list):
            kwargs["hidden"] = tuple(kwargs["hidden"])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def differences(self, other: TrainConfig, *, ignore: frozenset[str] = frozenset()
                    ) -> dict[str, tuple[Any, Any]]:
        """Fields (not in ``ignore``) whose values differ: name -> (self's, other's)."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if k not in ignore and a[k] != b[k]}


#: The defaults of ``inner_optimizer`` and its options: what a config saved before they
#: existed had (an optimiser that does not take an option refuses any other value).
INNER_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(TrainConfig)
    if f.name == "inner_optimizer" or f.name in INNER_OPTIONS}


def describe_inner_fields(fields: dict[str, Any]) -> str:
    """:attr:`TrainConfig.inner_description` of a stored config (``config.json``, the
    ``config`` of ``sweep.json``, a summary's setting); keys missing (or ``None``) in
    older files take their defaults."""
    given = {k: v for k, v in fields.items() if v is not None}
    return describe_inner(given.get("inner_optimizer", INNER_DEFAULTS["inner_optimizer"]),
                          {k: given.get(k, v) for k, v in INNER_DEFAULTS.items()},
                          str(given.get("solver", "euler")))


#: Fields that change a run's results (all but speed and bookkeeping), in field order.
RESULT_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("affects_results", True))

#: Fields that may differ between a checkpoint and the config that resumes it: where the
#: data lives, how often to save and whether to compile change nothing in the computation.
RESUME_MUTABLE: frozenset[str] = frozenset(
    f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resume_mutable", False))
