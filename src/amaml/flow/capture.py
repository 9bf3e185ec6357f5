"""Which tensors that require grad a loss reads besides its arguments: they are meta-parameters.

A loss closure such as ``lambda p, t: w * F.mse_loss(p, t)`` with ``w`` requiring grad, or
an ``nn.Module`` loss with parameters, depends on tensors that the flow is never handed.
Their meta-gradient must not go missing silently. :func:`captured_leaves` finds them by
evaluating the loss once and walking its autograd graph down to the leaves
(``AccumulateGrad`` nodes); the flow then passes them to its autograd Function as inputs and
its sweep accumulates their gradients.

A captured tensor that requires grad but is not a leaf (computed from a leaf outside the
loss, e.g. ``w = raw.exp()`` before the call) cannot be differentiated step after step
without keeping its outside graph alive; it is refused with a message that says how to
write it (compute it inside the loss). It is recognised as a node that two evaluations of
the loss share: every node a loss evaluation creates is new.

A loss that draws random numbers (dropout in training mode) is recognised by the random
state it leaves changed: the flow then records each step's random state in the forward pass
and replays it wherever the step is evaluated again (:func:`replay_rng`), or, where it
cannot, refuses the loss (:class:`RandomLossError`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = ["RandomLossError", "captured_leaves", "replay_rng", "rng_states"]


class RandomLossError(ValueError):
    """The support loss draws random numbers (e.g. dropout in training mode)."""


def rng_states(device: torch.device) -> list[Tensor]:
    """The random states a computation on ``device`` draws from (CPU, and CUDA's there)."""
    return _rng_states(device)


@contextmanager
def replay_rng(device: torch.device, states: list[Tensor]) -> Iterator[None]:
    """Run a block from the random ``states`` (of :func:`rng_states`), then put the random
    state back as it was: a step evaluated again draws the masks it drew the first time,
    and nothing outside the block sees it."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        _restore(device, states)
        yield


def _rng_states(device: torch.device) -> list[Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda" and torch.cuda.is_available():
        states.append(torch.cuda.get_rng_state(device))
    return states


def _restore(device: torch.device, states: list[Tensor]) -> None:
    torch.set_rng_state(states[0])
    if len(states) > 1:
        torch.cuda.set_rng_state(states[1], device)


def _drop(_: Tensor) -> None:
    return None


def _unreachable(_: Any) -> Tensor:
    raise RuntimeError("internal: the graph of captured_leaves is never differentiated.")


def _nodes(root: Any) -> tuple[list[Any], list[Tensor]]:
    """Every node below ``root`` and the leaf variables of its ``AccumulateGrad`` nodes."""
    seen: set[int] = set()
    nodes: list[Any] = []
    leaves: list[Tensor] = []
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        var = getattr(node, "variable", None)
        if isinstance(var, Tensor):
            leaves.append(var)
            continue
        stack.extend(nxt for nxt, _ in node.next_functions)
    return nodes, leaves


def captured_leaves(total: Callable[[Tensor, Sequence[Tensor]], Tensor], u: Tensor,
                    data: Sequence[Tensor] | Callable[[], Sequence[Tensor]],
                    check_random: bool = True,
                    random_out: list[bool] | None = None) -> list[Tensor]:
    """The leaf tensors requiring grad that ``total(u, data)`` reads besides ``u`` and
    ``data``, in the order met.

    Args:
        total: The support loss (summed over tasks when batched).
        u: A parameter vector (any values: the state at which to evaluate).
        data: The data tensors (their own graphs are not walked), or a function that
            makes them anew (a mini-batch schedule's first batch: its graph, e.g. an
            indexing of a set that requires grad, is walked to that set).
        check_random: Refuse a loss that draws random numbers (for adjoints that evaluate
            the loss again in their backward pass).
        random_out: Instead of refusing a loss that draws random numbers, append whether
            it does to this list (the caller replays the draws). The random state is left
            as it was before the walk either way, so that the inner loop then draws what a
            plain loop would.

    Raises:
        ValueError: The loss reads a tensor that requires grad but is not a leaf.
        RandomLossError: The loss draws random numbers.
    """
    # The graphs are walked, never differentiated: what they would save is dropped at once
    # (less memory, and no cycle through a caller's own saved-tensor hooks).
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop, _unreachable):
        ul = u.detach().requires_grad_(True)

        def make() -> Sequence[Tensor]:
            return data() if callable(data) else [d.detach() for d in data]

        before = _rng_states(u.device)
        out = total(ul, make())
        after = _rng_states(u.device)
        random = any(not torch.equal(a, b) for a, b in zip(before, after))
        if random:
            _restore(u.device, before)
        if random_out is not None:
            random_out.append(random)
        elif check_random and random:
            raise RandomLossError(
                "The support loss draws random numbers (dropout in training mode, or a "
                "random op in the model or loss). The discrete adjoint's store, checkpoint, "
                "revolve and Budget strategies replay each step's draws exactly, but this "
                "adjoint (implicit, or memory='backsolve') evaluates the loss where the "
                "forward pass never did, so the draws cannot be replayed. Use one of those "
                "strategies, adjoint=Unrolled(), or put the dropout layers in eval mode for "
                "the inner loop (model.eval(), or module.p = 0).")
        if not isinstance(out, Tensor) or out.grad_fn is None:
            return []
        nodes, leaves = _nodes(out.grad_fn)
        found = [t for t in leaves if t is not ul]
        if not found:
            return []
        # A node that a second evaluation shares with the first was made outside the loss:
        # a non-leaf tensor that requires grad, captured.
        out2 = total(ul, make())
        if random:
            _restore(u.device, before)
        nodes2, _ = _nodes(out2.grad_fn)
        first = {id(n) for n in nodes}
        shared = [n for n in nodes2 if id(n) in first and getattr(n, "variable", None) is None]
        if shared:
            raise ValueError(
                f"The support loss reads a tensor that requires grad but is not a leaf (made "
                f"by {type(shared[0]).__name__} outside the loss): its meta-gradient would "
                "need that outside graph at every inner step. Compute it inside loss_fn from "
                "its leaf (e.g. lambda p, t: raw.exp() * F.mse_loss(p, t)), or detach it.")
    unique: list[Tensor] = []
    for t in found:
        if not any(t is s for s in unique):
            unique.append(t)
    return unique
