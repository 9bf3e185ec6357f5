"""How ``d u(T) / d theta`` is computed: adjoints and memory strategies.

The forward map is ``N`` unit steps ``u_{k+1} = Phi(u_k) = step(F, u_k)`` of an
explicit Runge-Kutta solver on ``F(u) = -eta * (grad L(u) + mu (u - theta))``,
``u_0 = theta``. Given the cotangent ``lam_N = dJ/du_N`` the exact discrete adjoint is

    lam_k = (dPhi/du (u_k))^T lam_{k+1}
    dJ/dp = sum_k (dPhi/dp (u_k))^T lam_{k+1}      for p in (theta, eta, mu)
    dJ/dtheta += lam_0                              (through u_0 = theta)

Each term is the vector-Jacobian product of one solver step, computed by
differentiating ``step`` itself with autograd (Hessian-vector products by double
backward; no Hessian is formed, no graph outlives one step). With
:class:`~amaml.flow.solvers.Euler` this is, to round-off, the gradient of ``N``
unrolled steps of gradient descent, i.e. second-order MAML.

Adjoints (what to compute):
    :class:`Unrolled` (MAML: autograd through the whole loop, memory O(N)),
    :class:`FirstOrder` (FOMAML: identity Jacobian),
    :class:`DiscreteAdjoint` (A-MAML, exact for the discrete loop),
    :class:`Implicit` (iMAML: ``(I + H/mu)^{-1}`` by conjugate gradients).

Memory strategies for :class:`DiscreteAdjoint` (how to get the states back):
    :class:`Store` (all N+1 states), :class:`Checkpoint` (every k-th state,
    segments recomputed; about ``2 sqrt(N)`` states), :class:`Backsolve` (only
    ``u_N``; the state is integrated backward with ``lam``; approximate).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .compiled import StepFunctions, compile_mode
from .hvp import Objective, conjugate_gradient, make_field
from .solvers import AbstractSolver

__all__ = [
    "AbstractAdjoint",
    "AbstractMemory",
    "Backsolve",
    "BacksolveError",
    "Checkpoint",
    "DiscreteAdjoint",
    "DivergenceError",
    "FirstOrder",
    "FlowSpec",
    "Implicit",
    "Revolve",
    "Store",
    "SweepStats",
    "Unrolled",
    "adjoint_sweep",
    "integrate",
    "MEMORIES",
]


class DivergenceError(FloatingPointError):
    """The inner trajectory became non-finite (the learning rate is too large for the flow).

    Attributes:
        step: The first step (1-based) after which the parameters were non-finite.
        n_steps: The number of steps asked for.
    """

    def __init__(self, step: int, n_steps: int, detail: str = "") -> None:
        self.step = step
        self.n_steps = n_steps
        super().__init__(
            f"The inner loop diverged: the parameters became non-finite at step {step} of "
            f"{n_steps}{detail}. Use a smaller inner learning rate (lr) or fewer steps."
        )


class BacksolveError(RuntimeError):
    """Backsolve could not reconstruct the initial state: its gradient is untrustworthy."""


# ----------------------------------------------------------------------------- memory


class AbstractMemory(abc.ABC):
    """How the discrete adjoint gets the forward states ``u_k`` back."""

    name: str = "abstract"


@dataclass(frozen=True)
class Store(AbstractMemory):
    """Keep all ``N + 1`` states: ``(N + 1) x P`` numbers, no recomputation."""

    name: str = field(default="store", init=False)


@dataclass(frozen=True)
class Checkpoint(AbstractMemory):
    """Keep every ``every``-th state; recompute each segment in the backward pass.

    Args:
        every: Segment length; ``None`` picks ``ceil(sqrt(N))``, which holds at most
            about ``2 sqrt(N)`` states at once for one extra forward pass. Exact.
    """

    every: int | None = None
    name: str = field(default="checkpoint", init=False)

    def __post_init__(self) -> None:
        if self.every is not None and (not isinstance(self.every, int) or self.every < 1):
            raise ValueError(f"Checkpoint(every=...) must be a positive int; got {self.every!r}.")

    def segment(self, n_steps: int) -> int:
        """The segment length used for ``n_steps`` steps."""
        return self.every if self.every is not None else max(1, math.isqrt(n_steps - 1) + 1)


@dataclass(frozen=True)
class Revolve(AbstractMemory):
    """Binomial checkpointing: at most ``snapshots + 1`` states, whatever ``N``.

    The schedule of Griewank's *revolve*: with ``s`` snapshots, ``N`` steps are reversed
    with each step recomputed at most ``t`` times, where ``t`` is the smallest integer with
    ``C(s + t, s) >= N`` (20 snapshots: ``t = 2`` for 100 steps, 3 for 1000, 4 for 10000).
    Memory stays constant as ``N`` grows; time grows by the recomputations. Exact.

    Args:
        snapshots: States held besides the one being differentiated, >= 1.
    """

    snapshots: int = 20
    name: str = field(default="revolve", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.snapshots, int) or isinstance(self.snapshots, bool) \
                or self.snapshots < 1:
            raise ValueError(f"Revolve(snapshots=...) must be an int >= 1; got "
                             f"{self.snapshots!r}.")

    @staticmethod
    def repetitions(snapshots: int, n_steps: int) -> int:
        """The smallest ``t`` with ``C(snapshots + t, snapshots) >= n_steps``."""
        t = 0
        while math.comb(snapshots + t, snapshots) < n_steps:
            t += 1
        return t


@dataclass(frozen=True)
class Backsolve(AbstractMemory):
    """Keep only ``u_N``; integrate the state backward together with ``lam``.

    O(1) states, but the gradient is approximate (its error is O(dt**order) at a
    fixed horizon), and running gradient flow backward is gradient *ascent*,
    unstable on long non-convex horizons. The reconstructed ``u_0`` is compared
    with ``theta`` (which is known); a relative error above ``tol`` raises
    :class:`BacksolveError` rather than returning a wrong gradient.

    Args:
        tol: Largest accepted ``||u_0_reconstructed - theta|| / ||theta||``.
    """

    tol: float = 1e-2
    name: str = field(default="backsolve", init=False)

    def __post_init__(self) -> None:
        if not (self.tol > 0):
            raise ValueError(f"Backsolve(tol=...) must be positive; got {self.tol!r}.")


#: Registered memory strategy names.
MEMORIES: dict[str, type[AbstractMemory]] = {
    "store": Store,
    "checkpoint": Checkpoint,
    "revolve": Revolve,
    "backsolve": Backsolve,
}


# ----------------------------------------------------------------------------- adjoints


class AbstractAdjoint(abc.ABC):
    """What ``d u(T) / d (theta, lr, mu)`` the flow provides."""


@dataclass(frozen=True)
class Unrolled(AbstractAdjoint):
    """Back-propagate through every unrolled step (second-order MAML). Memory O(N)."""


@dataclass(frozen=True)
class FirstOrder(AbstractAdjoint):
    """Treat ``d u(T) / d theta`` as the identity (first-order MAML). No Hessians."""


@dataclass(frozen=True)
class DiscreteAdjoint(AbstractAdjoint):
    """The exact adjoint of the discrete solver (A-MAML), under a memory strategy.

    Args:
        memory: How the states are kept: :class:`Store`, :class:`Checkpoint` (default)
            or :class:`Backsolve`.
        compile: Run each solver step and its vector-Jacobian product as functions
            compiled by :func:`torch.compile` (see :mod:`amaml.flow.compiled`): the same
            gradient, several times faster on small models, after a one-off compilation
            of tens of seconds per model, loss and data shape. A string picks the
            ``torch.compile`` mode (:data:`amaml.flow.compiled.COMPILE_MODES`), e.g.
            ``"reduce-overhead"`` for CUDA graphs on a GPU.
    """

    memory: AbstractMemory = field(default_factory=Checkpoint)
    compile: bool | str = False

    def __post_init__(self) -> None:
        compile_mode(self.compile)  # raises on a bad value


@dataclass(frozen=True)
class Implicit(AbstractAdjoint):
    """iMAML's implicit gradient ``(I + H(u_N)/mu)^{-1} lam_N``, by conjugate gradients.

    Valid when ``u_N`` minimises ``L(u) + mu/2 ||u - theta||^2`` (needs ``mu > 0``).
    It gives no gradient for the learning rate or ``mu``.

    Args:
        cg_steps: Maximum CG iterations (Hessian-vector products).
        cg_tol: Relative residual at which CG stops.
    """

    cg_steps: int = 20
    cg_tol: float = 1e-10

    def __post_init__(self) -> None:
        if not isinstance(self.cg_steps, int) or self.cg_steps < 1:
            raise ValueError(
                f"Implicit(cg_steps=...) must be a positive int; got {self.cg_steps!r}."
            )


# ----------------------------------------------------------------------------- integration


@dataclass(frozen=True)
class FlowSpec:
    """Everything non-tensor about one flow: passed through the autograd Function."""

    objective: Objective
    solver: AbstractSolver
    adjoint: AbstractAdjoint
    n_steps: int
    has_mu: bool
    compiled: StepFunctions | None = None


@dataclass
class SweepStats:
    """Bookkeeping of one adjoint sweep, for tests and benchmarks."""

    peak_states: int = 0
    recomputed_steps: int = 0


def _initial_state(theta: Tensor, objective: Objective, data: Sequence[Tensor]) -> Tensor:
    if objective.batched:
        return theta.expand(data[0].shape[0], *theta.shape).contiguous()
    return theta


def _check_every(n_steps: int) -> int:
    return max(1, math.isqrt(n_steps))


def _locate_divergence(
    spec: FlowSpec, field_fn: Any, u: Tensor, start: int, stop: int
) -> DivergenceError:
    """Replay steps ``start..stop`` from the last finite state to name the first bad one."""
    for k in range(start, stop):
        u = spec.solver.step(field_fn, u)
        if not bool(torch.isfinite(u).all()):
            return DivergenceError(k + 1, spec.n_steps, f" (solver {spec.solver.name})")
    return DivergenceError(stop, spec.n_steps, f" (solver {spec.solver.name})")


def integrate(
    spec: FlowSpec,
    theta: Tensor,
    eta: Tensor,
    mu: Tensor | None,
    data: Sequence[Tensor],
    *,
    keep_every: int | None = None,
    create_graph: bool = False,
    u0: Tensor | None = None,
    start: int = 0,
    stop: int | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Integrate the flow from step ``start`` (state ``u0``) to ``stop``.

    Args:
        keep_every: Keep the state at every step ``k`` with ``(k - start) % keep_every == 0``
            and ``k < stop`` (``1`` keeps all but the last; ``None`` keeps none).
        create_graph: Build the autograd graph of every step (unrolled MAML).
        out: Optional buffer with one row per kept state (no graph): the kept states
            are written into it, so that stacking them later needs no second copy.

    Returns:
        ``(u_stop, kept_states)`` (with ``out``, the kept states are rows of ``out``).

    Raises:
        DivergenceError: If the state becomes non-finite; names the first bad step.
    """
    stop = spec.n_steps if stop is None else stop
    field_fn = make_field(spec.objective, data, theta, eta, mu, create_graph)
    u = _initial_state(theta, spec.objective, data) if u0 is None else u0
    kept: list[Tensor] = []
    every = _check_every(spec.n_steps)
    last_ok, last_ok_k = u, start
    fast = None if create_graph else spec.compiled
    consts = (theta.detach(), eta.detach(), None if mu is None else mu.detach())
    for k in range(start, stop):
        if keep_every is not None and (k - start) % keep_every == 0:
            if out is not None:
                row = out[len(kept)]
                row.copy_(u)
                u = row
            kept.append(u)
        u_next = None if fast is None else fast.step(u, *consts, data)
        if u_next is None:
            fast = None
            u_next = spec.solver.step(field_fn, u)
        u = u_next
        if (k + 1 - start) % every == 0 or k + 1 == stop:
            if not bool(torch.isfinite(u).all()):
                replay = make_field(spec.objective, data, theta.detach(), eta.detach(),
                                    None if mu is None else mu.detach(), False)
                raise _locate_divergence(spec, replay, last_ok.detach(), last_ok_k, k + 1)
            last_ok, last_ok_k = u, k + 1
    return u, kept


# ----------------------------------------------------------------------------- step VJPs


def _leaves(
    theta: Tensor, eta: Tensor, mu: Tensor | None, need: tuple[bool, bool, bool]
) -> tuple[Tensor, Tensor, Tensor | None, list[Tensor]]:
    """Detached copies of the parameters; those whose gradient is needed require grad."""
    th = theta.detach().requires_grad_(need[0] and mu is not None)
    et = eta.detach().requires_grad_(need[1])
    m = None if mu is None else mu.detach().requires_grad_(need[2])
    params = [t for t in (th, et, m) if t is not None and t.requires_grad]
    return th, et, m, params


def _accumulate(bars: dict[str, Tensor], names: list[str], grads: Sequence[Tensor | None]) -> None:
    for name, g in zip(names, grads):
        if g is None:
            continue
        bars[name] = g if name not in bars else bars[name] + g


def _param_names(th: Tensor, et: Tensor, m: Tensor | None) -> list[str]:
    names = []
    if th.requires_grad:
        names.append("theta")
    if et.requires_grad:
        names.append("eta")
    if m is not None and m.requires_grad:
        names.append("mu")
    return names


def _step_vjp(
    spec: FlowSpec,
    u: Tensor,
    lam: Tensor,
    theta: Tensor,
    eta: Tensor,
    mu: Tensor | None,
    data: Sequence[Tensor],
    need: tuple[bool, bool, bool],
    bars: dict[str, Tensor],
) -> Tensor:
    """``(dPhi/du)^T lam``; adds ``(dPhi/dp)^T lam`` for the needed parameters to ``bars``."""
    if spec.compiled is not None:
        res = spec.compiled.vjp(u.detach(), lam, theta.detach(), eta.detach(),
                                None if mu is None else mu.detach(), data, need)
        if res is not None:
            lam_u, pbars = res
            _accumulate(bars, list(pbars), list(pbars.values()))
            return lam_u
    th, et, m, params = _leaves(theta, eta, mu, need)
    with torch.enable_grad():
        u = u.detach().requires_grad_(True)
        field_fn = make_field(spec.objective, data, th, et, m, create_graph=True)
        u_next = spec.solver.step(field_fn, u)
        grads = torch.autograd.grad(u_next, [u, *params], lam)
    _accumulate(bars, _param_names(th, et, m), grads[1:])
    return grads[0]


# ----------------------------------------------------------------------------- sweeps


def _sweep_stored(
    spec: FlowSpec, states: Tensor, lam: Tensor, theta: Tensor, eta: Tensor,
    mu: Tensor | None, data: Sequence[Tensor], need: tuple[bool, bool, bool],
    bars: dict[str, Tensor], stats: SweepStats,
) -> Tensor:
    stats.peak_states = max(stats.peak_states, states.shape[0])
    for k in range(spec.n_steps - 1, -1, -1):
        lam = _step_vjp(spec, states[k], lam, theta, eta, mu, data, need, bars)
    return lam


def _sweep_checkpointed(
    spec: FlowSpec, memory: Checkpoint, ckpts: Tensor, lam: Tensor, theta: Tensor,
    eta: Tensor, mu: Tensor | None, data: Sequence[Tensor], need: tuple[bool, bool, bool],
    bars: dict[str, Tensor], stats: SweepStats,
) -> Tensor:
    every = memory.segment(spec.n_steps)
    for j in range(ckpts.shape[0] - 1, -1, -1):
        start = j * every
        stop = min(start + every, spec.n_steps)
        # States start..stop-1 of this segment, recomputed from its checkpoint.
        u_last, seg = integrate(spec, theta, eta, mu, data, keep_every=1,
                                u0=ckpts[j], start=start, stop=stop - 1)
        seg.append(u_last)
        stats.recomputed_steps += stop - 1 - start
        stats.peak_states = max(stats.peak_states, ckpts.shape[0] + len(seg) - 1)
        for k in range(stop - 1, start - 1, -1):
            lam = _step_vjp(spec, seg[k - start], lam, theta, eta, mu, data, need, bars)
        del seg
    return lam


def _sweep_revolve(
    spec: FlowSpec, memory: Revolve, u0: Tensor, lam: Tensor, theta: Tensor, eta: Tensor,
    mu: Tensor | None, data: Sequence[Tensor], need: tuple[bool, bool, bool],
    bars: dict[str, Tensor], stats: SweepStats,
) -> Tensor:
    held = [1]  # states alive now: u0 (the caller's), then one per open recursion level
    # The cotangent lives in one box, not in the recursion's frames: a frame that passed
    # ``lam`` down would otherwise keep that stale vector alive until it returns.
    box = [lam]

    def advance(u: Tensor, start: int, stop: int) -> Tensor:
        if stop == start:
            return u
        stats.recomputed_steps += stop - start
        u_stop, _ = integrate(spec, theta, eta, mu, data, u0=u, start=start, stop=stop)
        return u_stop

    def vjp(u: Tensor) -> None:
        box[0] = _step_vjp(spec, u, box[0], theta, eta, mu, data, need, bars)

    def reverse(a: int, u_a: Tensor, b: int, free: int) -> None:
        # Reverse steps a .. b-1 holding u_a, with ``free`` more states allowed.
        while b - a > 1 and free == 0:  # no room: recompute each state from u_a
            held[0] += 1
            stats.peak_states = max(stats.peak_states, held[0])
            vjp(advance(u_a, a, b - 1))
            held[0] -= 1
            b -= 1
        if b - a == 1:
            vjp(u_a)
            return
        t = Revolve.repetitions(free, b - a)
        m = a + max(1, min(b - a - 1, math.comb(free + t - 1, free)))
        held[0] += 1
        stats.peak_states = max(stats.peak_states, held[0])
        reverse(m, advance(u_a, a, m), b, free - 1)  # u_m dies when this returns
        held[0] -= 1
        reverse(a, u_a, m, free)

    stats.peak_states = max(stats.peak_states, 1)
    del lam
    reverse(0, u0, spec.n_steps, memory.snapshots)
    return box[0]


def _sweep_backsolve(
    spec: FlowSpec, memory: Backsolve, u_end: Tensor, lam: Tensor, theta: Tensor,
    eta: Tensor, mu: Tensor | None, data: Sequence[Tensor], need: tuple[bool, bool, bool],
    bars: dict[str, Tensor], stats: SweepStats,
) -> Tensor:
    th, et, m, params = _leaves(theta, eta, mu, need)
    names = _param_names(th, et, m)

    def augmented(z: Sequence[Tensor]) -> list[Tensor]:
        # Reverse time tau = N - s: du/dtau = -F(u), dlam/dtau = J_F(u)^T lam,
        # d(bar_p)/dtau = (dF/dp)^T lam.
        with torch.enable_grad():
            u = z[0].detach().requires_grad_(True)
            f = make_field(spec.objective, data, th, et, m, create_graph=True)(u)
            grads = torch.autograd.grad(f, [u, *params], z[1])
        return [-f.detach(), *grads]

    zero_bars = [torch.zeros_like(p) for p in params]
    z: list[Tensor] = [u_end.detach(), lam, *zero_bars]
    stats.peak_states = max(stats.peak_states, 1)
    check = _check_every(spec.n_steps)
    for k in range(spec.n_steps):
        z = spec.solver.step_tuple(augmented, z)
        if (k + 1) % check == 0 and not bool(torch.isfinite(z[0]).all()):
            break
    u0 = _initial_state(theta.detach(), spec.objective, data)
    err = float((z[0] - u0).norm() / u0.norm().clamp_min(torch.finfo(u0.dtype).tiny))
    if not math.isfinite(err) or err > memory.tol or not bool(torch.isfinite(z[1]).all()):
        raise BacksolveError(
            f"Backsolve failed to reconstruct the initial parameters: relative error {err:.3g} "
            f"> tol={memory.tol:g} after integrating {spec.n_steps} steps backward (gradient "
            f"flow run backward is unstable on long horizons). Its gradient would be wrong; "
            f"use memory='checkpoint' (exact, O(sqrt(steps)) memory) instead."
        )
    _accumulate(bars, names, z[2:])
    return z[1]


def _sweep_implicit(
    spec: FlowSpec, adjoint: Implicit, u_end: Tensor, lam: Tensor, mu: Tensor,
    data: Sequence[Tensor],
) -> Tensor:
    objective = spec.objective
    mu_d = mu.detach()
    with torch.enable_grad():
        u = u_end.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(objective.total(u, data), u, create_graph=True)

        def matvec(v: Tensor) -> Tensor:
            (hv,) = torch.autograd.grad(g, u, v, retain_graph=True)
            return v + hv / mu_d

        return conjugate_gradient(matvec, lam, max_iter=adjoint.cg_steps, tol=adjoint.cg_tol,
                                  batched=objective.batched)


def adjoint_sweep(
    spec: FlowSpec,
    kept: Tensor,
    lam: Tensor,
    theta: Tensor,
    eta: Tensor,
    mu: Tensor | None,
    data: Sequence[Tensor],
    need: tuple[bool, bool, bool] = (True, False, False),
    stats: SweepStats | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The backward pass: from ``lam = dJ/du_N`` to ``(dJ/dtheta, dJ/deta, dJ/dmu)``.

    Args:
        spec: The flow (its adjoint must be :class:`DiscreteAdjoint` or :class:`Implicit`).
        kept: What the forward pass kept: all states (``Store``), the checkpoints
            (``Checkpoint``) or ``u_N`` alone (``Backsolve``, ``Implicit``), stacked on dim 0.
        lam: Cotangent of ``u_N``, same shape as ``u_N``.
        theta, eta, mu: The flow's parameters (``mu`` is ``None`` without proximal term).
        data: The support data tensors.
        need: Which of ``(theta, eta, mu)`` need a gradient.
        stats: Filled with the peak number of states held and the steps recomputed.

    Returns:
        Gradients for ``theta``, ``eta``, ``mu`` (``None`` where not needed), with
        the shapes of the inputs.
    """
    stats = SweepStats() if stats is None else stats
    adjoint = spec.adjoint
    bars: dict[str, Tensor] = {}
    if isinstance(adjoint, Implicit):
        if mu is None:
            raise ValueError("The implicit (iMAML) adjoint needs a proximal weight mu > 0.")
        lam0 = _sweep_implicit(spec, adjoint, kept[0], lam, mu, data)
        stats.peak_states = 1
    elif isinstance(adjoint, DiscreteAdjoint):
        memory = adjoint.memory
        if isinstance(memory, Store):
            lam0 = _sweep_stored(spec, kept, lam, theta, eta, mu, data, need, bars, stats)
        elif isinstance(memory, Checkpoint):
            lam0 = _sweep_checkpointed(spec, memory, kept, lam, theta, eta, mu, data, need,
                                       bars, stats)
        elif isinstance(memory, Revolve):
            lam0 = _sweep_revolve(spec, memory, kept[0], lam, theta, eta, mu, data, need,
                                  bars, stats)
        elif isinstance(memory, Backsolve):
            lam0 = _sweep_backsolve(spec, memory, kept[0], lam, theta, eta, mu, data, need,
                                    bars, stats)
        else:
            raise TypeError(f"Unknown memory strategy {memory!r}.")
    else:
        raise TypeError(f"adjoint_sweep does not handle {adjoint!r}.")
    g_theta = None
    if need[0]:
        g_theta = lam0.sum(0) if spec.objective.batched else lam0
        if "theta" in bars:
            g_theta = g_theta + bars["theta"]
    g_eta = bars.get("eta") if need[1] else None
    g_mu = bars.get("mu") if need[2] else None
    if need[1] and g_eta is None:
        g_eta = torch.zeros_like(eta)
    if need[2] and g_mu is None and mu is not None:
        g_mu = torch.zeros_like(mu)
    return g_theta, g_eta, g_mu


def forward_kept(
    spec: FlowSpec, theta: Tensor, eta: Tensor, mu: Tensor | None, data: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """Run the forward pass and stack what the adjoint needs to keep."""
    adjoint = spec.adjoint
    memory = adjoint.memory if isinstance(adjoint, DiscreteAdjoint) else None
    u0 = _initial_state(theta, spec.objective, data)
    if isinstance(memory, Store):
        # Written in place into one buffer: the peak is N + 1 states, not twice that
        # (a list of states then ``torch.stack``).
        states = u0.new_empty((spec.n_steps + 1, *u0.shape))
        u_end, _ = integrate(spec, theta, eta, mu, data, keep_every=1, u0=u0, out=states)
        states[-1].copy_(u_end)
        return states[-1], states
    if isinstance(memory, Checkpoint):
        every = memory.segment(spec.n_steps)
        ckpts = u0.new_empty((-(-spec.n_steps // every), *u0.shape))
        u_end, _ = integrate(spec, theta, eta, mu, data, keep_every=every, u0=u0, out=ckpts)
        return u_end, ckpts
    if isinstance(memory, Revolve):  # keep u_0 only; the sweep recomputes the rest
        u_end, _ = integrate(spec, theta, eta, mu, data, u0=u0)
        return u_end, u0.detach().clone().unsqueeze(0)
    u_end, _ = integrate(spec, theta, eta, mu, data, u0=u0)
    return u_end, torch.stack([u_end])


# ----------------------------------------------------------------------------- the Function


class _FlowFn(torch.autograd.Function):
    """Adapted parameters ``u_N``, differentiable through the adjoint sweep.

    Inputs: ``theta`` (P,), ``eta`` (scalar or (P,)), ``mu`` (scalar; ignored when
    ``spec.has_mu`` is false), ``spec``, then the data tensors.
    Outputs: ``u_N`` and the kept states (non-differentiable).
    """

    @staticmethod
    def forward(theta: Tensor, eta: Tensor, mu: Tensor, spec: FlowSpec,  # type: ignore[override]
                *data: Tensor) -> tuple[Tensor, Tensor]:
        u_end, kept = forward_kept(spec, theta, eta, mu if spec.has_mu else None, data)
        return u_end.clone(), kept

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        theta, eta, mu, spec, *data = inputs
        ctx.spec = spec
        ctx.n_data = len(data)
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1], theta, eta, mu, *data)

    @staticmethod
    def backward(ctx: Any, lam: Tensor, _: Any) -> tuple[Any, ...]:  # type: ignore[override]
        kept, theta, eta, mu, *data = ctx.saved_tensors
        spec: FlowSpec = ctx.spec
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.needs_input_grad[2] and spec.has_mu)
        g_theta, g_eta, g_mu = adjoint_sweep(
            spec, kept, lam.contiguous(), theta, eta, mu if spec.has_mu else None, data, need)
        return (g_theta, g_eta, g_mu, None, *([None] * ctx.n_data))


def flow_function(
    spec: FlowSpec, theta: Tensor, eta: Tensor, mu: Tensor, data: Sequence[Tensor]
) -> Tensor:
    """Apply the adjoint Function and return ``u_N``."""
    u_end, _ = _FlowFn.apply(theta, eta, mu, spec, *data)
    return u_end
