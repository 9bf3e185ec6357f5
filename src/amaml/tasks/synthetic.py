"""Synthetic meta-regression families: CosMixture, Alpine (Li et al. 2023) and Sinusoid.

Each family is a distribution over functions ``y = f(x; params)`` on a box
``[low, high]^d``. A task draws one function, then its support and query points once,
uniformly on the box (a fixed data set per function, as in the A-MAML paper); its test
points are a regular grid over the box (32 x 32 = 1024 points in 2-D, 1000 in 1-D).
CosMixture and Alpine come in two variants, the authors' released code
(:class:`CosMixture`, :class:`Alpine`) and the paper's printed formulas
(:class:`CosMixturePaper`, :class:`AlpinePaper`); each class says how they differ.

With ``pool`` (the authors' protocol) each meta-training task holds ``pool`` support and
``pool`` query points, from which every meta-iteration draws a fresh episode
(:func:`amaml.tasks.draw_episode`); meta-test tasks keep ``shots`` and ``queries``.

Inputs and targets are standardised with pooled statistics of the meta-training tasks'
support and query points (per input dimension for x, one scalar for y), applied to every
split, so the RMSE of standardised targets is the paper's nRMSE.

Randomness: task ``i`` of a split draws from its own generator,
``numpy.random.SeedSequence(seed, spawn_key=(split, i))``; so it does not depend on how many
tasks are requested, nor on the other split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import FamilyRequest, Task, TaskFamily, TaskSet
from .functions import AbstractSyntheticFunction, FloatArray

__all__ = [
    "DEFAULT_N_TRAIN",
    "AbstractSyntheticFunction",
    "Alpine",
    "AlpinePaper",
    "CosMixture",
    "CosMixturePaper",
    "Sinusoid",
    "build_synthetic",
]

#: Meta-training functions when ``n_train`` is not given (the paper's 100).
DEFAULT_N_TRAIN = 100

_TRAIN, _TEST = 0, 1


def _check_range(name: str, rng: tuple[float, float]) -> None:
    lo, hi = rng
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"{name} must be a finite (low, high) with low <= high, got {rng!r}.")


def _scalar(params: dict[str, FloatArray], name: str) -> FloatArray:
    """A scalar parameter ``[*B]`` as ``[*B, 1, 1]``, to broadcast against ``x`` ``[n, d]``."""
    return np.asarray(params[name])[..., None, None]


def _bounds(*ranges: tuple[float, float]) -> tuple[FloatArray, FloatArray]:
    return np.array([r[0] for r in ranges], float), np.array([r[1] for r in ranges], float)


def _stack(params: dict[str, FloatArray], names: tuple[str, ...]) -> FloatArray:
    return np.stack([np.asarray(params[k], dtype=np.float64) for k in names], axis=-1)


def _unstack(theta: FloatArray, names: tuple[str, ...]) -> dict[str, FloatArray]:
    return {k: theta[..., i] for i, k in enumerate(names)}


class _ScalarParameters(AbstractSyntheticFunction):
    """A family whose parameters are scalars ``name`` drawn from ``U[name_range]`` in the
    order of ``_names`` (the subclass's fields hold the ranges)."""

    _names: tuple[str, ...] = ()

    def _ranges(self) -> list[tuple[float, float]]:
        return [getattr(self, f"{n}_range") for n in self._names]

    def __post_init__(self) -> None:
        for n, r in zip(self._names, self._ranges(), strict=True):
            _check_range(f"{n}_range", r)

    def sample_params(self, rng: np.random.Generator) -> dict[str, FloatArray]:
        return {n: np.asarray(rng.uniform(*r))
                for n, r in zip(self._names, self._ranges(), strict=True)}

    def param_bounds(self) -> tuple[FloatArray, FloatArray]:
        return _bounds(*self._ranges())

    def to_vector(self, params: dict[str, FloatArray]) -> FloatArray:
        return _stack(params, self._names)

    def from_vector(self, theta: FloatArray) -> dict[str, FloatArray]:
        return _unstack(theta, self._names)


class _AlpineShifts(AbstractSyntheticFunction):
    """``y = sum_i |x_i * sin(x_i + offset + s_i) + x_i / 10|``, ``s_i = k_i pi / 12`` with
    ``k_i ~ U[k_range]`` drawn independently per input dimension."""

    _offset: float = 0.0
    k_range: tuple[float, float]

    def __post_init__(self) -> None:
        _check_range("k_range", self.k_range)

    def sample_params(self, rng: np.random.Generator) -> dict[str, FloatArray]:
        k = rng.uniform(*self.k_range, size=self.input_dim)
        return {"s": k * np.pi / 12.0}

    def __call__(self, x: FloatArray, params: dict[str, FloatArray]) -> FloatArray:
        s = np.asarray(params["s"])[..., None, :]
        return np.abs(x * np.sin(x + self._offset + s) + x / 10.0).sum(axis=-1)

    def param_bounds(self) -> tuple[FloatArray, FloatArray]:
        return _alpine_shifts(self.k_range, self.input_dim)

    def to_vector(self, params: dict[str, FloatArray]) -> FloatArray:
        return np.asarray(params["s"], dtype=np.float64)

    def from_vector(self, theta: FloatArray) -> dict[str, FloatArray]:
        return {"s": theta}


@dataclass(frozen=True)
class CosMixture(_ScalarParameters):
    """``y = -c * sum_i cos(w * pi * x_i + phi) - sum_i x_i**2`` on ``[-1, 1]^2``.

    ``c ~ U[c_range]``, ``phi ~ U[phi_range]``, ``w ~ U[w_range]``, one of each per function.
    This is the variant of the authors' released code: up to six periods per dimension,
    which 50 to 100 random points hardly resolve. The paper's printed formula, smooth and
    learnable from 50 points, is :class:`CosMixturePaper` (``"cosmixture-paper"``).
    """

    c_range: tuple[float, float] = (0.1, 1.0)
    phi_range: tuple[float, float] = (0.5, 2.0)
    w_range: tuple[float, float] = (3.0, 6.0)
    input_dim: int = 2
    low: float = -1.0
    high: float = 1.0
    grid_points: int = 32

    _names = ("c", "phi", "w")

    def __call__(self, x: FloatArray, params: dict[str, FloatArray]) -> FloatArray:
        c, phi, w = (_scalar(params, k) for k in self._names)
        return -c[..., 0] * np.cos(w * np.pi * x + phi).sum(axis=-1) - (x**2).sum(axis=-1)


@dataclass(frozen=True)
class CosMixturePaper(_ScalarParameters):
    """``y = -0.1 * sum_i A * cos(omega * x_i + phi) - sum_i x_i**2`` on ``[-1, 1]^2``.

    ``A ~ U[amplitude_range]``, ``omega ~ U[omega_range]``, ``phi ~ U[phi_range]``, one of
    each per function. This is the paper's printed formula: at most one period per
    dimension and a small amplitude, learnable from 50 points (the paper's figure is
    consistent with it). The authors' released code draws :class:`CosMixture` instead.
    """

    amplitude_range: tuple[float, float] = (0.1, 1.0)
    omega_range: tuple[float, float] = (0.5 * math.pi, 2.0 * math.pi)
    phi_range: tuple[float, float] = (3.0, 6.0)
    input_dim: int = 2
    low: float = -1.0
    high: float = 1.0
    grid_points: int = 32

    _names = ("amplitude", "omega", "phi")

    def __call__(self, x: FloatArray, params: dict[str, FloatArray]) -> FloatArray:
        amplitude, omega, phi = (_scalar(params, k) for k in self._names)
        waves = np.cos(omega * x + phi).sum(axis=-1)
        return -0.1 * amplitude[..., 0] * waves - (x**2).sum(axis=-1)


def _alpine_shifts(k_range: tuple[float, float], input_dim: int) -> tuple[FloatArray, FloatArray]:
    lo, hi = k_range
    return np.full(input_dim, lo * np.pi / 12.0), np.full(input_dim, hi * np.pi / 12.0)


@dataclass(frozen=True)
class Alpine(_AlpineShifts):
    """``y = sum_i |x_i * sin(x_i + pi + s_i) + x_i / 10|`` on ``[-10, 10]^2``.

    ``s_i = k_i * pi / 12`` with ``k_i ~ U[k_range]`` (continuous) drawn independently for
    each input dimension. The ``+ pi`` follows the authors' released code, whose phases
    are independent per dimension too in intent; their code reads ``param[0]`` for both
    dimensions, a bug not reproduced here. The paper's printed formula, without the
    ``+ pi``, is :class:`AlpinePaper` (``"alpine-paper"``).
    """

    k_range: tuple[float, float] = (-5.0, 5.0)
    input_dim: int = 2
    low: float = -10.0
    high: float = 10.0
    grid_points: int = 32

    _offset = np.pi


@dataclass(frozen=True)
class AlpinePaper(_AlpineShifts):
    """``y = sum_i |x_i * sin(x_i + s_i) + x_i / 10|`` on ``[-10, 10]^2``.

    ``s_i = k_i * pi / 12`` with ``k_i ~ U[k_range]`` (continuous) drawn independently for
    each input dimension. This is the paper's printed formula; the authors' released
    code adds ``pi`` inside the sine (:class:`Alpine`, ``"alpine"``).
    """

    k_range: tuple[float, float] = (-5.0, 5.0)
    input_dim: int = 2
    low: float = -10.0
    high: float = 10.0
    grid_points: int = 32

    _offset = 0.0


@dataclass(frozen=True)
class Sinusoid(_ScalarParameters):
    """``y = A * sin(x - phase)`` on ``[-5, 5]`` (Finn et al. 2017).

    ``A ~ U[amplitude_range]``, ``phase ~ U[phase_range]``.
    """

    amplitude_range: tuple[float, float] = (0.1, 5.0)
    phase_range: tuple[float, float] = (0.0, math.pi)
    input_dim: int = 1
    low: float = -5.0
    high: float = 5.0
    grid_points: int = 1000

    _names = ("amplitude", "phase")

    def __call__(self, x: FloatArray, params: dict[str, FloatArray]) -> FloatArray:
        amplitude, phase = (np.asarray(params[k])[..., None] for k in self._names)
        return amplitude * np.sin(x[:, 0] - phase)


@dataclass(frozen=True)
class _RawTask:
    params: dict[str, FloatArray]
    support_x: FloatArray
    support_y: FloatArray
    query_x: FloatArray
    query_y: FloatArray
    test_y: FloatArray


def _draw_task(
    fn: AbstractSyntheticFunction,
    grid: FloatArray,
    seed: int,
    split: int,
    index: int,
    shots: int,
    queries: int,
) -> _RawTask:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split, index)))
    params = fn.sample_params(rng)
    support_x = fn.sample_inputs(rng, shots)
    query_x = fn.sample_inputs(rng, queries)
    return _RawTask(
        params=params,
        support_x=support_x,
        support_y=fn(support_x, params),
        query_x=query_x,
        query_y=fn(query_x, params),
        test_y=fn(grid, params),
    )


def _params_info(params: dict[str, FloatArray]) -> dict[str, Any]:
    return {k: np.asarray(v).tolist() for k, v in params.items()}


def build_synthetic(fn: AbstractSyntheticFunction, name: str, request: FamilyRequest) -> TaskFamily:
    """Build a synthetic :class:`TaskFamily` from a function distribution.

    Args:
        fn: The function distribution, e.g. ``CosMixture()``.
        name: Family name recorded in the result.
        request: Validated arguments of :func:`amaml.tasks.make_family`; ``root`` and
            ``download`` are ignored. With ``request.pool``, meta-training tasks hold
            ``pool`` support and ``pool`` query points (the episode pools).

    Returns:
        The family, ``function=fn``. ``info`` holds ``x_mean``, ``x_std`` (per input
        dimension), ``y_mean``, ``y_std`` (the standardisation:
        ``x_std = (x - x_mean) / x_std``), ``domain``, ``n_train``, ``n_test``, ``pool``,
        ``n_test_points``, the request's arguments and each task's function parameters
        (``params_train``, ``params_test``). Every task's ``test_x`` is the same tensor
        (the standardised grid): do not modify it in place.
    """
    n_train = DEFAULT_N_TRAIN if request.n_train is None else request.n_train
    grid = fn.grid()
    train_points = (request.shots, request.queries) if request.pool is None else (request.pool,) * 2
    sizes = {
        _TRAIN: (n_train, *train_points),
        _TEST: (request.n_test, request.shots, request.queries),
    }
    draw = {
        split: [_draw_task(fn, grid, request.seed, split, i, shots, queries) for i in range(count)]
        for split, (count, shots, queries) in sizes.items()
    }
    pooled_x = np.concatenate([a for t in draw[_TRAIN] for a in (t.support_x, t.query_x)])
    pooled_y = np.concatenate([a for t in draw[_TRAIN] for a in (t.support_y, t.query_y)])
    x_mean, x_std = pooled_x.mean(axis=0), pooled_x.std(axis=0)
    y_mean, y_std = float(pooled_y.mean()), float(pooled_y.std())
    # A constant coordinate or target (possible only for degenerate ranges) is left unscaled.
    x_std = np.where(x_std > 0, x_std, 1.0)
    y_std = y_std if y_std > 0 else 1.0

    def tx(x: FloatArray) -> torch.Tensor:
        return torch.from_numpy((x - x_mean) / x_std).to(request.dtype)

    def ty(y: FloatArray) -> torch.Tensor:
        return torch.from_numpy((y - y_mean) / y_std).to(request.dtype).unsqueeze(1)

    grid_x = tx(grid)
    splits = {}
    for split, raw in draw.items():
        splits[split] = TaskSet(
            [
                Task(
                    support_x=tx(t.support_x),
                    support_y=ty(t.support_y),
                    query_x=tx(t.query_x),
                    query_y=ty(t.query_y),
                    test_x=grid_x,
                    test_y=ty(t.test_y),
                )
                for t in raw
            ]
        )
    info: dict[str, Any] = {
        "family": name,
        **request.as_info(),
        "n_train": n_train,
        "pool": request.pool,
        "n_test_points": int(grid.shape[0]),
        "domain": [fn.low, fn.high],
        "x_mean": x_mean.tolist(),
        "x_std": x_std.tolist(),
        "y_mean": y_mean,
        "y_std": y_std,
        "params_train": [_params_info(t.params) for t in draw[_TRAIN]],
        "params_test": [_params_info(t.params) for t in draw[_TEST]],
    }
    return TaskFamily(
        name=name,
        input_dim=fn.input_dim,
        train=splits[_TRAIN],
        test=splits[_TEST],
        info=info,
        function=fn,
    )
