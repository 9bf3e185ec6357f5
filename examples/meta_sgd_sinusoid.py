"""Meta-SGD on sinusoids with a 100-step inner loop, written with the library API.

Meta-learns an initialisation *and* one inner learning rate per parameter tensor (Meta-SGD),
both by the adjoint meta-gradient of ``amaml.adapt_batch``: the whole meta-batch adapts as
one batched computation, and memory does not grow with the 100 inner steps.

    python examples/meta_sgd_sinusoid.py            # about 90 s on one CPU core
    python examples/meta_sgd_sinusoid.py --quick    # a few seconds (a smoke test)

Prints the meta-test MSE after adaptation from the initial and from the meta-learned
initialisation, and the learned inner learning rates.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import amaml


def sinusoids(n_tasks: int, n_points: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Support and query sets of ``n_tasks`` sinusoids a sin(x + b) (Finn et al., 2017)."""
    amp = 0.1 + 4.9 * torch.rand(n_tasks, 1, 1, generator=gen)
    phase = math.pi * torch.rand(n_tasks, 1, 1, generator=gen)
    x = 10 * torch.rand(n_tasks, 2 * n_points, 1, generator=gen) - 5
    y = amp * torch.sin(x + phase)
    return x[:, :n_points], y[:, :n_points], x[:, n_points:], y[:, n_points:]


def meta_test_mse(net: nn.Module, lr: dict[str, torch.Tensor], steps: int,
                  tasks: tuple[torch.Tensor, ...]) -> float:
    xs, ys, xq, yq = tasks
    params = amaml.adapt_batch(net, F.mse_loss, (xs, ys), steps=steps,
                               lr={k: v.detach() for k, v in lr.items()})
    with torch.no_grad():
        pred = amaml.functional_call_batch(net, params, xq)
        return float(((pred - yq) ** 2).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few iterations only")
    p.add_argument("--steps", type=int, default=100, help="inner steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    iters, steps = (20, 10) if args.quick else (500, args.steps)

    net = nn.Sequential(nn.Linear(1, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(),
                        nn.Linear(40, 1))
    # Meta-SGD: one learnable inner learning rate per parameter tensor, in log space so it
    # stays positive; the adjoint pass returns its gradient with theta's.
    log_lr = {n: torch.full((), math.log(0.01), requires_grad=True)
              for n, _ in net.named_parameters()}
    opt = torch.optim.Adam([{"params": net.parameters(), "lr": 1e-3},
                            {"params": list(log_lr.values()), "lr": 1e-2}])
    test = sinusoids(100, 10, gen)
    before = meta_test_mse(net, {n: v.exp() for n, v in log_lr.items()}, steps, test)

    for it in range(1, iters + 1):
        xs, ys, xq, yq = sinusoids(10, 10, gen)  # meta-batch of 10 tasks, 10 shots
        lr = {n: v.exp() for n, v in log_lr.items()}
        params = amaml.adapt_batch(net, F.mse_loss, (xs, ys), steps=steps, lr=lr,
                                   memory="checkpoint")
        loss = F.mse_loss(amaml.functional_call_batch(net, params, xq), yq)
        opt.zero_grad()
        loss.backward()  # the meta-gradient of theta and of every log-lr, by the adjoint
        opt.step()
        if it % max(1, iters // 10) == 0:
            print(f"iteration {it:4d}: meta-batch query MSE {loss.item():.4f}", flush=True)

    after = meta_test_mse(net, {n: v.exp() for n, v in log_lr.items()}, steps, test)
    print(f"meta-test MSE after {steps} inner steps (100 tasks, 10 shots): "
          f"{before:.4f} from the initial network, {after:.4f} meta-learned")
    print("learned inner learning rates: " + ", ".join(
        f"{n} {v.exp().item():.4f}" for n, v in log_lr.items()))


if __name__ == "__main__":
    main()
