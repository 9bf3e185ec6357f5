"""The fused kernel: the loss's own gradient and Hessian-vector product (a plain MLP,
:class:`~amaml.flow.fused.AbstractFusedLoss`) and the step map's own transpose
(:meth:`~amaml.flow.step_maps.base.AbstractStepMap.transpose`): no autograd graph through
the model. A step taken with a record keeps the loss's tape of each gradient it read, and
the step's VJP then reuses it (the same numbers, bit for bit)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..fused import AbstractFusedLoss
from ..reads import FIRST_DATA, LR, MU, THETA, Reads, StepReads
from ..spec import FlowSpec
from ..step_maps.base import AbstractStepMap
from ..step_maps.runge_kutta import AbstractSolver, is_tableau
from .base import AbstractKernel, Cotangents

__all__ = ["FusedKernel"]


class _Oracle:
    """``G(u) = g(u) + mu (u - theta)`` and ``J_G(u)^T w`` by the fused loss at step ``k``'s
    data, collecting the cotangents ``w`` gives ``theta``, ``mu`` and the inputs."""

    def __init__(self, fused: AbstractFusedLoss, r: StepReads, need: Sequence[bool],
                 recorded: list[Any] | None, own_data: bool) -> None:
        # r: detached leaves (FusedKernel.vjp), or a schedule's batch as it comes
        self.fused = fused
        self.data = r.data if own_data else [d.detach() for d in r.data]
        self.theta, self.mu = r.theta, r.mu
        self.need_theta = need[THETA] and self.mu is not None
        self.need_mu = need[MU] and self.mu is not None
        self.need_x = own_data and len(need) > FIRST_DATA and need[FIRST_DATA]
        # what the step's forward evaluation recorded, by stage: (gradient, tape)
        self.recorded: list[tuple[Tensor, Any]] = recorded or []
        self.tapes: dict[int, Any] = {}
        self.bars: dict[int, Tensor] = {}

    def grad(self, u: Tensor, stage: int) -> Tensor:
        if stage < len(self.recorded):
            g = self.recorded[stage][0]
        else:
            tape: list[Any] = []
            g = self.fused.grad(u, self.data, tape=tape)
            self.tapes[stage] = tape[0] if tape else None
        return g if self.mu is None else g + self.mu * (u - self.theta)

    def pull(self, u: Tensor, w: Tensor, stage: int, with_grad: bool
             ) -> tuple[Tensor | None, Tensor]:
        tape = (self.recorded[stage][1] if stage < len(self.recorded)
                else self.tapes.get(stage))
        if self.need_x:
            hw, x_bar = self.fused.hvp_input(u, w, self.data, tape=tape)
            self._add(FIRST_DATA, x_bar)
            g = self.fused.grad(u, self.data) if with_grad else None
        else:
            g, hw = self.fused.grad_hvp(u, w, self.data, with_grad=with_grad, tape=tape)
        if self.mu is None:
            return g, hw
        if self.need_theta:
            self._add(THETA, -self.mu * (w.sum(0) if w.ndim > 1 else w))
        if self.need_mu:
            self._add(MU, (w * (u - self.theta)).sum())
        return (None if g is None else g + self.mu * (u - self.theta)), hw + self.mu * w

    def _add(self, i: int, g: Tensor) -> None:
        self.bars[i] = g if i not in self.bars else self.bars[i] + g


class FusedKernel(AbstractKernel):
    """See the module."""

    name = "fused"

    @classmethod
    def supports(cls, spec: FlowSpec, need: Sequence[bool]) -> str | None:
        fused, step_map = spec.objective.fused, spec.step_map
        if spec.random:
            return ("the loss draws random numbers: each replayed step is differentiated by "
                    "autograd, drawing once, as it drew in the forward pass")
        if fused is None:
            return ("the loss has no derivatives of its own (only a model that is a chain of "
                    "Linear and tanh/ReLU/sigmoid/identity layers has them)")
        if isinstance(step_map, AbstractSolver) and not is_tableau(step_map):
            return f"solver {type(step_map).__name__} overrides advance(): its tableau is unknown"
        if not step_map.gradient_at_u and \
                type(step_map).transpose is AbstractStepMap.transpose:
            return (f"step map {type(step_map).__name__} reads the gradient elsewhere than at "
                    "row 0 and has no transpose of its own")
        n_data = spec.n_data
        if any(need[FIRST_DATA + n_data + spec.n_hyper:]):
            return ("a tensor the loss reads needs a gradient: the fused loss gives H w, not "
                    "the mixed derivative")
        if any(need[FIRST_DATA + 1:FIRST_DATA + n_data]):
            return "the support targets need a gradient (the fused loss gives the inputs' only)"
        if n_data and need[FIRST_DATA] and not fused.input_grad:
            return "the support inputs need a gradient and this fused loss has no mixed derivative"
        return None

    def step(self, k: int, z: Tensor, reads: Reads, record: list[Any] | None = None) -> Tensor:
        r = reads.at(k)
        fused, data, mu, theta = self.spec.objective.fused, r.data, r.mu, r.theta
        assert fused is not None

        def grad(v: Tensor) -> Tensor:
            if record is None:
                g = fused.grad(v, data)
            else:
                tape: list[Any] = []
                g = fused.grad(v, data, tape=tape)
                record.append((g, tape[0] if tape else None))
            return g if mu is None else g + mu * (v - theta)

        return self.spec.step_map.step(k, z, grad, r)

    def vjp(self, k: int, z: Tensor, lam: Tensor, reads: Reads, need: Sequence[bool],
            tape: Any = None) -> tuple[Tensor, Cotangents]:
        fused = self.spec.objective.fused
        assert fused is not None
        own = FIRST_DATA + len(reads.data)  # the oracle differentiates theta, mu, the inputs
        leaves = reads.leaves([n if i == LR or i >= own else False for i, n in enumerate(need)],
                              k)
        r = leaves.at(k)
        oracle = _Oracle(fused, r, need, tape, reads.batches is None)
        lam_z, leaf_bars = self.spec.step_map.transpose(k, z.detach(), lam, oracle, r)
        cots: Cotangents = list(oracle.bars.items())
        if leaf_bars:
            index = {id(t): i for i, t in leaves.wanted(need)}
            cots += [(index[id(t)], g) for t, g in leaf_bars]
        return lam_z, cots

    def tape_numel(self, reads: Reads) -> int:
        """The loss's record of one gradient evaluation and the gradient itself (which the
        record keeps), times the gradients a step evaluates, and the point of each stage
        after the first (a Runge-Kutta stage's record views it); 0 where the loss records
        nothing."""
        fused = self.spec.objective.fused
        assert fused is not None
        record = fused.tape_numel(reads.at(0).data)
        if record == 0:
            return 0
        vector = reads.theta.numel() * (self.spec.n_tasks or 1)
        stages = self.spec.step_map.stages
        return (record + vector) * stages + vector * (stages - 1)

    def tape_flops(self, reads: Reads) -> int:
        """The gradients a step evaluates, which its record saves the VJP from taking
        again."""
        fused = self.spec.objective.fused
        assert fused is not None
        per_task = fused.grad_flops(reads.at(0).data)
        return per_task * (self.spec.n_tasks or 1) * self.spec.step_map.stages
