"""A meta-batch batched or one task after another: whichever one step measures faster.

:func:`amaml.adapt_batch` (``tasks="auto"``) can compute its ``B`` tasks as one batched
computation (tasks folded into channels, or :func:`torch.func.vmap`) or as a loop of
single tasks. Which is faster depends on the model and the device. On this project's CPU
(one thread), ten Adam steps of a ResNet-18 over 3 tasks under checkpoint took 28.4 s
under vmap and 19.5 s as a loop, while a Conv-4 of 32 channels over 4 tasks took 0.36 s
folded and 0.45 s as a loop. A rule would be wrong somewhere, so :func:`race` measures:
once per model shape, what a step of the inner loop does most of (the loss's gradient,
then its gradient with a graph and one Hessian-vector product through it), both ways; it
keeps the faster. The result is cached by the model's structure, the shapes, dtypes and
device of its parameters and data and the batched form, so a meta-training loop pays it
at its first meta-batch only (under a tenth of a second on Conv-4, about 5 s on
ResNet-18). Both ways compute the same numbers (to round-off); ``tasks="batched"`` or
``"loop"`` fix the choice.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from ._types import FlatLoss
from .flow.objective import BatchedLoss, Objective

__all__ = ["Race", "race", "race_key", "race_tasks"]

#: Rounds of the race after a warm-up of each side (the fastest round counts): at least
#: ``MIN_ROUNDS``, more while the race has taken less than ``ENOUGH_S`` seconds.
MIN_ROUNDS, MAX_ROUNDS, ENOUGH_S = 1, 8, 0.25
#: The loop must be this much faster per step to win: it also pays, per task, the fixed
#: cost of a call of ``adapt`` (the plan, the memory model's measured step 0, the checks;
#: on Conv-4 at 5 images about one step's time a task), which the race does not time.
MARGIN = 0.95

_Folded = TypeVar("_Folded", bound=BatchedLoss)

_CACHE: OrderedDict[Hashable, Race] = OrderedDict()
_CACHE_SIZE = 64


class Race(NamedTuple):
    """One measured race: seconds of one step's work for the whole meta-batch each way."""

    batched_s: float
    loop_s: float

    @property
    def loop(self) -> bool:
        """Whether the loop of tasks won (by :data:`MARGIN`; a tie goes to the batched
        form)."""
        return self.loop_s < MARGIN * self.batched_s

    def describe(self, batched: str) -> str:
        """The figures in words, for :func:`amaml.explain`."""
        return (f"measured one step: {batched} {1e3 * self.batched_s:.3g} ms, a loop of "
                f"tasks {1e3 * self.loop_s:.3g} ms")


def race_key(model: nn.Module, theta: Tensor, data: Sequence[Tensor], form: str
             ) -> Hashable:
    """What a race's result depends on: the model's modules in order (type and settings:
    a convolution's stride is in its ``extra_repr``), the flat parameters' and the data's
    shapes, dtypes and device, and the batched form."""
    modules = tuple((type(m).__qualname__, m.extra_repr()) for m in model.modules())
    tensors = tuple((tuple(t.shape), t.dtype, t.device) for t in (theta, *data))
    return modules, tensors, form


def race(key: Hashable, single: FlatLoss, batched: FlatLoss, theta: Tensor,
         data: Sequence[Tensor]) -> Race:
    """Time one step's work of the meta-batch ``data`` (each tensor ``[B, ...]``) both ways,
    from the flat parameters ``theta`` ``(P,)``: ``batched`` evaluates all tasks at once
    (a :class:`~amaml.flow.objective.BatchedLoss` or a loss that ``vmap`` batches),
    ``single`` one task. Cached under ``key`` (:func:`race_key`)."""
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    tasks = data[-1].shape[0]
    data = [d.detach() for d in data]
    u = theta.detach().expand(tasks, *theta.shape).contiguous()
    whole, one = Objective(batched, batched=True), Objective(single)

    def batched_step() -> None:
        _step(whole, u, data)

    def loop_step() -> None:
        for b in range(tasks):
            _step(one, u[b], [d[b] for d in data])

    sync = torch.cuda.synchronize if theta.device.type == "cuda" else _nothing
    best = [float("inf"), float("inf")]
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[theta.device] if theta.device.type == "cuda" else []):
        for r in range(MAX_ROUNDS + 1):
            if r > MIN_ROUNDS and time.perf_counter() - start > ENOUGH_S:
                break
            for i, fn in enumerate((batched_step, loop_step)):
                t0 = time.perf_counter()
                fn()
                sync()
                if r:  # the first round warms up both sides
                    best[i] = min(best[i], time.perf_counter() - t0)
    out = Race(best[0], best[1])
    _CACHE[key] = out
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return out


def race_tasks(model: nn.Module, single: FlatLoss, folded: _Folded | None, theta: Tensor,
               data: Sequence[Tensor], how: str) -> tuple[_Folded | None, bool, str]:
    """:func:`amaml.adapt_batch`'s choice under ``tasks="auto"`` where batching is exact:
    ``(folded loss or None, one task after another?, why)``, ``how`` saying what the
    batched form is (tasks folded into channels when ``folded`` is given, else vmap)."""
    form = "folded into channels" if folded is not None else "batched by vmap"
    won = race(race_key(model, theta, data, form), single,
               folded if folded is not None else single, theta, data)
    if won.loop:
        return None, True, f"tasks one after another (faster than {form}: {won.describe(form)})"
    return folded, False, f"{how}; {won.describe(form)}"


def _step(objective: Objective, u: Tensor, data: Sequence[Tensor]) -> None:
    """What a step of the inner loop does most of: the forward pass's gradient (no graph),
    then the step's VJP, the gradient again with its graph and one Hessian-vector product
    through it."""
    objective.grad(u, data)
    hvp: Callable[[Tensor], Tensor] = objective.hessian(u, data)
    hvp(torch.ones_like(u))


def _nothing() -> None:
    return None
