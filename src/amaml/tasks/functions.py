"""The base of the synthetic regression families: :class:`AbstractSyntheticFunction`, a
distribution over functions (its own module, so that :mod:`amaml.tasks.base`, which names it,
and :mod:`amaml.tasks.synthetic`, which builds on both, import each other in no loop)."""

from __future__ import annotations

import abc

import numpy as np

__all__ = ["AbstractSyntheticFunction", "FloatArray"]

FloatArray = np.ndarray


class AbstractSyntheticFunction(abc.ABC):
    """A distribution over functions on the box ``[low, high]^input_dim``.

    Subclasses are frozen dataclasses whose fields are the ranges of the function
    parameters. They implement :meth:`sample_params`, :meth:`__call__` and the flat view
    of the parameters that least-squares fits need (:meth:`param_bounds`,
    :meth:`to_vector`, :meth:`from_vector`); :meth:`evaluate` follows from those.

    Parameters may carry leading batch dimensions ``B`` (scalars ``[*B]``, per-dimension
    ones ``[*B, input_dim]``): :meth:`__call__` then returns ``[*B, n]``, one row per
    function, so many candidate functions are evaluated at once.
    """

    input_dim: int
    low: float
    high: float
    grid_points: int  # test grid points per input dimension

    @abc.abstractmethod
    def sample_params(self, rng: np.random.Generator) -> dict[str, FloatArray]:
        """Draw the parameters of one function.

        Args:
            rng: The task's generator.

        Returns:
            Parameter name -> float64 array (scalars as 0-d arrays).
        """

    @abc.abstractmethod
    def __call__(self, x: FloatArray, params: dict[str, FloatArray]) -> FloatArray:
        """Evaluate the function.

        Args:
            x: Inputs ``[n, input_dim]``, float64.
            params: As returned by :meth:`sample_params`, or with leading batch
                dimensions ``B`` (see the class docstring).

        Returns:
            Targets ``[*B, n]``, float64 (``[n]`` for one function).
        """

    @abc.abstractmethod
    def param_bounds(self) -> tuple[FloatArray, FloatArray]:
        """The box the parameters are drawn from, as flat vectors.

        Returns:
            ``(lower, upper)``, each ``[p]`` float64, in the order of :meth:`to_vector`.
        """

    @abc.abstractmethod
    def to_vector(self, params: dict[str, FloatArray]) -> FloatArray:
        """Flatten parameters: ``[*B, p]`` from the dict of :meth:`sample_params`."""

    @abc.abstractmethod
    def from_vector(self, theta: FloatArray) -> dict[str, FloatArray]:
        """Inverse of :meth:`to_vector`: ``theta`` ``[*B, p]`` -> parameters with batch ``B``."""

    def evaluate(self, x: FloatArray, theta: FloatArray) -> FloatArray:
        """Evaluate the functions of flat parameter vectors.

        Args:
            x: Inputs ``[n, input_dim]``, float64.
            theta: Parameters ``[*B, p]`` (see :meth:`param_bounds`).

        Returns:
            Targets ``[*B, n]``.
        """
        return self(x, self.from_vector(np.asarray(theta, dtype=np.float64)))

    def sample_inputs(self, rng: np.random.Generator, n: int) -> FloatArray:
        """Draw ``n`` points uniformly on the box, ``[n, input_dim]``."""
        return rng.uniform(self.low, self.high, size=(n, self.input_dim))

    def grid(self) -> FloatArray:
        """The regular test grid, ``[grid_points ** input_dim, input_dim]``, endpoints included."""
        axis = np.linspace(self.low, self.high, self.grid_points)
        mesh = np.meshgrid(*([axis] * self.input_dim), indexing="ij")
        return np.stack([m.reshape(-1) for m in mesh], axis=1)
