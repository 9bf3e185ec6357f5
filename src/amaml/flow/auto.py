"""What each memory strategy holds, predicted from one step; and :class:`Auto`, which picks.

The memory model (:func:`predict_peak`; ``docs/memory.md`` states it and compares it with
measured peaks). Let ``s`` be the bytes of one kept state (parameters plus the optimiser's
buffers, all tasks), ``g`` the bytes one step's autograd graph saves besides its starting
state (measured on step 0) and ``W = g + 4 s`` one step's working set. The peak of one
meta-gradient beyond what the caller holds anyway is ``N (g + s) + W`` unrolled, ``(N + 1)
s + W`` for store, ``ceil(N / L) s + L (g + s) + W`` for checkpoint with graphs (``L =
sqrt(N s / g)``; without graphs ``g = 0``, ``L = ceil(sqrt(N))``), ``R s + W`` for revolve
(``R <= S + 2`` the states its schedule holds at once), ``T (g + s) + (ceil((N - T) / T) +
1) s + W`` for a Budget keeping ``T`` graphs, ``s + W`` for backsolve.

:class:`Auto` (``memory="auto"``, the default of :func:`amaml.adapt`) takes, within a budget
of bytes, the first that fits of: every step's graph kept (unrolling's speed); the last
``T`` steps' graphs, checkpoints before; checkpoint segments with their graphs; without;
revolve with as many snapshots as fit. Where the step VJP has its own kernel (fused,
compiled), graphs are not used: store, checkpoint, revolve.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..allocator import free_bytes
from .budget import Budget, budget_forward
from .loop import AutogradTape, FlowContext
from .memory import AbstractMemory, Backsolve, Checkpoint, Store
from .revolve import Revolve

__all__ = ["BUDGET_ENV", "Auto", "StepCost", "predict_peak"]

#: The environment variable that sets :class:`Auto`'s budget in MiB (when ``megabytes`` is
#: not given).
BUDGET_ENV = "AMAML_MEMORY_BUDGET_MB"


#: The most bytes of fused tapes ``memory="auto"`` keeps (within the budget): N steps'
#: small tensors, which beyond this cost about what they save. Measured, one
#: meta-gradient, ``Store()`` against ``Store(tapes=True)``: the distillation example's MLP
#: at N = 1000 (56 MiB of tapes) 0.277 s against 0.235 s; the paper's MLP at N = 1000 (95
#: MiB a task) 1.523 s against 1.536 s (5 tasks, ``../shared/bench/peers.py``); the
#: distillation MLP at N = 10,000 (570 MiB) 2.99 s against 3.20 s. (Tapes as measured; the
#: memory model's counts, which include each step's gradient, are 52, 78.5 and 520 MiB:
#: the same side of the cap each.)
TAPES_MAX_BYTES = 64 << 20

#: Beyond :data:`TAPES_MAX_BYTES`, ``memory="auto"`` still keeps the fused tapes (within the
#: budget) where each byte of them saves at least this many floating-point operations of a
#: gradient evaluated again: large layers, whose products cost far more than holding their
#: outputs. Measured (``Store()`` against ``Store(tapes=True)``, fastest of four): the MLP
#: 64-1024-1024-10 with Adam (71 operations a byte, 5.8 MiB of tapes a step) 1.336 s against
#: 1.144 s at N = 40 and 4.03 s against 2.84 s at N = 100; the distillation MLP (10.4 a
#: byte) lost 7% with 570 MiB of tapes, the paper's MLP (8.2 a byte) gained nothing at N =
#: 1000.
TAPES_MIN_FLOPS_PER_BYTE = 32


#: What ``memory="auto"`` multiplies the predicted peak by for the strategies that free
#: autograd graphs and build others in the backward pass (Budget keeping some steps'
#: graphs, checkpoint segments with their graphs): the new graphs do not fill all the holes
#: the old ones left in glibc's heap. Measured over predicted on ResNet-18 (Adam): 1.32
#: (Budget, N = 100), 1.19 (checkpoint, N = 100), 1.11 to 1.24 (Budget, width 32, N =
#: 30); 1.00 there with every large block mapped on its own.
REBUILT_GRAPHS_SLACK = 1.35


@dataclass(frozen=True)
class StepCost:
    """What one step holds, measured on step 0.

    Attributes:
        state: Bytes of one kept state (``z_0``: all rows, all tasks).
        graph: Bytes one step's autograd graph saves besides its starting state (0 where
            not measured).
        kernel: The step VJP's kernel (``"autograd"``, ``"fused"``, ``"compiled"``).
        tape: Bytes one step's kernel record holds (the fused path's tapes; 0 elsewhere).
        tape_flops: Floating-point operations that record saves the step's VJP (0: not
            known).
    """

    state: int
    graph: int
    kernel: str
    tape: int = 0
    tape_flops: int = 0

    @property
    def working_set(self) -> int:
        """``W = g + 4 s``: one step VJP's graph and state, the cotangent in and out, and
        ``u_N`` (calibrated on the 1M-parameter MLP with Adam: store's measured peak is
        1.02-1.10x its prediction with this ``W``)."""
        return self.graph + 4 * self.state


def _checkpoint_segment(memory: Checkpoint, n: int, cost: StepCost) -> tuple[int, bool]:
    graphs = memory.tapes is not False and cost.kernel == "autograd" and n >= 2
    if memory.every is not None or not graphs:
        return memory.segment(n), graphs
    return Checkpoint.taped_segment(n, cost.state, cost.graph), graphs


def predict_peak(memory: AbstractMemory | None, n: int, cost: StepCost,
                 taped: int | None = None) -> int | None:
    """The predicted peak bytes of one meta-gradient (see the module), ``None`` for a
    strategy the model does not know (one defined outside the package).

    Args:
        memory: The strategy; ``None`` means unrolling (every step's graph, no adjoint).
        n: ``N``, the number of steps.
        cost: What one step holds.
        taped: For :class:`~amaml.flow.budget.Budget`, how many graphs it keeps (computed
            from its ``megabytes`` if not given).
    """
    s, g, w = cost.state, cost.graph, cost.working_set
    if memory is None:
        return n * (g + s) + w
    if isinstance(memory, Store):
        return (n + 1) * s + (n * cost.tape if memory.tapes else 0) + w
    if isinstance(memory, Checkpoint):
        seg, graphs = _checkpoint_segment(memory, n, cost)
        return -(-n // seg) * s + seg * (s + (g if graphs else 0)) + w
    if isinstance(memory, Revolve):
        return memory.peak_states(n) * s + w
    if isinstance(memory, Budget):
        if taped is None:
            taped = min(n, int(memory.megabytes * 2**20 // max(g, 1)))
        return _budget_peak(n, taped, cost)
    if isinstance(memory, Backsolve):
        return s + w
    if isinstance(memory, Auto):
        chosen, kept_graphs, _ = memory.choose(n, cost, memory.budget_bytes())
        return predict_peak(chosen, n, cost, kept_graphs)
    return None


def _budget_peak(n: int, taped: int, cost: StepCost) -> int:
    s, g = cost.state, cost.graph
    rest = n - taped
    if taped == 0:
        return predict_peak(Checkpoint(), n, cost) or 0
    every = taped if cost.kernel == "autograd" else max(1, math.isqrt(max(rest, 1) - 1) + 1)
    return taped * (g + s) + (-(-rest // every) + 1) * s + cost.working_set


def _mib(n: float) -> str:
    return f"{n / 2**20:.3g} MiB"


def _env_megabytes() -> float | None:
    raw = os.environ.get(BUDGET_ENV)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{BUDGET_ENV}={raw!r} must be a number of MiB >= 0 (e.g. "
                         f"{BUDGET_ENV}=2048), or unset to use a share of the free memory.")
    return value


@dataclass(frozen=True)
class Auto(AbstractMemory):
    """The fastest exact strategy whose predicted peak fits a memory budget (the default of
    :func:`amaml.adapt`; ``memory="auto"``). Exact.

    On step 0 it measures the bytes of one state and of one step's autograd graph, then
    predicts each strategy's peak (the formulas of :mod:`amaml.flow.auto`) and takes, in
    this order, the first that fits: every step's graph kept (unrolling's speed), the last
    steps' graphs (:class:`~amaml.flow.budget.Budget`), checkpoint segments with their
    graphs, checkpoint without, :class:`~amaml.flow.revolve.Revolve` with as many snapshots
    as fit. On the fused MLP path and with compiled steps, where the step VJP does not use
    a graph: store, checkpoint, revolve. :func:`amaml.explain` says which and why.

    Args:
        megabytes: The budget in MiB for what the meta-gradient holds. ``None`` (default):
            the environment variable ``AMAML_MEMORY_BUDGET_MB`` if set, else ``share`` of
            the memory free on the device when the forward pass starts (CPU:
            ``MemAvailable`` plus the process's free heap; CUDA: ``torch.cuda.mem_get_info``
            plus torch's unused cache).
        share: The share of the free memory used when no budget is given, in (0, 1].

    Note:
        The budget is per call. Tasks adapted one after another whose results wait for one
        ``backward`` each see the memory the earlier ones left (free memory is read at each
        call), so with the default share they fit together; a fixed ``megabytes`` is per task.
    """

    megabytes: float | None = None
    share: float = 0.5
    name: str = field(default="auto", init=False)

    def __post_init__(self) -> None:
        m = self.megabytes
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float))
                              or not math.isfinite(m) or m < 0):
            raise ValueError(f"Auto(megabytes=...) must be None or a finite number >= 0; got "
                             f"{m!r}.")
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) \
                or not 0 < self.share <= 1:
            raise ValueError(f"Auto(share=...) must be a number in (0, 1]; got {self.share!r}.")

    def budget_bytes(self, device: torch.device | None = None) -> tuple[int, str]:
        """The budget in bytes and where it comes from, in words."""
        if self.megabytes is not None:
            return int(self.megabytes * 2**20), f"Auto(megabytes={self.megabytes:g})"
        env = _env_megabytes()
        if env is not None:
            return int(env * 2**20), f"{BUDGET_ENV}={env:g}"
        dev = device if device is not None else torch.device("cpu")
        free = free_bytes(dev)
        if free is None:  # unknown device: as if 4 GiB were free
            free = 4 << 30
        where = "MemAvailable and free heap" if dev.type == "cpu" else f"free on {dev}"
        return int(self.share * free), f"{self.share:g} x {_mib(free)} {where}"

    @staticmethod
    def choose(n: int, cost: StepCost, budget: tuple[int, str]
               ) -> tuple[AbstractMemory, int | None, str]:
        """``(strategy, graphs kept for Budget or None, why)`` for ``n`` steps."""
        limit, source = budget
        mib = 2**20

        def fits(memory: AbstractMemory, taped: int | None = None, slack: float = 1.0
                 ) -> tuple[bool, int]:
            peak = predict_peak(memory, n, cost, taped) or 0
            return peak * slack <= limit, peak

        def why(what: str, peak: int, slack: float = 1.0) -> str:
            room = "" if slack == 1.0 else f", x{slack:g} for the heap's slack,"
            return (f"{what}: predicted peak {_mib(peak)}{room} within the budget "
                    f"{_mib(limit)} ({source})")

        if cost.kernel == "autograd":
            whole = Budget(megabytes=n * cost.graph / mib)
            ok, peak = fits(whole, n)
            if ok:
                return whole, n, why("every step's graph kept (unrolling's speed)", peak)
            seg = Checkpoint.taped_segment(n, cost.state, cost.graph)
            lo, hi = seg, n - 1  # the largest T >= seg that fits (the peak grows with T)
            best = None
            slack = REBUILT_GRAPHS_SLACK
            while lo <= hi:
                mid = (lo + hi) // 2
                if fits(whole, mid, slack)[0]:
                    best, lo = mid, mid + 1
                else:
                    hi = mid - 1
            if best is not None:
                part = Budget(megabytes=best * cost.graph / mib)
                return part, best, why(f"the last {best} steps' graphs kept, checkpoints "
                                       "before", fits(part, best)[1], slack)
            ok, peak = fits(Checkpoint(), None, slack)
            if ok:
                return Checkpoint(), None, why("checkpoint segments recomputed with their "
                                               "graphs", peak, slack)
            candidates: list[tuple[AbstractMemory, str]] = [
                (Checkpoint(tapes=False), "checkpoint segments recomputed without graphs")]
        else:
            candidates = [(Store(), f"every state stored (the {cost.kernel} kernel's VJPs)"),
                          (Checkpoint(), "checkpoint segments recomputed")]
            if 0 < n * cost.tape <= TAPES_MAX_BYTES or (
                    cost.tape > 0 and cost.tape_flops >= TAPES_MIN_FLOPS_PER_BYTE * cost.tape):
                candidates.insert(0, (Store(tapes=True), "every state and every step's fused "
                                      "tapes stored (no gradient evaluated twice)"))
        for memory, what in candidates:
            ok, peak = fits(memory)
            if ok:
                return memory, None, why(what, peak)
        # The schedule holds at most snapshots + 2 states: start there, step down.
        snapshots = int(max(1, min((limit - cost.working_set) // max(cost.state, 1) - 1, n)))
        memory = Revolve(snapshots=snapshots)
        ok, peak = fits(memory)
        while not ok and snapshots > 1:
            snapshots -= 1
            memory = Revolve(snapshots=snapshots)
            ok, peak = fits(memory)
        what = f"revolve with {snapshots} snapshot" + ("s" if snapshots > 1 else "")
        if ok:
            return memory, None, why(what, peak)
        return memory, None, (f"{what}: the least memory of the exact strategies, predicted "
                              f"peak {_mib(peak)}, over the budget {_mib(limit)} ({source})")

    def measure(self, flow: FlowContext) -> tuple[StepCost, Tensor, Tensor,
                                                   AutogradTape | None]:
        """Step 0's cost: ``(cost, z_0, z_1 or z_0, step 0's graph or None)``; step 0 is
        taken with its graph only where the VJPs use graphs (the autograd kernel)."""
        z0 = flow.initial_state()
        state = z0.numel() * z0.element_size()
        kernel = flow.choice.name
        if kernel != "autograd" or flow.n_steps < 1:
            record = flow.tape_numel() * z0.element_size()
            return StepCost(state, 0, kernel, record, flow.tape_flops()), z0, z0, None
        z1, tape = flow.tape_step(z0, 0)
        return StepCost(state, tape.nbytes(), kernel), z0, z1, tape

    def describe(self, flow: FlowContext) -> str:
        cost, *_ = self.measure(flow)
        _, _, reason = self.choose(flow.n_steps, cost, self.budget_bytes(flow.theta.device))
        return f"auto: {reason}"

    def forward(self, flow: FlowContext) -> tuple[Tensor, Tensor]:
        cost, z0, z1, tape = self.measure(flow)
        memory, taped, reason = self.choose(flow.n_steps, cost,
                                            self.budget_bytes(flow.theta.device))
        flow.carry["auto"] = memory
        flow.carry["auto_why"] = reason
        if tape is None:
            return memory.forward(flow)
        if isinstance(memory, Budget) and taped is not None:
            return budget_forward(flow, z0, z1, tape, taped)
        if isinstance(memory, Checkpoint) and memory.graphs(flow) and flow.n_steps >= 2:
            return memory.forward_taken(flow, z0, z1, tape)
        del tape  # revolve or checkpoint without graphs: step 0 is taken again
        return memory.forward(flow)

    def sweep(self, flow: FlowContext, kept: Tensor, lam: Tensor) -> Tensor:
        memory: AbstractMemory = flow.carry["auto"]
        return memory.sweep(flow, kept, lam)


def memory_lines(flow: FlowContext, memory: AbstractMemory) -> list[str]:
    """:func:`amaml.explain`'s lines on memory: the strategy (for :class:`Auto`, its choice
    and why), what step 0 holds (measured: one step taken with its graph), and the predicted
    peak of each strategy and of unrolling."""
    z0 = flow.initial_state()
    state = z0.numel() * z0.element_size()
    kernel = flow.choice.name
    _, tape = flow.tape_step(z0, 0)
    cost = StepCost(state, tape.nbytes(), kernel)
    del tape
    # Auto weighs graphs only where the VJPs use them (what its forward pass measures).
    seen = cost if kernel == "autograd" else StepCost(
        state, 0, kernel, flow.tape_numel() * z0.element_size(), flow.tape_flops())
    n, mib = flow.n_steps, 2**20
    if isinstance(memory, Auto):
        chosen, taped, reason = Auto.choose(n, seen, memory.budget_bytes(flow.theta.device))
        head = f"memory: auto: {reason}"
        auto_peak = predict_peak(chosen, n, seen, taped)  # the figure its reason gives
    else:
        head = f"memory: {memory.describe(flow)}"
        auto_memory = Auto()
        chosen, taped, _ = Auto.choose(n, seen, auto_memory.budget_bytes(flow.theta.device))
        auto_peak = predict_peak(chosen, n, seen, taped)
    peaks = {"unrolled": predict_peak(None, n, cost), "store": predict_peak(Store(), n, cost),
             "checkpoint": predict_peak(Checkpoint(), n, cost),
             "revolve": predict_peak(Revolve(), n, cost), "auto": auto_peak}
    if not isinstance(memory, (Auto, Store, Revolve)) and not (
            isinstance(memory, Checkpoint) and memory == Checkpoint()):
        peaks[memory.name] = predict_peak(memory, n, cost)
    known = ", ".join(f"{k} {v / mib:.4g}" for k, v in peaks.items() if v is not None)
    return [head,
            f"memory model: a state {_mib(state)}, one step's graph {_mib(cost.graph)} "
            f"(measured on step 0), working set {_mib(cost.working_set)}",
            f"predicted peak (MiB, {n} steps): {known}"]
