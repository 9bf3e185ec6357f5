"""Solver steps and their vector-Jacobian products as compiled pure functions.

On small models every autograd op is dispatch-bound: a Hessian-vector product by double
backward costs about three gradients on the paper's MLP on CPU, although its arithmetic
is less than two (measured in ``benchmarks/README.md``). Written with :mod:`torch.func`
(``vjp`` of ``grad``) a whole solver step, or its VJP, is one pure function that
:func:`torch.compile` turns into a few fused kernels. The maths is the same as the eager
path (:mod:`amaml.flow.trajectory`); only rounding differs.

Repeated ``adapt`` calls on one model and data shape reuse the compiled code: the first
call pays the compilation (tens of seconds on CPU), later calls none. Where compilation
fails (e.g. no C++ compiler for the CPU backend), a warning is issued once and the eager
path is used.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._types import FlatLoss
from .solvers import AbstractSolver

__all__ = ["COMPILE_MODES", "CompiledCalls", "StepFunctions", "compile_mode",
           "enable_compile_cache", "recommend_compile", "step_functions"]

#: ``torch.compile`` modes accepted by ``compile=``; ``True`` means ``"default"``. The modes
#: with CUDA graphs (``"reduce-overhead"``, ``"max-autotune"``) replay each step as one
#: graph launch on a GPU, where a small model's steps are launch-bound.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_mode(compile: bool | str) -> str | None:
    """The ``torch.compile`` mode of a ``compile=`` argument; ``None`` for no compilation.

    Raises:
        TypeError: Neither a bool nor a string.
        ValueError: An unknown mode.
    """
    if isinstance(compile, bool):
        return "default" if compile else None
    if not isinstance(compile, str):
        raise TypeError(f"compile must be True, False or one of {list(COMPILE_MODES)}; got "
                        f"{compile!r}.")
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile={compile!r} is not a torch.compile mode; expected True, "
                         f"False or one of {list(COMPILE_MODES)}.")
    return compile

Need = tuple[bool, bool, bool]
_NAMES = ("theta", "dt", "mu")


def _slots(need: Need, has_mu: bool) -> list[int]:
    """Which of ``(theta, dt, mu)`` get a cotangent: the needed ones that enter the step
    (``theta`` enters only through the proximal term ``mu (u - theta)``)."""
    return [i for i in range(3) if need[i] and (has_mu or i == 1)]


class CompiledCalls:
    """Compiled functions in tables, built on first use, with the fallbacks they need.

    A failure with the C++ wrapper (CPU) rebuilds every table without it, once; any other
    failure warns once and marks :attr:`failed`, after which callers use their eager path.

    Args:
        mode: The ``torch.compile`` mode (one of :data:`COMPILE_MODES`).
    """

    def __init__(self, mode: str = "default") -> None:
        self.mode = None if mode == "default" else mode
        # CUDA-graph replays write their outputs into the same buffers each time: what
        # is kept (stored states, cotangents) is copied out.
        self.copy = mode in _CUDAGRAPH_MODES
        # On CPU the generated code's Python wrapper (tens of tensor views and allocations
        # per call) is a quarter of a small model's compiled step; a C++ wrapper removes
        # it, for a longer first compilation. Dropped if it fails to build.
        self.cpp_wrapper = self.mode is None
        self.failed = False
        self._tables: list[dict[Any, Any]] = []

    def table(self) -> dict[Any, Any]:
        """A new table of compiled functions (cleared when the C++ wrapper is dropped)."""
        t: dict[Any, Any] = {}
        self._tables.append(t)
        return t

    def _compile(self, fn: Callable[..., Any], device: str) -> Callable[..., Any]:
        if self.cpp_wrapper and device == "cpu":
            return torch.compile(fn, dynamic=False, options={"cpp_wrapper": True})
        return torch.compile(fn, dynamic=False, mode=self.mode)

    def call(self, table: dict[Any, Callable[..., Any]], key: Any, make: Callable[[], Any],
             device: str, args: tuple[Any, ...]) -> Any:
        """Call the compiled function ``table[key]`` (built by ``make`` on first use); on a
        failure with the C++ wrapper, rebuild without it once; on any other failure fall
        back to the eager path (returns ``None``)."""
        fn = table.get(key)
        if fn is None:
            fn = table[key] = self._compile(make(), device)
        try:
            with torch.no_grad():
                return fn(*args)
        except Exception as err:  # noqa: BLE001 - any backend failure falls back
            if isinstance(err, torch.cuda.OutOfMemoryError):
                raise
            if self.cpp_wrapper and device == "cpu":
                self.cpp_wrapper = False
                for t in self._tables:
                    t.clear()
                return self.call(table, key, make, device, args)
            self.fallback(err)
            return None

    def fallback(self, err: Exception) -> None:
        self.failed = True
        warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); amaml uses the "
                      "eager (uncompiled) solver steps instead (an error of the model or loss "
                      "itself will be raised again there).", RuntimeWarning, stacklevel=4)


class StepFunctions:
    """One solver step ``u -> Phi(u)`` and its VJP, as compiled pure functions.

    Args:
        loss: ``loss(u, *data) -> scalar`` for one task (flat ``u``).
        solver: The explicit Runge-Kutta stepper.
        batched: ``u`` is ``(B, P)`` and the data carry a leading task dimension.
        has_mu: Whether the proximal term ``mu (u - theta)`` is present.
        mode: The ``torch.compile`` mode (one of :data:`COMPILE_MODES`).
    """

    def __init__(self, loss: FlatLoss, solver: AbstractSolver, batched: bool,
                 has_mu: bool, mode: str = "default") -> None:
        grad_fn: Callable[..., Tensor] = torch.func.grad(loss)
        if batched:
            grad_fn = torch.func.vmap(grad_fn)

        def step(u: Tensor, theta: Tensor, dt: Tensor, mu: Tensor | None,
                 *data: Tensor) -> Tensor:
            def field(v: Tensor) -> Tensor:
                g = grad_fn(v, *data)
                if mu is not None:
                    g = g + mu * (v - theta)
                return -dt * g

            return solver.step(field, u)

        self._step_eager = step
        self._calls = CompiledCalls(mode)
        self._steps: dict[str, Callable[..., Tensor]] = self._calls.table()
        self._vjps: dict[tuple[str, Need], Callable[..., tuple[Tensor, ...]]] = \
            self._calls.table()
        self.has_mu = has_mu

    @property
    def failed(self) -> bool:
        """Whether compilation failed (the eager path is used from then on)."""
        return self._calls.failed

    @property
    def _cpp_wrapper(self) -> bool:
        return self._calls.cpp_wrapper

    @property
    def _copy(self) -> bool:
        return self._calls.copy

    def _call(self, table: dict[Any, Callable[..., Any]], key: Any, make: Callable[[], Any],
              device: str, args: tuple[Any, ...]) -> Any:
        return self._calls.call(table, key, make, device, args)

    def _make_vjp(self, need: Need) -> Callable[..., tuple[Tensor, ...]]:
        step = self._step_eager
        slots = _slots(need, self.has_mu)

        def step_vjp(u: Tensor, lam: Tensor, theta: Tensor, dt: Tensor, mu: Tensor | None,
                     *data: Tensor) -> tuple[Tensor, ...]:
            fixed: list[Tensor | None] = [theta, dt, mu]

            def phi(v: Tensor, *ps: Tensor) -> Tensor:
                args: list[Tensor | None] = list(fixed)
                for i, p in zip(slots, ps):
                    args[i] = p
                th, et = args[0], args[1]
                assert th is not None and et is not None
                return step(v, th, et, args[2], *data)

            primals = [fixed[i] for i in slots]
            pull = torch.func.vjp(phi, u, *primals)[1]
            out: tuple[Tensor, ...] = tuple(pull(lam))
            return out

        return step_vjp

    def step(self, u: Tensor, theta: Tensor, dt: Tensor, mu: Tensor | None,
             data: Sequence[Tensor]) -> Tensor | None:
        """``Phi(u)`` without a graph; ``None`` if compilation failed (use the eager path)."""
        if self.failed:
            return None
        device = u.device.type
        out: Tensor | None = self._call(self._steps, device, lambda: self._step_eager, device,
                                        (u, theta, dt, mu, *data))
        if out is None:
            return None
        return out.clone() if self._copy else out

    def vjp(self, u: Tensor, lam: Tensor, theta: Tensor, dt: Tensor, mu: Tensor | None,
            data: Sequence[Tensor], need: Need) -> tuple[Tensor, dict[str, Tensor]] | None:
        """``((dPhi/du)^T lam, {name: (dPhi/dp)^T lam})`` for the needed parameters, or
        ``None`` if compilation failed."""
        if self.failed:
            return None
        device = u.device.type
        out = self._call(self._vjps, (device, need), lambda: self._make_vjp(need), device,
                         (u, lam, theta, dt, mu, *data))
        if out is None:
            return None
        if self._copy:
            out = tuple(t.clone() for t in out)
        names = [_NAMES[i] for i in _slots(need, self.has_mu)]
        return out[0], dict(zip(names, out[1:], strict=True))


def step_functions(loss: FlatLoss, solver: AbstractSolver, batched: bool,
                   has_mu: bool, mode: str = "default") -> StepFunctions:
    """The :class:`StepFunctions` of a flow.

    Cheap to build: :func:`torch.compile` caches compiled code on the functions' code
    objects with guards on what they close over (the model, the loss, shapes and dtypes),
    so a second ``adapt`` call on the same model and shapes reuses the first one's code.
    A new model or shape compiles again (up to torch's recompilation limit, after which
    torch runs the step eagerly). A loss with a ``cache_key()`` (the fused MLP loss) shares
    one :class:`StepFunctions` between calls with equal keys.
    """
    key = _cache_key(loss, solver, batched, has_mu, mode)
    if key is None:
        return StepFunctions(loss, solver, batched, has_mu, mode)
    fns = _STEP_CACHE.pop(key, None)
    if fns is None:
        fns = StepFunctions(loss, solver, batched, has_mu, mode)
    _STEP_CACHE[key] = fns  # most recently used last
    while len(_STEP_CACHE) > _STEP_CACHE_SIZE:
        _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
    return fns


def _cache_key(loss: FlatLoss, solver: AbstractSolver, batched: bool, has_mu: bool,
               mode: str) -> tuple[Any, ...] | None:
    """A key under which a flow's :class:`StepFunctions` can be shared by later ``adapt``
    calls: only for losses that describe their whole computation by a hashable key (the
    fused MLP: its layers and the user's loss function), else ``None``."""
    describe = getattr(loss, "cache_key", None)
    if describe is None:
        return None
    key = (describe(), solver, batched, has_mu, mode)
    try:
        hash(key)
    except TypeError:
        return None
    return key


#: StepFunctions of recent flows, least recently used first; sharing them spares each
#: ``adapt`` call building its compiled wrappers again (about 1.3 ms on the paper's MLP).
_STEP_CACHE: dict[tuple[Any, ...], StepFunctions] = {}
_STEP_CACHE_SIZE = 16


# ----------------------------------------------------------------------------- compile cost

#: Environment variable naming the cache folder of :func:`enable_compile_cache`.
CACHE_ENV = "AMAML_CACHE"


def enable_compile_cache(directory: str | os.PathLike[str] | None = None) -> Path:
    """Keep ``torch.compile``'s compiled code on disk, so that later processes reuse it.

    Points TorchInductor's on-disk caches (the FX graph cache of compiled kernels and the
    AOTAutograd cache of forward/backward graphs) to ``directory``, by default
    ``$AMAML_CACHE`` or else ``~/.cache/amaml/torch-compile``, and switches them on. A
    process that then compiles the same steps (same model, loss, shapes, dtype, torch
    version) loads the kernels instead of generating and building C++ or Triton code;
    Dynamo still traces the Python (a few seconds). torch's own default is a folder under
    ``/tmp``, which a reboot or a fresh container empties.

    Call it once at start-up, before the first compilation. It sets process-wide state
    (``TORCHINDUCTOR_CACHE_DIR``, ``TORCHINDUCTOR_FX_GRAPH_CACHE``,
    ``TORCHINDUCTOR_AUTOGRAD_CACHE`` and the matching ``torch._inductor.config`` /
    ``torch._functorch.config`` flags), as torch's caches are process-wide.

    Measured on the paper's MLP (``benchmarks/bench_compile_cache.py``, 2 CPU cores,
    torch 2.13, 2026-11-28): the first compiled ``adapt(..., memory="store",
    compile=True)`` meta-gradient of a fresh process took 16.7 s with an empty cache and
    3.2 s in a second process with the cache the first one filled (idle machine; 71.3 s
    and 10.6 s under a load of 6).

    Args:
        directory: The cache folder; created if missing.

    Returns:
        The cache folder, absolute.
    """
    if directory is None:
        env = os.environ.get(CACHE_ENV)
        base = Path(env) if env else Path.home() / ".cache" / "amaml"
        path = base / "torch-compile"
    else:
        path = Path(directory)
    path = path.expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    for config, name in ((inductor_config, "fx_graph_cache"),
                         (functorch_config, "enable_autograd_cache")):
        if hasattr(config, name):
            setattr(config, name, True)
    return path


def recommend_compile(n_steps: int, meta_iters: int, n_tasks: int, device: str) -> bool:
    """Whether ``compile=True`` pays for its compilation over a whole meta-training run.

    Compiling costs a one-off ``C`` seconds per process (model, loss and shapes) and saves
    ``s`` seconds per inner step and task on every later meta-gradient; it pays when
    ``n_steps * meta_iters * n_tasks * s > C``. Measured on the paper's MLP (2-32-32-1
    tanh, 100 support points, float32, one CPU thread, torch 2.13, 2 cores;
    ``benchmarks/bench_compile_cache.py``, 2026-11-28, after the C++-wrapped compiled
    steps and the leaner fused eager path): eager store 0.62 ms per inner step and task,
    compiled store 0.28 to 0.33 ms, so ``s`` is about 0.32 ms; ``C`` was 16 to 17 s with
    an empty cache and 3.2 to 3.6 s with a warm one (:func:`enable_compile_cache`) on an
    idle machine, and 71 s (empty cache) on the same machine under a load of 6. Break-even
    is therefore about 5 x 10^4 task-steps with an empty cache on an idle machine (e.g.
    100 steps x 5 tasks x 100 meta-iterations) and 10^4 with a warm one. The rule asks for
    1.5 times the empty-cache break-even (7.5 x 10^4 task-steps): the timings of this
    shared machine vary by 20 to 50% (and compilation by 4x under load), and the saving
    per step shrinks for larger models, where arithmetic rather than dispatch dominates.

    On CUDA, per-op launch latency makes eager steps dispatch-bound too, and compilation
    (Triton) is slower; the same threshold is used, unmeasured on GPUs here.

    Args:
        n_steps: Inner steps per adaptation.
        meta_iters: Meta-gradients in the run.
        n_tasks: Tasks per meta-gradient.
        device: ``"cpu"`` or ``"cuda"`` (or a ``torch.device`` string such as
            ``"cuda:0"``).

    Returns:
        ``True`` if the run is long enough for compilation to pay, with margin.

    Raises:
        ValueError: A count below 1 or an unknown device type.
    """
    for name, value in (("n_steps", n_steps), ("meta_iters", meta_iters),
                        ("n_tasks", n_tasks)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
    kind = str(device).split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (optionally 'cuda:N'); got "
                         f"{device!r}.")
    return 2 * n_steps * meta_iters * n_tasks >= 3 * _BREAK_EVEN_TASK_STEPS


#: Inner task-steps after which compilation has paid for itself (empty cache, CPU, the
#: paper's MLP, idle machine): about 16 s / 0.32 ms; see :func:`recommend_compile`.
_BREAK_EVEN_TASK_STEPS = 50_000
