"""The compiled kernel: a step and its VJP as pure functions compiled by :func:`torch.compile`.

On small models every autograd op is dispatch-bound: a Hessian-vector product by double
backward costs about three gradients on the paper's MLP on CPU, although its arithmetic is
less than two (``benchmarks/README.md``). Written with :mod:`torch.func` (the gradient by
``grad`` of the loss, the VJP by ``vjp`` of the whole step), a step, or its VJP, is one pure
function that :func:`torch.compile` turns into a few fused kernels: the same maths as the
eager kernels, only rounding differs. One compiled function serves every step: the step
index enters as a 0-d tensor (bias corrections, SGD's first step), the step's learning rate
and data as inputs; the support data are differentiated too (dataset distillation), the
tensors the loss captures are not (:func:`~amaml.flow.kernels.select_kernel` then
picks an eager kernel).

Repeated ``adapt`` calls on one model and data shape reuse the compiled code: the first pays
the compilation (tens of seconds on CPU), later ones none; a fused MLP loss, which describes
its computation by a key, shares its compiled functions through :data:`_COMPILED`, this
package's one cache. Where compilation fails (e.g. no C++ compiler for the CPU backend), a
warning is issued once and the kernel hands its work to the next eager kernel.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..reads import FIRST_DATA, Reads, StepReads
from ..spec import FlowSpec
from .base import AbstractKernel, Cotangents

__all__ = ["COMPILE_MODES", "CompiledKernel", "compile_mode"]

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


class _Functions:
    """One flow's compiled step and VJPs (by needed slots), built on first use, with the
    fallbacks they need: a failure with the C++ wrapper (CPU) rebuilds them without it,
    once; any other failure warns once and marks :attr:`failed`."""

    def __init__(self, spec: FlowSpec, reads: Reads) -> None:
        mode = spec.compile or "default"
        grad_fn: Callable[..., Tensor] = torch.func.grad(spec.objective.loss)
        if spec.n_tasks is not None:
            grad_fn = torch.func.vmap(grad_fn)
        step_map, n_hyper = spec.step_map, spec.n_hyper
        static, names = dict(reads.static), reads.hyper_names

        def phi(z: Tensor, k: Tensor, theta: Tensor, lr: Tensor, mu: Tensor | None,
                hyper: tuple[Tensor, ...], data: tuple[Tensor, ...]) -> Tensor:
            def grad(v: Tensor) -> Tensor:
                g = grad_fn(v, *data)
                return g if mu is None else g + mu * (v - theta)

            h = {**static, **dict(zip(names, hyper))}
            return step_map.step(k, z, grad, StepReads(theta, lr, mu, data, h))

        self.phi, self.n_hyper = phi, n_hyper
        self.mode = None if mode == "default" else mode
        # CUDA-graph replays write their outputs into the same buffers each time: what is
        # kept (stored states, cotangents) is copied out.
        self.copy = mode in _CUDAGRAPH_MODES
        # On CPU the generated code's Python wrapper (tens of tensor views and allocations
        # per call) is a quarter of a small model's compiled step; a C++ wrapper removes it,
        # for a longer first compilation. Dropped if it fails to build.
        self.cpp_wrapper = self.mode is None
        self.failed = False
        self.table: dict[Any, Callable[..., Any]] = {}

    def _compile(self, fn: Callable[..., Any], device: str) -> Callable[..., Any]:
        if self.cpp_wrapper and device == "cpu":
            return torch.compile(fn, dynamic=False, options={"cpp_wrapper": True})
        return torch.compile(fn, dynamic=False, mode=self.mode)

    def call(self, key: Any, make: Callable[[], Any], device: str,
             args: tuple[Any, ...]) -> Any:
        """``table[key](*args)`` (compiled from ``make()`` on first use), ``None`` on failure."""
        fn = self.table.get(key)
        if fn is None:
            fn = self.table[key] = self._compile(make(), device)
        try:
            with torch.no_grad():
                out = fn(*args)
        except Exception as err:  # noqa: BLE001 - any backend failure falls back
            if isinstance(err, torch.cuda.OutOfMemoryError):
                raise
            if self.cpp_wrapper and device == "cpu":
                self.cpp_wrapper = False
                self.table.clear()
                return self.call(key, make, device, args)
            self.failed = True
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); amaml uses the "
                          "eager (uncompiled) kernels instead (an error of the model or loss "
                          "itself will be raised again there).", RuntimeWarning, stacklevel=5)
            return None
        if self.copy:
            out = out.clone() if isinstance(out, Tensor) else tuple(t.clone() for t in out)
        return out

    def make_vjp(self, slots: tuple[int, ...]) -> Callable[..., tuple[Tensor, ...]]:
        """The VJP of ``phi`` in ``z`` and in the argument slots ``slots`` of ``(theta, lr,
        mu, *hyper, *data)``."""
        phi, n_hyper = self.phi, self.n_hyper

        def step_vjp(z: Tensor, lam: Tensor, k: Tensor, args: tuple[Any, ...]
                     ) -> tuple[Tensor, ...]:
            fixed = list(args)

            def f(zz: Tensor, *ps: Tensor) -> Tensor:
                a = list(fixed)
                for i, p in zip(slots, ps):
                    a[i] = p
                return phi(zz, k, a[0], a[1], a[2], tuple(a[3:3 + n_hyper]),
                           tuple(a[3 + n_hyper:]))

            pull = torch.func.vjp(f, z, *(fixed[i] for i in slots))[1]
            return tuple(pull(lam))

        return step_vjp


#: Compiled functions of recent flows whose loss describes its whole computation by a key
#: (the fused MLP), least recently used first: this package's one cache. Sharing them spares
#: each ``adapt`` call building its compiled wrappers again (about 1.3 ms on the paper's MLP).
_COMPILED: dict[tuple[Any, ...], _Functions] = {}
_COMPILED_SIZE = 16


def _functions(spec: FlowSpec, reads: Reads) -> _Functions:
    fused = spec.objective.fused
    key = None if fused is None or reads.batches is not None else fused.cache_key()
    if key is not None:
        key = (key, spec.step_map, reads.static, reads.hyper_names, reads.per_step,
               spec.n_tasks, reads.mu is not None, spec.compile)
        try:
            hash(key)
        except TypeError:
            key = None
    if key is None:
        return _Functions(spec, reads)
    fns = _COMPILED.pop(key, None) or _Functions(spec, reads)
    _COMPILED[key] = fns  # most recently used last
    while len(_COMPILED) > _COMPILED_SIZE:
        _COMPILED.pop(next(iter(_COMPILED)))
    return fns


class CompiledKernel(AbstractKernel):
    """See the module. ``fallback``: the eager kernel that takes over if compilation fails."""

    name = "compiled"

    def __init__(self, spec: FlowSpec, reads: Reads, fallback: AbstractKernel) -> None:
        super().__init__(spec)
        self.fns = _functions(spec, reads)
        self.fallback = fallback
        self._memo: tuple[Reads, tuple[Any, ...]] | None = None

    @classmethod
    def supports(cls, spec: FlowSpec, need: Sequence[bool]) -> str | None:
        if spec.random:
            return "the loss draws random numbers (replayed step by step)"
        if spec.compile is None:
            return "compile=False"
        if any(need[FIRST_DATA + spec.n_data + spec.n_hyper:]):
            return "a tensor the loss reads needs a gradient"
        return None

    def active(self) -> tuple[AbstractKernel, str | None]:
        if self.fns.failed:
            return self.fallback.active()[0], "compilation failed"
        return self, None

    def _args(self, k: int, z: Tensor, reads: Reads) -> tuple[Tensor, tuple[Any, ...]]:
        """Step ``k`` as a 0-d tensor and ``(theta, lr, mu, *hyper, *data)`` detached (made
        once for all steps where nothing varies by step)."""
        kt = torch.tensor(float(k), dtype=z.dtype, device=z.device)
        memo = self._memo
        if memo is not None and memo[0] is reads:
            return kt, memo[1]
        r = reads.at(k)
        hyper = tuple(t.detach() for t in reads.hyper)
        mu = None if r.mu is None else r.mu.detach()
        args = (r.theta.detach(), r.lr.detach(), mu, *hyper, *(d.detach() for d in r.data))
        if not reads.per_step and reads.batches is None:
            self._memo = (reads, args)
        return kt, args

    def step(self, k: int, z: Tensor, reads: Reads, record: list[Any] | None = None) -> Tensor:
        if not self.fns.failed:
            kt, a = self._args(k, z, reads)
            n = 3 + len(reads.hyper)
            out = self.fns.call(z.device.type, lambda: self.fns.phi, z.device.type,
                                (z, kt, a[0], a[1], a[2], a[3:n], a[n:]))
            if out is not None:
                return out  # type: ignore[no-any-return]
        return self.fallback.step(k, z, reads, record)

    def vjp(self, k: int, z: Tensor, lam: Tensor, reads: Reads, need: Sequence[bool],
            tape: Any = None) -> tuple[Tensor, Cotangents]:
        if not self.fns.failed:
            kt, a = self._args(k, z, reads)
            n_hyper, n_data = len(reads.hyper), len(reads.data)
            # slot of (theta, lr, mu, *hyper, *data) -> index in Reads.tensors()
            index = [0, 1, 2, *(FIRST_DATA + n_data + j for j in range(n_hyper)),
                     *(FIRST_DATA + i if reads.batches is None else -1
                       for i in range(len(a) - 3 - n_hyper))]
            has_mu = a[2] is not None
            slots = tuple(s for s, i in enumerate(index)
                          if i >= 0 and need[i] and (s not in (0, 2) or has_mu))
            out = self.fns.call((z.device.type, slots), lambda: self.fns.make_vjp(slots),
                                z.device.type, (z.detach(), lam, kt, a))
            if out is not None:
                return out[0], [(index[s], g) for s, g in zip(slots, out[1:], strict=True)]
        return self.fallback.vjp(k, z, lam, reads, need, tape)
