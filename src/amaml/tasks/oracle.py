"""The oracle of a synthetic family: what a task's support set allows at best.

A meta-learner only ever sees a task's support points. Knowing the family's parametric
form, the best it could do is fit the function's own parameters to those points and
predict the test grid: :func:`oracle_nrmse` does that by bounded least squares
(``scipy.optimize.least_squares``) and reports the same nRMSE as the experiments
(standardised targets, ``family.info``'s ``y_mean``/``y_std``). With noiseless targets and
enough support points it is ~0; with few points it shows how much the support set leaves
undetermined (the floor that no learner reaches, the bar beside each method's number).

The fit is non-convex (phases and frequencies), so it starts from ``restarts`` seeded
uniform draws inside the parameter box plus the ``restarts`` best points of a coarse grid
over the box (when that grid has at least 3 values per parameter within
:data:`GRID_POINTS` evaluations) and keeps the lowest support residual. It is a local
search from many starts, not a certificate of the global optimum.
"""

from __future__ import annotations

import math

import numpy as np

from .._extras import import_extra
from .base import Task, TaskFamily, TaskSet
from .synthetic import AbstractSyntheticFunction

__all__ = ["GRID_POINTS", "oracle_nrmse", "supports_oracle"]

#: Most parameter vectors on the coarse grid of starting points (per-parameter count
#: ``floor(GRID_POINTS ** (1 / p))``): 64 per parameter for 2, 16 for 3.
GRID_POINTS = 4096

FloatArray = np.ndarray

# SeedSequence spawn key of the restarts (tasks use 0 to 4); then the split and task index.
_ORACLE = 5
_SPLITS = ("train", "test")


def supports_oracle(family: TaskFamily) -> bool:
    """Whether :func:`oracle_nrmse` can fit ``family``: it carries a parametric ``function``."""
    return isinstance(family, TaskFamily) and family.function is not None


def _coarse_grid(lower: FloatArray, upper: FloatArray) -> FloatArray | None:
    """Regular grid ``[G, p]`` over the box, or ``None`` when too coarse to help."""
    p = lower.shape[0]
    per_axis = int(math.floor(GRID_POINTS ** (1.0 / p) + 1e-9)) if p else 0
    if per_axis < 3:
        return None
    axes = [np.linspace(lo, hi, per_axis) for lo, hi in zip(lower, upper, strict=True)]
    return np.stack([m.reshape(-1) for m in np.meshgrid(*axes, indexing="ij")], axis=1)


def _fit(
    fn: AbstractSyntheticFunction,
    x: FloatArray,
    y: FloatArray,
    grid: FloatArray | None,
    restarts: int,
    rng: np.random.Generator,
) -> FloatArray:
    """Parameters ``[p]`` in the box minimising ``sum (fn(x) - y)**2`` (best of all starts)."""
    # the only scipy use, imported here: `import amaml` needs no scipy
    least_squares = import_extra("scipy.optimize", "The oracle reference").least_squares

    lower, upper = fn.param_bounds()
    free = upper > lower  # least_squares needs lower < upper: fixed parameters stay put
    starts = [rng.uniform(lower, upper) for _ in range(restarts)]
    if grid is not None:
        cost = ((fn.evaluate(x, grid) - y) ** 2).sum(axis=1)
        starts += list(grid[np.argsort(cost, kind="stable")[:restarts]])
    if not free.any():
        return lower.copy()

    def residual(z: FloatArray) -> FloatArray:
        theta = lower.copy()
        theta[free] = z
        return fn.evaluate(x, theta) - y

    best, best_cost = starts[0], math.inf
    for start in starts:
        # Tolerances near round-off: noiseless support points are fitted to ~1e-10.
        sol = least_squares(
            residual,
            start[free],
            bounds=(lower[free], upper[free]),
            xtol=1e-14,
            ftol=1e-14,
            gtol=1e-14,
        )
        if sol.cost < best_cost:
            best_cost = float(sol.cost)
            best = lower.copy()
            best[free] = sol.x
    return best


def _raw_inputs(x: FloatArray, family: TaskFamily) -> FloatArray:
    return x * np.asarray(family.info["x_std"]) + np.asarray(family.info["x_mean"])


def _task_nrmse(
    family: TaskFamily,
    fn: AbstractSyntheticFunction,
    task: Task,
    grid: FloatArray | None,
    restarts: int,
    rng: np.random.Generator,
) -> float:
    y_mean, y_std = float(family.info["y_mean"]), float(family.info["y_std"])
    x = _raw_inputs(task.support_x.detach().cpu().double().numpy(), family)
    y = task.support_y.detach().cpu().double().numpy()[:, 0] * y_std + y_mean
    theta = _fit(fn, x, y, grid, restarts, rng)
    pred = fn.evaluate(_raw_inputs(task.test_x.detach().cpu().double().numpy(), family), theta)
    target = task.test_y.detach().cpu().double().numpy()[:, 0]
    return float(np.sqrt(np.mean(((pred - y_mean) / y_std - target) ** 2)))


def oracle_nrmse(
    family: TaskFamily, *, split: str = "test", restarts: int = 8, seed: int = 0
) -> list[float]:
    """Test-grid nRMSE of the family's own parameters fitted to each task's support set.

    For each task of ``split``: undo the standardisation of its support points, fit the
    parameters of ``family.function`` inside their box by least squares (see the module
    docstring), predict the test grid, standardise the prediction with ``info["y_mean"]``
    and ``info["y_std"]`` and take the RMSE against ``task.test_y``: the metric of the
    experiments, for the best predictor the support set allows within the family.

    Args:
        family: A synthetic family (``family.function`` set, as :func:`make_family`
            does; see :func:`supports_oracle`).
        split: ``"test"`` (meta-test tasks) or ``"train"``.
        restarts: Random starts per task, >= 1; as many best coarse-grid points are
            added where the grid is cheap.
        seed: Seed of the random starts (non-negative); task ``i`` draws from
            ``SeedSequence(seed, spawn_key=(5, split, i))``.

    Returns:
        One nRMSE per task of the split, in task order.

    Raises:
        TypeError: ``family`` is not a :class:`TaskFamily`, or ``restarts``/``seed`` is
            not an int.
        ValueError: The family has no parametric form (``"no oracle for ..."``: the
            collaborative-filtering families), or ``split``, ``restarts`` or ``seed`` is out
            of range.
    """
    if not isinstance(family, TaskFamily):
        raise TypeError(f"family must be a TaskFamily, got {type(family).__name__}.")
    fn = family.function
    if fn is None:
        raise ValueError(
            f"There is no oracle for family {family.name!r}: it carries no parametric "
            "function (family.function is None; collaborative filtering has none). "
            "Check supports_oracle(family) first."
        )
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}.")
    for name, value, minimum in (("restarts", restarts, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    tasks = family.train if split == "train" else family.test
    if not isinstance(tasks, TaskSet):  # a classification family has no function
        raise ValueError(f"There is no oracle for {family.kind} family {family.name!r}.")
    grid = _coarse_grid(*fn.param_bounds())
    out = []
    for i, task in enumerate(tasks):
        key = (_ORACLE, _SPLITS.index(split), i)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))
        out.append(_task_nrmse(family, fn, task, grid, restarts, rng))
    return out
