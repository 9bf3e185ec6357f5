"""The case generator and the case runner of the differential suite.

:func:`draw` turns a seed into a :class:`Case` (``random.Random(seed)``: reproducible, no
shrinking): a model of the zoo x an inner optimiser x a memory strategy x ``adapt`` or
``adapt_batch`` x eager or compiled x what the caller does between ``adapt`` and
``backward()`` x which meta-parameters are wanted. :func:`run` runs it through amaml and
through the independent reference (:mod:`.reference`) and says what happened:

* ``exact``: the meta-gradient equals unrolled back-propagation to ``EXACT`` relative error,
  and a central finite difference of a fresh ``adapt`` along a random direction agrees to
  ``FD_TOL``;
* ``refused-upfront``: ``adapt`` raised a ValueError / TypeError / RuntimeError with the
  expected message before returning;
* ``refused-in-backward``: ``backward()`` raised a RuntimeError saying a tensor was
  modified (in place), as unrolled autograd itself does on the same case;
* ``failed``: anything else (a wrong gradient, an unexpected exception, a missing refusal,
  the model touched). The case's ``expected`` outcome is what the library promises.

Tolerances (float64):

* ``EXACT = 1e-8``: amaml and the reference sum the same terms in other orders; round-off
  is 1e-15..1e-12 on these models (Adam / RMSprop divide by ``sqrt(v) + 1e-8``, which
  amplifies round-off where a gradient is tiny); a dropped term or a wrong mask shows at
  1e-4 or more.
* ``FD_TOL = 1e-6``: central differences with Richardson extrapolation
  (:func:`.reference.central_difference`) at step ``h`` in ``FD_EPS`` = (1e-7, 1e-8,
  1e-9, 1e-6), the first that agrees: the round-off is O(1e-16 |J| / h) = 1e-9..1e-7
  relative to the directional derivative, the truncation O(h^4) after extrapolation,
  1e-9..1e-11 on smooth steps. Adam and RMSprop steps are steeply curved where a gradient
  is of the order of their eps = 1e-8 (measured, the reference alone: BERT + Adam 1.2e-3
  at h = 1e-7, 7e-10 at h = 1e-8; GPT-2 + RMSprop, seed 210: 1e-1 at 1e-7, 1.2e-5 at
  1e-8, 9e-8 at 3e-9, 3e-9 at 1e-9), hence the smaller steps; a wrong gradient (1e-4 or
  more off) agrees at none.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import amaml

from . import reference as ref
from .zoo import ZOO, stack_tasks, task_of

EXACT = 1e-8
FD_TOL = 1e-6
FD_EPS = (1e-7, 1e-8, 1e-9, 1e-6)

# "checkpoint" as the user writes it (segments picked by amaml), "checkpoint2" every 2nd
# state kept with no graphs kept (each step's VJP recomputed), "revolve2" binomial
# checkpointing with 2 snapshots (the default 21 would store every state of these short
# loops), "budget" a Budget small enough that these models' tapes and checkpoints mix,
# "auto" the default (room for every step's graph), "auto-tiny" auto under a budget that
# fits no graph (checkpoint or revolve chosen).
MEMORIES = ("store", "checkpoint", "checkpoint2", "revolve2", "budget", "auto", "auto-tiny")
ACTIONS = ("none", "switch", "inplace")
METAS = ("init", "lr", "data", "weight")
LR = {"gd": 0.1, "sgd": 0.05, "adam": 0.01, "rmsprop": 0.005}
OUTCOMES = ("exact", "refused-upfront", "refused-in-backward", "failed")


@dataclass(frozen=True)
class Case:
    seed: int
    model: str
    form: str  # "pair" (inputs, y) or "dict" (keyword inputs holding the targets)
    optimizer: str  # one of reference.OPTIMIZERS
    memory: str
    batch: int  # 0: adapt; B >= 2: adapt_batch with B tasks
    compiled: bool
    action: str  # "none", "switch" (mode flipped before the query), "inplace"
    inplace: str  # what "inplace" changes: "weight" (the loss's), "buffer" (one the model
    #              reads) or "running" (BatchNorm's running statistics, updated by a plain
    #              training-mode forward pass: not read with batch_norm="batch")
    weight: str  # how the loss reads its weight w: "outside" (w * loss) or "inside" (of the
    #             nonlinearity: loss(w * prediction), which autograd saves)
    meta: str  # "init", "lr" (a learnable lr), "data" (support requires grad), "weight"
    mode: str  # the modules' mode during adapt: "train" or "eval"
    steps: int
    n: int  # examples per set
    lr_shape: str = "scalar"  # "scalar" or "per-step" (a (steps,) tensor schedule)
    notes: tuple[str, ...] = ()  # draws replaced, with the reason

    def describe(self) -> str:
        call = f"adapt_batch(B={self.batch})" if self.batch else "adapt"
        act = self.action if self.action != "inplace" else f"inplace-{self.inplace}"
        has_w = self.meta == "weight" or (self.action == "inplace" and self.inplace == "weight")
        bits = [f"seed={self.seed}", self.model, f"form={self.form}", call,
                f"opt={self.optimizer}", f"memory={self.memory}",
                "compiled" if self.compiled else "eager", f"mode={self.mode}",
                f"action={act}", f"meta={self.meta}",
                *([f"w={self.weight}"] if has_w else []), f"steps={self.steps}", f"n={self.n}",
                *(["lr=per-step"] if self.lr_shape == "per-step" else [])]
        return " ".join(bits)

    @property
    def expected(self) -> str:
        if self.action == "inplace" and self.inplace != "running":
            return "refused-in-backward"
        return "exact"  # running statistics changed in place: amaml never read them

    @property
    def kind(self) -> str:
        """The case's kind for tallies: model, call and action."""
        return f"{self.model}/{'batch' if self.batch else 'adapt'}/{self.action}"


def draw(seed: int, compile_rate: float | None = None) -> Case:
    """The case of ``seed``. ``compile_rate`` (default: env ``AMAML_DIFFERENTIAL_COMPILE``,
    else 0) is the chance of ``compile=True``; the draws do not depend on it otherwise."""
    if compile_rate is None:
        compile_rate = float(os.environ.get("AMAML_DIFFERENTIAL_COMPILE", "0"))
    rng = random.Random(seed)
    notes = []
    model = rng.choice(sorted(ZOO))
    entry = ZOO[model]
    form = rng.choice(entry.forms)
    optimizer = rng.choice(ref.OPTIMIZERS)
    memory = rng.choice(MEMORIES)
    batch = rng.choice([0, 0, 2, 3])
    compiled = rng.random() < compile_rate
    action = rng.choice(ACTIONS)
    inplace = rng.choice(["weight", "buffer"])
    if inplace == "buffer" and entry.buffer is None:
        inplace = "running" if entry.batchnorm else "weight"
        if action == "inplace":
            notes.append(f"inplace buffer -> {inplace}: the model reads no floating buffer")
    weight = rng.choice(["outside", "inside"])
    meta = rng.choice(METAS)
    if meta == "data" and not entry.float_inputs:
        meta = rng.choice(["init", "lr", "weight"])
        notes.append(f"meta data -> {meta}: integer inputs cannot require grad")
    mode = rng.choice(["train", "train", "eval"])
    steps = rng.randint(2, 5)
    n = rng.randint(3, 6)
    lr_shape = rng.choice(["scalar", "scalar", "per-step"])  # drawn last: new axes go last
    return Case(seed=seed, model=model, form=form, optimizer=optimizer, memory=memory,
                batch=batch, compiled=compiled, action=action, inplace=inplace, weight=weight,
                meta=meta, mode=mode, steps=steps, n=n, lr_shape=lr_shape, notes=tuple(notes))


def make_case(**fields: Any) -> Case:
    """A case by hand (regression tests): ``fields`` over a small default case."""
    base: dict[str, Any] = dict(seed=0, model="custom_mlp", form="pair", optimizer="gd",
                                memory="store", batch=0, compiled=False, action="none",
                                inplace="weight", weight="inside", meta="lr", mode="train",
                                steps=3, n=5)
    return Case(**{**base, **fields})


# --- running a case -----------------------------------------------------------------

@dataclass
class Result:
    case: Case
    outcome: str
    detail: str = ""
    errors: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome == self.case.expected


class _Refused(Exception):
    def __init__(self, where: str, exc: BaseException) -> None:
        super().__init__(f"{where}: {type(exc).__name__}: {exc}")
        self.where, self.exc = where, exc


def _memory(name: str) -> Any:
    return {"checkpoint2": amaml.Checkpoint(every=2, tapes=False),
            "revolve2": amaml.Revolve(snapshots=2),
            # 0.05 MB: a few steps' graphs of these models (amaml.explain: "the last steps
            # kept while they fit in 0.05 MiB, the steps before recomputed").
            "budget": amaml.Budget(megabytes=0.05),
            "auto-tiny": amaml.Auto(megabytes=0.002)}.get(name, name)


def _amaml_optimizer(kind: str) -> Any:
    return {"gd": None, "sgd": amaml.optim.SGD(momentum=0.9), "adam": amaml.optim.Adam(),
            "rmsprop": amaml.optim.RMSprop()}[kind]


def _set_mode(model: torch.nn.Module, mode: str) -> None:
    model.train(mode == "train")


def _flip(mode: str) -> str:
    return "eval" if mode == "train" else "train"


class _Setup:
    """Model, data and meta-parameters of one case, rebuilt identically on demand."""

    def __init__(self, case: Case) -> None:
        self.case = case
        entry = ZOO[case.model]
        self.entry = entry
        self.model = entry.build(case.seed)
        gen = torch.Generator().manual_seed(10_000 + case.seed)
        tasks = [entry.task(gen, case.n, case.form) for _ in range(max(case.batch, 1))]
        if case.batch:
            self.support = stack_tasks([t[0] for t in tasks])
            self.query = stack_tasks([t[1] for t in tasks])
        else:
            self.support, self.query = tasks[0]
        self.w = None
        if case.meta == "weight" or (case.action == "inplace" and case.inplace == "weight"):
            self.w = torch.tensor(1.3, dtype=torch.float64,
                                  requires_grad=case.meta == "weight")
        self.lr: float | Tensor = LR[case.optimizer]
        if case.lr_shape == "per-step":  # a decaying schedule, one rate a step
            self.lr = self.lr * torch.linspace(1.0, 0.5, case.steps, dtype=torch.float64)
        if case.meta == "lr":
            self.lr = torch.as_tensor(self.lr, dtype=torch.float64).clone().requires_grad_()
        if case.meta == "data":  # float tensor inputs: (x, y)
            x, y = self.support
            self.support = (x.clone().requires_grad_(True), y)
        w = self.w
        if w is None:
            self.loss = entry.loss(case.form)
        elif case.weight == "inside":
            self.loss = entry.loss(case.form, lambda z: w * z)
        elif case.form == "dict":
            base = entry.loss(case.form)
            self.loss = lambda out: w * base(out)
        else:
            base = entry.loss(case.form)
            self.loss = lambda out, y: w * base(out, y)

    def extras(self) -> list[Tensor]:
        """The meta-parameters besides the model's: lr, support inputs, loss weight."""
        out = []
        if isinstance(self.lr, Tensor) and self.lr.requires_grad:
            out.append(self.lr)
        if self.case.meta == "data":
            out.append(self.support[0])
        if self.w is not None and self.w.requires_grad:
            out.append(self.w)
        return out

    def wrt(self) -> list[Tensor]:
        return [*ref.trainable(self.model).values(), *self.extras()]

    def act(self) -> None:
        """What the caller does between adapt and the query loss."""
        case = self.case
        if case.action == "switch":
            _set_mode(self.model, _flip(case.mode))
        elif case.action == "inplace":
            with torch.no_grad():
                if case.inplace == "weight":
                    self.w.mul_(3)
                elif case.inplace == "buffer":
                    getattr(self.model, self.entry.buffer).mul_(3)
                else:  # the common MAML habit: a training-mode pass updates them in place
                    was = self.model.training
                    q = task_of(self.query, 0) if case.batch else self.query
                    self.model.train()(q[0])
                    self.model.train(was)


def _query_loss_amaml(s: _Setup, params: dict[str, Tensor]) -> Tensor:
    case = s.case
    if not case.batch:
        if case.form == "dict":
            return s.loss(amaml.functional_call(s.model, params, s.query))
        x, y = s.query
        return s.loss(amaml.functional_call(s.model, params, x), y)
    if (case.form == "pair" and isinstance(s.query[0], Tensor) and not s.entry.dropout):
        x, y = s.query  # one call for every task
        out = amaml.functional_call_batch(s.model, params, x)
        return sum(s.loss(out[b], y[b]) for b in range(case.batch))
    total = 0
    for b in range(case.batch):  # the caller's own loop over tasks
        p_b = {k: v[b] for k, v in params.items()}
        q = task_of(s.query, b)
        total = total + (s.loss(amaml.functional_call(s.model, p_b, q)) if case.form == "dict"
                         else s.loss(amaml.functional_call(s.model, p_b, q[0]), q[1]))
    return total


def _run_amaml(s: _Setup, seed: int) -> dict[str, Tensor]:
    """Adapt (seeded) and return the adapted parameters; ``_Refused`` on a refusal."""
    case = s.case
    _set_mode(s.model, case.mode)
    fn = amaml.adapt_batch if case.batch else amaml.adapt
    torch.manual_seed(seed)
    try:
        return fn(s.model, s.loss, s.support, steps=case.steps, lr=s.lr,
                  memory=_memory(case.memory), optimizer=_amaml_optimizer(case.optimizer),
                  compile=case.compiled)
    except (ValueError, TypeError, RuntimeError) as e:
        raise _Refused("upfront", e) from e


def _amaml_grad(s: _Setup, seed: int) -> Tensor:
    wrt = s.wrt()
    for t in [*s.model.parameters(), *wrt]:
        t.grad = None
    params = _run_amaml(s, seed)
    s.act()
    loss = _query_loss_amaml(s, params)
    try:
        loss.backward()
    except RuntimeError as e:
        raise _Refused("backward", e) from e
    frozen = [n for n, p in s.model.named_parameters() if not p.requires_grad
              and p.grad is not None]
    if frozen:
        raise AssertionError(f"frozen parameters {frozen} received a .grad")
    return torch.cat([(torch.zeros_like(t) if t.grad is None else t.grad).reshape(-1)
                      for t in wrt])


def _reference_grad(s: _Setup, seed: int) -> Tensor:
    """Unrolled autograd; a RuntimeError in its backward is ``_Refused("backward")``."""
    case = s.case
    _set_mode(s.model, case.mode)
    torch.manual_seed(seed)
    B = max(case.batch, 1)
    adapted = []
    for b in range(B):  # every task's inner loop, then the queries (amaml's draw order)
        sup = task_of(s.support, b) if case.batch else s.support
        adapted.append(ref.unrolled(s.model, s.loss, sup, case.form, steps=case.steps,
                                    lr=s.lr, kind=case.optimizer))  # lr[k] if per step
    s.act()
    total = 0
    for b in range(B):
        q = task_of(s.query, b) if case.batch else s.query
        total = total + ref.task_loss(s.model, s.loss, adapted[b], q, case.form)
    try:
        return ref.flat_grad(total, s.wrt())
    except RuntimeError as e:
        raise _Refused("backward", e) from e


def _rel(a: Tensor, b: Tensor) -> float:
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float(a.norm())


def _query_value_amaml(s: _Setup, seed: int) -> float:
    """The query loss after a fresh ``adapt`` (seeded), the caller's action included."""
    params = _run_amaml(s, seed)
    s.act()
    return float(_query_loss_amaml(s, params).detach())


def _query_value_reference(s: _Setup, seed: int) -> float:
    """The same with the unrolled reference's forward pass (no amaml involved)."""
    case = s.case
    _set_mode(s.model, case.mode)
    torch.manual_seed(seed)
    B = max(case.batch, 1)
    adapted = [ref.unrolled(s.model, s.loss, task_of(s.support, b) if case.batch
                            else s.support, case.form, steps=case.steps, lr=s.lr,
                            kind=case.optimizer) for b in range(B)]
    s.act()
    return float(sum(ref.task_loss(s.model, s.loss, adapted[b], task_of(s.query, b)
                                   if case.batch else s.query, case.form).detach()
                     for b in range(B)))


def _fd_check(s: _Setup, seed: int, g: Tensor, value: Any = _query_value_amaml) -> float:
    """Relative error of ``g . d`` against a central difference of ``value`` (the query
    loss after a fresh adapt) at the meta-parameters moved along a random ``d``."""
    wrt = s.wrt()
    gen = torch.Generator().manual_seed(20_000 + s.case.seed)
    d = torch.randn(g.numel(), generator=gen, dtype=torch.float64)
    d = d * _fd_mask(s)
    saved = [t.detach().clone() for t in wrt]
    sizes = [t.numel() for t in wrt]

    def J(eps: float) -> float:
        with torch.no_grad():
            for t, t0, dk in zip(wrt, saved, d.split(sizes)):
                t.copy_(t0 + eps * dk.view_as(t0))
        try:
            return value(s, seed)
        finally:
            with torch.no_grad():
                for t, t0 in zip(wrt, saved):
                    t.copy_(t0)

    gd = float(g @ d)
    # Scale: |g . d|, or |g| |d| / sqrt(P) (its typical size) if that is larger, so that
    # a directional derivative near 0 by chance is not judged relatively.
    scale = max(abs(gd), float(g.norm() * d.norm()) / g.numel() ** 0.5)
    best = float("inf")
    for h in FD_EPS:
        fd = ref.central_difference(J, h)
        best = min(best, abs(fd - gd) / scale if scale > 0 else abs(fd - gd))
        if best <= FD_TOL:
            break
    return best


def reference_fd_error(case: Case) -> float:
    """The reference checked on its own: its meta-gradient against a central difference
    of its own forward pass (no amaml involved). For a case expected exact."""
    s = _Setup(case)
    seed = 1_000 + case.seed
    g = _reference_grad(s, seed)
    return _fd_check(s, seed, g, _query_value_reference)


def _fd_mask(s: _Setup) -> Tensor:
    """1 everywhere but on the padding row of an ``nn.Embedding(padding_idx=...)``: torch
    defines that row's gradient as 0 although the loss reads it (padded positions), so a
    finite difference along it measures what the gradient leaves out by definition."""
    pads = {}
    for m in s.model.modules():
        if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None:
            pads[m.weight] = m.padding_idx
    masks = []
    for t in s.wrt():
        mk = torch.ones_like(t)
        if t in pads:
            mk[pads[t]] = 0
        masks.append(mk.reshape(-1))
    return torch.cat(masks)


def _snapshot(model: torch.nn.Module) -> tuple[list[Tensor], list[bool]]:
    state = [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]
    return state, [m.training for m in model.modules()]


def _unchanged(model: torch.nn.Module, snap: tuple[list[Tensor], list[bool]]) -> bool:
    state, flags = snap
    now = [*model.parameters(), *model.buffers()]
    return (all(torch.equal(a, b) for a, b in zip(state, now))
            and flags == [m.training for m in model.modules()])


def run(case: Case, *, fd: bool = True) -> Result:
    """Run ``case`` through amaml and the reference; classify what happened."""
    t0 = time.perf_counter()
    try:
        res = _run(case, fd=fd)
    except Exception as e:  # noqa: BLE001  # anything unexpected is a failure, named
        res = Result(case, "failed", f"unexpected {type(e).__name__}: {e}"[:500])
    res.seconds = time.perf_counter() - t0
    return res


def _run(case: Case, *, fd: bool) -> Result:
    seed = 1_000 + case.seed
    s = _Setup(case)
    _set_mode(s.model, case.mode)
    snap = _snapshot(s.model)
    try:
        got = _amaml_grad(s, seed)
    except _Refused as r:
        return _classify_refusal(case, s, r, seed)
    # The reference on a fresh setup (same seed: same model, data and masks).
    s_ref = _Setup(case)
    try:
        want = _reference_grad(s_ref, seed)
    except _Refused as r:
        if "modified" not in str(r.exc):
            return Result(case, "failed", f"the reference failed (a bug of the test): {r}"[:500])
        return Result(case, "failed", f"amaml gave a gradient where unrolled autograd "
                      f"refuses ({r}); amaml should refuse too"[:500])
    errors = {"rel_err": _rel(got, want)}
    if not torch.isfinite(got).all():
        return Result(case, "failed", "non-finite meta-gradient", errors)
    if case.action == "none":
        _set_mode(s.model, case.mode)
        if not _unchanged(s.model, snap):
            return Result(case, "failed", "adapt/backward changed the model's parameters, "
                          "buffers or training flags", errors)
    if errors["rel_err"] > EXACT:
        detail = f"meta-gradient rel. error {errors['rel_err']:.2e} > {EXACT:g}"
        blocks = _block_errors(s, got, want)
        if blocks:
            detail += f" (worst: {blocks})"
        if fd and case.form in s.entry.fd_forms:
            try:
                errors["fd_amaml"] = _fd_check(s, seed, got)
                errors["fd_reference"] = _fd_check(s, seed, want)
                detail += (f"; finite difference vs amaml {errors['fd_amaml']:.1e}, vs "
                           f"reference {errors['fd_reference']:.1e}")
                if errors["fd_amaml"] < FD_TOL and s.entry.dropout:
                    detail += (" (amaml is consistent with its own forward pass but drew "
                               "other dropout masks than the reference's seeded loop)")
            except Exception as e:  # noqa: BLE001
                detail += f"; finite difference failed: {type(e).__name__}: {e}"[:200]
        return Result(case, "failed", detail, errors)
    if fd and case.form in s.entry.fd_forms:
        errors["fd"] = _fd_check(s, seed, got)
        if errors["fd"] > FD_TOL:
            return Result(case, "failed", f"exact against unrolled, but the finite difference "
                          f"disagrees: {errors['fd']:.2e} > {FD_TOL:g} (reference and amaml "
                          "wrong alike?)", errors)
    return Result(case, "exact", "", errors)


def _block_errors(s: _Setup, got: Tensor, want: Tensor) -> str:
    names = [*ref.trainable(s.model),
             *(["lr"] if isinstance(s.lr, Tensor) and s.lr.requires_grad else []),
             *(["support"] if s.case.meta == "data" else []),
             *(["w"] if s.w is not None and s.w.requires_grad else [])]
    sizes = [t.numel() for t in s.wrt()]
    errs = [(_rel(a, b), n) for n, a, b in zip(names, got.split(sizes), want.split(sizes))]
    errs.sort(reverse=True)
    return ", ".join(f"{n} {e:.1e}" for e, n in errs[:3])


def _classify_refusal(case: Case, s: _Setup, r: _Refused, seed: int) -> Result:
    msg = str(r.exc)
    if r.where == "upfront":
        if (case.expected == "refused-upfront" and isinstance(r.exc, ValueError)
                and "Norm" in msg and "compile" in msg):
            return Result(case, "refused-upfront", msg[:300])
        return Result(case, "failed", f"unexpected refusal in adapt: {r}"[:500])
    if "modified" in msg and case.expected == "refused-in-backward":
        # Unrolled autograd refuses where it saved the tensor for its backward pass: a
        # buffer between layers, a weight inside the loss's nonlinearity; there it must
        # (else the case does not test what it says). A weight outside (w * loss) it does
        # not save, and amaml, which cannot tell, refuses all the same (its promise).
        s_ref = _Setup(case)
        try:
            _reference_grad(s_ref, seed)
            autograd = "unrolled autograd does not (w * loss: w not saved)"
        except _Refused as rr:
            if "modified" not in str(rr.exc):
                raise
            autograd = "unrolled autograd too"
        if case.inplace == "buffer" or case.weight == "inside":
            if "too" not in autograd:
                return Result(case, "failed", "premise: unrolled autograd should refuse "
                              f"this in-place change but does not; amaml: {msg}"[:500])
        return Result(case, "refused-in-backward", f"{autograd}; amaml: {msg}"[:300])
    return Result(case, "failed", f"unexpected error in backward: {r}"[:500])

