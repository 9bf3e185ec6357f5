"""A learned learning-rate schedule and per-layer weight decay through a whole training run.

Maclaurin et al. (2015) learned a per-step, per-layer learning-rate schedule of SGD with
momentum by differentiating the validation loss through the whole training run. Here the
run is N steps (100 to 10,000) of SGD with momentum 0.9 on mini-batches of 100 of
scikit-learn's 8x8 digits, training an MLP 64-128-10 from a fresh random initialisation
(seeded by the meta-iteration). The hyperparameters:

- a learning rate per step and per parameter tensor (weights and biases of each layer):
  ``lr = {name: exp(log_lr[name])}`` of shape ``(N, 1, ...)``, amaml's per-step per-parameter
  form;
- a weight decay per layer (the two weight matrices), written as the L2 term
  ``sum_l wd_l / 2 ||W_l||^2`` of the inner loss, which for SGD is exactly torch.optim's
  coupled ``weight_decay`` of a per-layer parameter group. The inner loss closure only sees
  the model's output, so the model is wrapped (``Regularised``) to return
  ``(logits, penalty)`` with the penalty computed inside its forward from ``log_wd``
  (a plain tensor attribute, not a parameter, so it is not adapted).

Meta-objective: the cross-entropy on a validation set (300 of the 1,000 training images;
the network trains on the other 700) after the N steps; Adam on (log_lr, log_wd). The
meta-gradient is exact (``amaml.adapt(..., memory="revolve")``) or truncated to the last
K_t steps (Shaban et al. 2019; plain autograd; the earlier steps' rates then get no
gradient at all). Compared with the best constant rate of a grid (no weight decay; picked
by validation loss): test accuracy and loss of 10 fresh networks (new initialisations and
mini-batch orders) on the 797 test images, mean and 95% CI (Student's t).

    python examples/learned_schedule.py --steps 1000 --meta-iters 100 --out DIR
    python examples/learned_schedule.py --quick --out runs/ls-quick   # seconds (the tests)

Writes ``DIR/results.json`` and ``DIR/schedule.png`` (the learned schedules, one curve per
parameter tensor, as in Maclaurin et al.'s Figure 2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_common import (  # noqa: E402
    InnerOpt,
    load_digits_split,
    make_model,
    mean_ci,
    plain_train,
    reinit_,
)

import amaml  # noqa: E402

GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
N_VAL = 300
BATCH = 100


class Regularised(nn.Module):
    """``net`` whose forward also returns the per-layer L2 penalty of its weight matrices."""

    def __init__(self, net: nn.Module, log_wd: Tensor | None) -> None:
        super().__init__()
        self.net = net
        self.log_wd = log_wd  # a plain attribute: read by the loss, not adapted

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(x)
        if self.log_wd is None:
            return out, out.new_zeros(())
        wd = self.log_wd.exp()
        weights = [m.weight for m in self.net if isinstance(m, nn.Linear)]
        return out, 0.5 * sum(w_l * W.square().sum() for w_l, W in zip(wd, weights))


def inner_loss(out: tuple[Tensor, Tensor], y: Tensor) -> Tensor:
    return F.cross_entropy(out[0], y) + out[1]


def rates(model: Regularised, log_lr: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-step per-parameter rates ``(N, 1, ...)`` broadcastable to each parameter."""
    return {n: log_lr[n].exp().reshape(-1, *([1] * p.dim()))
            for n, p in model.named_parameters()}


def final_params(method: str, model: Regularised, support: amaml.MiniBatches, steps: int,
                 lr: dict[str, Tensor], truncate: int) -> dict[str, Tensor]:
    opt = InnerOpt("sgd")
    if method == "exact":
        return amaml.adapt(model, inner_loss, support, steps=steps, lr=lr, memory="revolve",
                           optimizer=opt.amaml())
    start = 0 if method == "unrolled" else max(0, steps - truncate)
    return plain_train(model, dict(model.named_parameters()), support, steps, lr, opt,
                       graph_from=start, loss_fn=inner_loss)


def val_loss(model: Regularised, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(torch.func.functional_call(model, params, (x,))[0], y)


def hypergradient(method: str, model: Regularised, support: amaml.MiniBatches, steps: int,
                  log_lr: dict[str, Tensor], xv: Tensor, yv: Tensor, truncate: int = 10
                  ) -> list[Tensor]:
    """d val loss / d (log_lr..., log_wd) of one method (used by the tests)."""
    leaves = list(log_lr.values()) + [model.log_wd]
    params = final_params(method, model, support, steps, rates(model, log_lr), truncate)
    return list(torch.autograd.grad(val_loss(model, params, xv, yv), leaves))


def evaluate(model: Regularised, x: Tensor, y: Tensor, steps: int, lr: dict[str, Tensor] | float,
             data: tuple[Tensor, ...], seeds: range) -> dict:
    xte, yte = data
    accs, losses = [], []
    for s in seeds:
        reinit_(model, s)
        support = amaml.MiniBatches(x, y, batch_size=BATCH, seed=s)
        with torch.no_grad():
            p = plain_train(model, dict(model.named_parameters()), support, steps, lr,
                            InnerOpt("sgd"), loss_fn=inner_loss)
            out = torch.func.functional_call(model, p, (xte,))[0]
        if not torch.isfinite(out).all():
            accs.append(0.0)
            losses.append(float("inf"))
            continue
        accs.append(float((out.argmax(-1) == yte).float().mean()))
        losses.append(float(F.cross_entropy(out, yte)))
    return {"test_accuracy": mean_ci(accs), "test_loss": mean_ci(losses)}


def best_constant(model: Regularised, x: Tensor, y: Tensor, xv: Tensor, yv: Tensor, steps: int,
                  grid: tuple[float, ...], n: int) -> tuple[float, dict[str, float]]:
    scores = {}
    for lr in grid:
        r = evaluate(model, x, y, steps, lr, (xv, yv), range(70_000, 70_000 + n))
        scores[lr] = r["test_loss"]["mean"]  # here the "test" set is the validation set
    return min(scores, key=lambda r: scores[r]), scores


def learn(method: str, model: Regularised, x: Tensor, y: Tensor, xv: Tensor, yv: Tensor,
          steps: int, init_lr: float, args: argparse.Namespace) -> dict:
    log_lr = {n: torch.full((steps,), math.log(init_lr), requires_grad=True)
              for n, _ in model.named_parameters()}
    log_wd = torch.full((2,), math.log(args.init_wd), requires_grad=True)
    model.log_wd = log_wd
    meta_opt = torch.optim.Adam(list(log_lr.values()) + [log_wd], lr=args.meta_lr)
    history = []
    t0 = time.perf_counter()
    bar = tqdm(range(args.meta_iters), desc=f"{method} N={steps}", disable=args.no_progress,
               mininterval=2.0)
    for it in bar:
        reinit_(model, 1_000_000 * (args.seed + 1) + it)
        support = amaml.MiniBatches(x, y, batch_size=BATCH, seed=it + 1000 * args.seed)
        params = final_params(method, model, support, steps, rates(model, log_lr), args.truncate)
        loss = val_loss(model, params, xv, yv)
        meta_opt.zero_grad()
        loss.backward()
        meta_opt.step()
        with torch.no_grad():
            for t in log_lr.values():
                t.clamp_(math.log(1e-5), math.log(3.0))
            log_wd.clamp_(math.log(1e-6), math.log(1.0))
        history.append(float(loss.detach()))
        bar.set_postfix(val=f"{history[-1]:.3f}")
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        lr = {n: t.detach().exp().reshape(-1, *([1] * p.dim()))
              for (n, t), p in zip(log_lr.items(), model.parameters())}
    return {"schedule": {n: t.detach().exp().tolist() for n, t in log_lr.items()},
            "weight_decay": log_wd.detach().exp().tolist(), "val_loss_history": history,
            "meta_seconds": seconds, "_lr": lr}


def plot_schedules(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learned = [m for m in ("exact", "truncated") if m in result["methods"]]
    fig, axes = plt.subplots(1, len(learned), figsize=(4.2 * len(learned), 3.2), squeeze=False,
                             sharey=True)
    names = {"net.0.weight": "layer 1 weights", "net.0.bias": "layer 1 biases",
             "net.2.weight": "layer 2 weights", "net.2.bias": "layer 2 biases"}
    for ax, m in zip(axes[0], learned):
        res = result["methods"][m]
        for i, (n, sched) in enumerate(res["schedule"].items()):
            ax.plot(range(1, len(sched) + 1), sched, color=f"C{i}", lw=1,
                    label=names.get(n, n))
        ax.axhline(result["best_constant"]["lr"], color="k", ls=":", lw=0.8,
                   label="best constant")
        wd = ", ".join(f"{w:.2g}" for w in res["weight_decay"])
        acc = res["test_accuracy"]["mean"]
        ax.set_title(f"{m}: test acc {acc:.3f}, wd = ({wd})", fontsize=8)
        ax.set_xlabel("schedule index (inner step)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("learning rate")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="inner steps N")
    p.add_argument("--meta-iters", type=int, default=100)
    p.add_argument("--methods", default="exact,truncated",
                   help="comma-separated subset of exact,truncated")
    p.add_argument("--truncate", type=int, default=10, help="K_t of truncated back-propagation")
    p.add_argument("--meta-lr", type=float, default=0.05, help="Adam's rate on log lr, log wd")
    p.add_argument("--init-lr", type=float, default=None,
                   help="initial constant schedule (default: the grid's best)")
    p.add_argument("--init-wd", type=float, default=1e-4)
    p.add_argument("--eval-nets", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few seconds (a smoke test)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="runs/learned_schedule")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    grid, n_grid = GRID, 3
    if args.quick:
        args.steps, args.meta_iters, args.eval_nets, grid, n_grid = 20, 3, 2, (0.03, 0.1), 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = load_digits_split(args.split_seed)
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(args.split_seed))
    xv, yv = xtr[perm[:N_VAL]], ytr[perm[:N_VAL]]
    x, y = xtr[perm[N_VAL:]], ytr[perm[N_VAL:]]
    model = Regularised(make_model("mlp"), None)
    steps = args.steps

    best, scores = best_constant(model, x, y, xv, yv, steps, grid, n_grid)
    eval_seeds = range(80_000, 80_000 + args.eval_nets)
    result: dict = {
        "steps": steps, "meta_iters": args.meta_iters, "truncate": args.truncate,
        "seed": args.seed, "argv": sys.argv[1:] if argv is None else argv,
        "split": f"seeded permutation (seed {args.split_seed}): 1000 train (700 fit, "
                 f"{N_VAL} validation), 797 test", "ci": "95% Student t over eval networks",
        "best_constant": {"lr": best, "val_loss_by_lr": {str(r): s for r, s in scores.items()},
                          **evaluate(model, x, y, steps, best, (xte, yte), eval_seeds)},
        "methods": {}}
    bc = result["best_constant"]
    print(f"best constant lr {best:g}: test accuracy {bc['test_accuracy']['mean']:.3f} +- "
          f"{bc['test_accuracy']['ci95']:.3f}, loss {bc['test_loss']['mean']:.3f}", flush=True)
    init_lr = args.init_lr if args.init_lr is not None else best
    for method in [m for m in args.methods.split(",") if m]:
        if method not in ("exact", "truncated"):
            p.error(f"unknown method {method!r}")
        res = learn(method, model, x, y, xv, yv, steps, init_lr, args)
        lr = res.pop("_lr")
        model.log_wd = torch.tensor([math.log(w) for w in res["weight_decay"]])
        res.update(evaluate(model, x, y, steps, lr, (xte, yte), eval_seeds))
        model.log_wd = None
        result["methods"][method] = res
        print(f"{method}: test accuracy {res['test_accuracy']['mean']:.3f} +- "
              f"{res['test_accuracy']['ci95']:.3f}, loss {res['test_loss']['mean']:.3f}, "
              f"weight decay {res['weight_decay']}, final val loss "
              f"{res['val_loss_history'][-1]:.3f}, {res['meta_seconds']:.0f} s", flush=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    if result["methods"]:
        plot_schedules(result, out / "schedule.png")
    return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
