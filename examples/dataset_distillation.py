"""Dataset distillation on the 8x8 digits (or Omniglot) with exact long-horizon meta-gradients.

Learn K synthetic images per class (labels fixed) such that a freshly initialised network,
trained on them alone for N steps of the inner optimiser, reaches the best accuracy on real
data (Wang et al. 2018). Every meta-iteration draws a new random initialisation (seeded by
the iteration), trains it for N full-batch steps on the 10 K synthetic images, and scores
the result by the cross-entropy on a random batch of 256 real training images; the images
(and the log of the inner learning rate) follow the meta-gradient with Adam and are clamped
to [0, 1]. The meta-gradient with respect to the images comes from

- ``amaml``: ``amaml.adapt(..., memory="revolve")``, exact, memory flat in N;
- ``unrolled``: back-propagation through the whole inner loop (plain autograd), exact,
  memory linear in N; not run where its measured memory would exceed ``--max-memory-mb``;
- ``truncated``: back-propagation through the last ``--truncate`` (K_t) steps only, the
  first N - K_t without a graph (Shaban et al. 2019), biased, at the memory of K_t steps.

The distilled set is evaluated by training 10 fresh networks on it (the same optimiser, the
learned rate and N) and measuring accuracy on the 797 test images: mean and 95% confidence
interval (Student's t, 9 degrees of freedom). References: K random real images per class
(a new draw for every evaluation network; rate picked from a grid by accuracy on the
other training images) and the whole training set (1,000 images, 1,000 full-batch steps,
rate picked on a held-out fifth of the training set): the ceiling.

The models (``--model``): an MLP; ``cnn``, the field's ConvNet in its "metasmooth" form
(Engstrom et al. 2025): 3x3 convolutions of ``--width`` channels, each followed by a
per-channel normalisation (``--norm instance``: ``GroupNorm(C, C)``, as DC/MTT/RaT-BPTT;
``batch``: BatchNorm with batch statistics, as FRePo; ``none``), ReLU and 2x2 average
pooling, a linear head whose logits are multiplied by ``--logit-scale`` (0.1); its inner
rate starts at 0.3, the images' meta-rate is 0.1 and the meta-gradient is clipped to norm
``--clip`` (1). ``small-cnn`` is the earlier plain CNN (8 and 16 channels, no
normalisation, logits unscaled), which did not distil. ``--dataset omniglot`` distils
``--n-way`` (20) Omniglot characters at 28x28 (``omniglot_small.py``).

    python examples/dataset_distillation.py --steps 100 --images-per-class 1 \
        --meta-iters 300 --out D
    python examples/dataset_distillation.py --model cnn --steps 100 --images-per-class 1 \
        --meta-iters 300 --out D
    python examples/dataset_distillation.py --quick --out runs/dd-quick   # seconds (the tests)
    python examples/dataset_distillation.py --profile 10,100,1000 --out D  # time and memory

Writes ``DIR/results.json`` (``distilled_accuracy``, ``random_real_accuracy``,
``full_data_accuracy`` in [0, 1]; ``distilled_accuracy`` is that of the first method of
``--methods`` that ran, amaml by default; every method's under ``methods``),
``DIR/distilled_images.png`` (that method's images) and
``DIR/accuracy_vs_steps.png`` (this run, or every run that ``--plot-from`` names;
``--plot-only`` draws it without training).
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
    NORMS,
    InnerOpt,
    accuracy_and_loss,
    load_digits_split,
    make_model,
    mean_ci,
    plain_train,
    reinit_,
)
from omniglot_small import default_root, load_omniglot_split  # noqa: E402

import amaml  # noqa: E402

METHODS = ("amaml", "unrolled", "truncated")
LR_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
DEFAULT_LR = {"sgd": 0.1, "adam": 0.01}
# The ConvNet's recipe: its logits are scaled down 10x, so its inner rate starts higher; the
# images move faster (meta-rate 0.1), with the meta-gradient clipped to norm 1.
DEFAULT_LR_CNN = {"sgd": 0.3, "adam": 0.01}
DEFAULT_META_LR = {"cnn": 0.1}
DEFAULT_CLIP = {"cnn": 1.0}


def meta_loss(method: str, model: nn.Module, xs: Tensor, ys: Tensor, lr: Tensor, steps: int,
              opt: InnerOpt, xq: Tensor, yq: Tensor, truncate: int,
              memory: str | amaml.Revolve = "revolve") -> Tensor:
    """The real-data loss after ``steps`` inner steps on (xs, ys) from ``model``'s parameters,
    as a graph through which ``backward()`` gives the meta-gradient of ``method``."""
    if method == "amaml":
        params = amaml.adapt(model, F.cross_entropy, (xs, ys), steps=steps, lr=lr,
                             memory=memory, optimizer=opt.amaml())
        out = amaml.functional_call(model, params, xq)
    else:
        init = dict(model.named_parameters())
        start = 0 if method == "unrolled" else max(0, steps - truncate)
        params = plain_train(model, init, (xs, ys), steps, lr, opt, graph_from=start)
        out = torch.func.functional_call(model, params, (xq,))
    return F.cross_entropy(out, yq)


def image_gradient(method: str, model: nn.Module, xs: Tensor, ys: Tensor, lr: Tensor,
                   steps: int, opt: InnerOpt, xq: Tensor, yq: Tensor, truncate: int = 10
                   ) -> tuple[Tensor, Tensor]:
    """(d meta-loss / d xs, d meta-loss / d lr) of one method (used by the tests)."""
    xs = xs.detach().requires_grad_()
    lr = lr.detach().requires_grad_()
    loss = meta_loss(method, model, xs, ys, lr, steps, opt, xq, yq, truncate)
    gx, glr = torch.autograd.grad(loss, [xs, lr])
    return gx, glr


def train_eval(model: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float, opt: InnerOpt,
               seed: int, xe: Tensor, ye: Tensor) -> float:
    reinit_(model, seed)
    params = plain_train(model, dict(model.named_parameters()), (x, y), steps, lr, opt)
    return accuracy_and_loss(model, params, xe, ye)[0]


def n_classes_of(y: Tensor) -> int:
    return int(y.max()) + 1


def random_real(xtr: Tensor, ytr: Tensor, k: int, gen: torch.Generator
                ) -> tuple[Tensor, Tensor, Tensor]:
    """K random training images per class, and the mask of the others."""
    idx = []
    for c in range(n_classes_of(ytr)):
        pool = (ytr == c).nonzero().flatten()
        idx.append(pool[torch.randperm(len(pool), generator=gen)[:k]])
    sel = torch.cat(idx)
    rest = torch.ones(len(ytr), dtype=torch.bool)
    rest[sel] = False
    return xtr[sel], ytr[sel], rest


def references(model: nn.Module, data: tuple[Tensor, ...], k: int, steps: int, opt: InnerOpt,
               n_eval: int, full_steps: int, seed: int, grid: tuple[float, ...]) -> dict:
    xtr, ytr, xte, yte = data
    out: dict = {}
    # K random real images per class: the rate with the best accuracy on the other training
    # images (3 draws per rate), then n_eval fresh draws and networks on the test set.
    gen = torch.Generator().manual_seed(10_000 + seed)
    scores = {}
    for lr in grid:
        accs = []
        for j in range(min(3, n_eval)):
            xs, ys, rest = random_real(xtr, ytr, k, gen)
            accs.append(train_eval(model, xs, ys, steps, lr, opt, 20_000 + j, xtr[rest], ytr[rest]))
        scores[lr] = sum(accs) / len(accs)
    best = max(scores, key=lambda r: scores[r])
    accs = []
    for j in range(n_eval):
        xs, ys, _ = random_real(xtr, ytr, k, gen)
        accs.append(train_eval(model, xs, ys, steps, best, opt, 30_000 + j, xte, yte))
    out["random_real"] = {"lr": best, "val_accuracy_by_lr": {str(r): s for r, s in scores.items()},
                          "test_accuracy": mean_ci(accs)}
    if full_steps == 0:  # skipped: it depends on neither N, K nor the seed
        out["full_data"] = {"skipped": "--full-steps 0", "test_accuracy": {"mean": None}}
        return out
    # The whole training set: rate picked on a held-out fifth, then trained on all of it.
    n_val = len(ytr) // 5
    scores = {lr: train_eval(model, xtr[n_val:], ytr[n_val:], full_steps, lr, opt, 40_000,
                             xtr[:n_val], ytr[:n_val]) for lr in grid}
    best = max(scores, key=lambda r: scores[r])
    accs = [train_eval(model, xtr, ytr, full_steps, best, opt, 50_000 + j, xte, yte)
            for j in range(n_eval)]
    out["full_data"] = {"lr": best, "steps": full_steps,
                        "val_accuracy_by_lr": {str(r): s for r, s in scores.items()},
                        "test_accuracy": mean_ci(accs)}
    return out


def distill(method: str, model: nn.Module, data: tuple[Tensor, ...], k: int, steps: int,
            opt: InnerOpt, meta_iters: int, seed: int, args: argparse.Namespace) -> dict:
    xtr, ytr, xte, yte = data
    gen = torch.Generator().manual_seed(seed)
    if args.init == "real":
        xs0, ys, _ = random_real(xtr, ytr, k, gen)
        xs = xs0.clone()
    else:
        xs = torch.rand(k * n_classes_of(ytr), xtr.shape[1], generator=gen)
        ys = torch.arange(n_classes_of(ytr)).repeat_interleave(k)
    xs.requires_grad_()
    log_lr = torch.tensor(math.log(args.lr), requires_grad=True)
    groups = [{"params": [xs], "lr": args.meta_lr}]
    if args.learn_lr:
        groups.append({"params": [log_lr], "lr": args.meta_lr_lr})
    meta_opt = torch.optim.Adam(groups)
    history: list[float] = []
    norms: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(meta_iters), desc=f"{method} N={steps}", disable=args.no_progress,
               mininterval=2.0)
    for it in bar:
        reinit_(model, 1_000_000 * (seed + 1) + it)
        q = torch.randperm(len(ytr), generator=gen)[:args.query_batch]
        loss = meta_loss(method, model, xs, ys, log_lr.exp(), steps, opt, xtr[q], ytr[q],
                         args.truncate)
        meta_opt.zero_grad()
        loss.backward()
        if not (torch.isfinite(xs.grad).all() and torch.isfinite(log_lr.grad)):
            raise FloatingPointError(f"{method}: non-finite meta-gradient at iteration {it}")
        if args.clip > 0:
            # One norm over the images and log lr, as torch.nn.utils.clip_grad_norm_: a long
            # exact unroll's rare huge meta-gradients would otherwise inflate Adam's second
            # moment (or, at its first step, move the images by a full meta-rate at once).
            norms.append(float(torch.nn.utils.clip_grad_norm_([xs, log_lr], args.clip)))
        meta_opt.step()
        with torch.no_grad():
            xs.clamp_(0.0, 1.0)
            log_lr.clamp_(math.log(1e-4), math.log(10.0))
        history.append(float(loss.detach()))
        bar.set_postfix(loss=f"{history[-1]:.3f}", lr=f"{float(log_lr.detach().exp()):.3g}")
    seconds = time.perf_counter() - t0
    lr = float(log_lr.detach().exp())
    accs = [train_eval(model, xs.detach(), ys, steps, lr, opt, 60_000 + j, xte, yte)
            for j in range(args.eval_nets)]
    return {"test_accuracy": mean_ci(accs), "learned_lr": lr, "meta_loss_history": history,
            "meta_grad_norm_history": norms, "meta_seconds": seconds,
            "images": xs.detach().tolist(), "labels": ys.tolist()}


def profile(model: nn.Module, data: tuple[Tensor, ...], k: int, steps_list: list[int],
            opt: InnerOpt, args: argparse.Namespace) -> list[dict]:
    """Time and peak memory of one meta-gradient (meta-loss and backward) per method and N.

    Time: the fastest of ``--profile-repeats`` calls after a warm-up (N >= 10000: one call).
    Peak memory is measured in a forked child (``amaml.experiments.memory.peak_memory_mib``);
    unrolled back-propagation is skipped once the last N it ran, scaled linearly, would pass
    ``--max-memory-mb``."""
    from amaml.experiments.memory import peak_memory_mib

    xtr, ytr = data[0], data[1]
    gen = torch.Generator().manual_seed(0)
    xs = torch.rand(k * n_classes_of(ytr), xtr.shape[1], generator=gen)
    ys = torch.arange(n_classes_of(ytr)).repeat_interleave(k)
    xq, yq = xtr[:args.query_batch], ytr[:args.query_batch]
    lr = torch.tensor(args.lr)
    rows = []
    last_unrolled: tuple[int, float] | None = None
    for steps in steps_list:
        for method in METHODS:
            row = {"method": method, "steps": steps}
            if method == "unrolled" and last_unrolled is not None:
                n0, mib0 = last_unrolled
                if mib0 * steps / n0 > args.max_memory_mb:
                    row.update(skipped=f"predicted {mib0 * steps / n0:.0f} MiB "
                                       f"> --max-memory-mb {args.max_memory_mb}")
                    rows.append(row)
                    print(row, flush=True)
                    continue

            def one(method: str = method, steps: int = steps) -> None:
                reinit_(model, 0)
                x = xs.clone().requires_grad_()
                r = lr.clone().requires_grad_()
                meta_loss(method, model, x, ys, r, steps, opt, xq, yq, args.truncate,
                          args.profile_memory).backward()

            if steps < 10_000:
                one()  # warm-up
            times = []
            for _ in range(args.profile_repeats if steps < 10_000 else 1):
                t0 = time.perf_counter()
                one()
                times.append(time.perf_counter() - t0)
            row["seconds"] = min(times)
            row["peak_mib"] = peak_memory_mib(one)
            if method == "unrolled":
                last_unrolled = (steps, row["peak_mib"])
            rows.append(row)
            print(row, flush=True)
    return rows


def cross_eval(model: nn.Module, data: tuple[Tensor, ...], results: list[dict],
               steps_list: list[int], n_eval: int) -> list[dict]:
    """Each distilled set (of each method in each results.json) used to train fresh
    networks for other numbers of steps than it was distilled for (its learned rate)."""
    rows = []
    for r in results:
        opt = InnerOpt(r["optimizer"])
        if r["model"] != getattr(model, "_kind", r["model"]):
            continue
        for method, res in r["methods"].items():
            if "images" not in res:
                continue
            xs, ys = torch.tensor(res["images"]), torch.tensor(res["labels"])
            row = {"model": r["model"], "optimizer": r["optimizer"], "method": method,
                   "images_per_class": r["images_per_class"], "distilled_for": r["steps"],
                   "seed": r["seed"], "test_accuracy_at": {}}
            for n in steps_list:
                accs = [train_eval(model, xs, ys, n, res["learned_lr"], opt, 60_000 + j,
                                   data[2], data[3]) for j in range(n_eval)]
                row["test_accuracy_at"][str(n)] = mean_ci(accs)
            rows.append(row)
            print(row["method"], row["distilled_for"], row["seed"],
                  {k: round(v["mean"], 3) for k, v in row["test_accuracy_at"].items()},
                  flush=True)
    return rows


def plot_images(images: Tensor, k: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = min(k, 10)  # one column per class, up to 10 rows
    side = math.isqrt(images.shape[1])
    n_classes = images.shape[0] // k
    per = images.reshape(n_classes, k, side, side)
    fig = plt.figure(figsize=(n_classes * 0.7, shown * 0.7 + 0.5))
    axes = fig.subplots(shown, n_classes, squeeze=False)
    for c in range(n_classes):
        for j in range(min(k, 10)):
            ax = axes[j][c]
            ax.imshow(per[c, j].numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_title(str(c), fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def plot_accuracy(results: list[dict], path: Path) -> None:
    """Accuracy against N: distilled (each method), random real, full data; one line per
    (model, optimiser, K) found."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r.get("dataset", "digits"), r["model"], r["optimizer"],
                           r["images_per_class"]), []).append(r)
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"amaml": ("C0", "o-"), "unrolled": ("C2", "s--"), "truncated": ("C3", "v-"),
              "random_real": ("C7", "x:")}
    for (dataset, model, optname, k), rs in sorted(groups.items()):
        label = f"{dataset} {model} {optname} K={k}"
        for key, (color, style) in styles.items():
            pts: dict[int, list[float]] = {}
            for r in rs:
                acc = (r["random_real_accuracy"] if key == "random_real"
                       else r["methods"].get(key, {}).get("test_accuracy", {}).get("mean"))
                if acc is not None:
                    pts.setdefault(r["steps"], []).append(acc)
            if pts:
                ns = sorted(pts)
                ax.plot(ns, [sum(pts[n]) / len(pts[n]) for n in ns], style, color=color,
                        label=f"{key} ({label})", ms=4)
        full = [r["full_data_accuracy"] for r in rs if r["full_data_accuracy"] is not None]
        if not full:
            continue
        ax.axhline(sum(full) / len(full), color="k", lw=0.8, ls="-.",
                   label=f"full data ({label})")
    ax.set_xscale("log")
    ax.set_xlabel("inner steps N")
    ax.set_ylabel("test accuracy (mean of fresh networks)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _found(where: str) -> list[dict]:
    """The results.json files below a folder, or matching a glob pattern."""
    import glob

    files = (sorted(glob.glob(where)) if any(c in where for c in "*?[")
             else sorted(str(f) for f in Path(where).rglob("results.json")))
    return [json.loads(Path(f).read_text()) for f in files]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100, help="inner steps N")
    p.add_argument("--images-per-class", type=int, default=1, help="K")
    p.add_argument("--meta-iters", type=int, default=300)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                   help="inner optimiser: sgd (momentum 0.9) or adam")
    p.add_argument("--model", choices=("mlp", "cnn", "small-cnn"), default="mlp",
                   help="cnn: the normalised ConvNet (the flags below); small-cnn: the "
                        "earlier plain 8-16 channel CNN")
    p.add_argument("--dataset", choices=("digits", "omniglot"), default="digits",
                   help="digits: sklearn 8x8; omniglot: --n-way random characters of the "
                        "minimal background split, 28x28, 15 drawers train, 5 test")
    p.add_argument("--omniglot-root", default=None,
                   help="folder of images_background_small1.zip (default "
                        "<repo>/../shared/data/omniglot)")
    p.add_argument("--n-way", type=int, default=20, help="Omniglot characters (classes)")
    p.add_argument("--width", type=int, default=32, help="cnn: channels per block")
    p.add_argument("--norm", choices=NORMS, default="instance",
                   help="cnn: per-channel normalisation before each ReLU: instance "
                        "(GroupNorm(C, C)), batch (batch statistics always) or none")
    p.add_argument("--logit-scale", type=float, default=0.1,
                   help="cnn: fixed factor on the logits (1: unscaled)")
    p.add_argument("--clip", type=float, default=None,
                   help="clip the meta-gradient (images and log lr) to this norm; 0: off "
                        f"(default {DEFAULT_CLIP['cnn']} for cnn, off otherwise)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (the first one run "
                        "gives distilled_accuracy)")
    p.add_argument("--truncate", type=int, default=10, help="K_t of truncated back-propagation")
    p.add_argument("--max-memory-mb", type=float, default=64.0,
                   help="unrolled back-propagation is not run above this peak memory")
    p.add_argument("--lr", type=float, default=None,
                   help="initial inner learning rate (default 0.1 for sgd, 0.01 for adam; "
                        f"cnn: {DEFAULT_LR_CNN['sgd']} for sgd, {DEFAULT_LR_CNN['adam']} "
                        "for adam)")
    p.add_argument("--no-learn-lr", dest="learn_lr", action="store_false",
                   help="keep the inner learning rate fixed")
    p.add_argument("--meta-lr", type=float, default=None,
                   help=f"Adam's rate on the images (default {DEFAULT_META_LR['cnn']} for cnn, "
                        "0.01 otherwise)")
    p.add_argument("--meta-lr-lr", type=float, default=0.01, help="Adam's rate on log lr")
    p.add_argument("--init", choices=("noise", "real"), default="noise",
                   help="start from uniform noise or from random real images")
    p.add_argument("--query-batch", type=int, default=256)
    p.add_argument("--eval-nets", type=int, default=10)
    p.add_argument("--full-steps", type=int, default=1000,
                   help="steps of the whole-training-set reference (0: skip it; it is "
                        "the same for every N, K and --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images and the meta-loop")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--profile", default="",
                   help="comma-separated N: measure one meta-gradient of each method instead")
    p.add_argument("--profile-memory", default="revolve",
                   help="amaml's memory strategy in --profile (e.g. auto, store, checkpoint)")
    p.add_argument("--profile-repeats", type=int, default=3,
                   help="timed calls after a warm-up (the fastest is reported)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--plot-from", default="",
                   help="a folder (every results.json below it) or a glob pattern of "
                        "results.json files: plot accuracy against N from them")
    p.add_argument("--cross-eval", default="",
                   help="comma-separated N: train fresh networks for N steps on each distilled "
                        "set in --plot-from (of --model) and write DIR/cross_eval.json")
    p.add_argument("--plot-only", action="store_true",
                   help="only write DIR/accuracy_vs_steps.png from --plot-from")
    p.add_argument("--quick", action="store_true", help="a few seconds (a smoke test)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="runs/dataset_distillation")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.lr is None:
        args.lr = (DEFAULT_LR_CNN if args.model == "cnn" else DEFAULT_LR)[args.optimizer]
    if args.meta_lr is None:
        args.meta_lr = DEFAULT_META_LR.get(args.model, 0.01)
    if args.clip is None:
        args.clip = DEFAULT_CLIP.get(args.model, 0.0)
    grid = LR_GRID
    if args.quick:
        args.steps, args.meta_iters, args.eval_nets = min(args.steps, 5), 3, 2
        args.full_steps, args.query_batch, grid = 5, 32, (0.1,)
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dataset == "omniglot":
        root = Path(args.omniglot_root) if args.omniglot_root else default_root()
        try:
            data = load_omniglot_split(root, n_way=args.n_way, seed=args.split_seed,
                                       dtype=dtype)
        except FileNotFoundError as e:
            print(f"skipped: {e}", flush=True)
            return {"skipped": str(e)}
        split = (f"{args.n_way} characters picked by numpy.random.default_rng("
                 f"{args.split_seed}) from images_background_small1, 28x28; drawers 1-15 "
                 "train, 16-20 test")
    else:
        data = load_digits_split(args.split_seed, dtype)
        split = f"seeded permutation (seed {args.split_seed}): 1000 train, 797 test"
    if args.model == "small-cnn" and args.dataset != "digits":
        p.error("--model small-cnn is for 8x8 digits only")
    model = make_model(args.model, side=math.isqrt(data[0].shape[1]),
                       n_classes=n_classes_of(data[1]), width=args.width, norm=args.norm,
                       logit_scale=args.logit_scale).to(dtype)
    model._kind = args.model
    opt = InnerOpt(args.optimizer)
    k = args.images_per_class

    if args.cross_eval:
        rows = cross_eval(model, data, _found(args.plot_from),
                          [int(n) for n in args.cross_eval.split(",")], args.eval_nets)
        (out / "cross_eval.json").write_text(json.dumps(rows, indent=1))
        return {"rows": rows}
    if args.plot_only:
        plot_accuracy(_found(args.plot_from), out / "accuracy_vs_steps.png")
        return {}
    if args.profile:
        rows = profile(model, data, k, [int(s) for s in args.profile.split(",")], opt, args)
        (out / "profile.json").write_text(json.dumps({
            "model": args.model, "optimizer": args.optimizer, "images_per_class": k,
            "truncate": args.truncate, "max_memory_mb": args.max_memory_mb, "rows": rows},
            indent=1))
        return {"rows": rows}

    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}")
    result: dict = {"dataset": args.dataset, "model": args.model, "optimizer": args.optimizer,
                    "steps": args.steps, "images_per_class": k, "meta_iters": args.meta_iters,
                    "seed": args.seed, "split": split, "lr_init": args.lr,
                    "clip": args.clip, "meta_lr": args.meta_lr,
                    "ci": "95% Student t over eval networks",
                    "argv": sys.argv[1:] if argv is None else argv, "methods": {}}
    if args.model == "cnn":
        result["cnn"] = {"width": args.width, "norm": args.norm,
                         "logit_scale": args.logit_scale,
                         "depth": len(model.features) // (3 if args.norm == "none" else 4)}
    ref = references(model, data, k, args.steps, opt, args.eval_nets, args.full_steps,
                     args.seed, grid)
    result["references"] = ref
    result["random_real_accuracy"] = ref["random_real"]["test_accuracy"]["mean"]
    result["full_data_accuracy"] = ref["full_data"]["test_accuracy"]["mean"]
    print(f"random real ({k}/class): {result['random_real_accuracy']:.3f}  "
          f"full data: {result['full_data_accuracy']}", flush=True)
    for method in methods:
        if method == "unrolled" and not args.quick:
            from amaml.experiments.memory import peak_memory_mib

            probe = max(1, min(args.steps, 20))
            xs = torch.rand(k * n_classes_of(data[1]), data[0].shape[1])
            ys = torch.arange(n_classes_of(data[1])).repeat_interleave(k)

            def one(probe: int = probe, xs: Tensor = xs, ys: Tensor = ys) -> None:
                reinit_(model, 0)
                meta_loss("unrolled", model, xs.requires_grad_(), ys,
                          torch.tensor(args.lr, requires_grad=True), probe, opt,
                          data[0][:args.query_batch], data[1][:args.query_batch],
                          args.truncate).backward()

            need = peak_memory_mib(one) * args.steps / probe
            if need > args.max_memory_mb:
                result["methods"][method] = {
                    "skipped": f"needs about {need:.0f} MiB > --max-memory-mb "
                               f"{args.max_memory_mb:g}"}
                print(f"unrolled: {result['methods'][method]['skipped']}", flush=True)
                continue
        res = distill(method, model, data, k, args.steps, opt, args.meta_iters, args.seed, args)
        result["methods"][method] = res
        acc = res["test_accuracy"]
        print(f"{method}: distilled ({k}/class, N={args.steps}) test accuracy "
              f"{acc['mean']:.3f} +- {acc['ci95']:.3f}, learned lr {res['learned_lr']:.4g}, "
              f"{res['meta_seconds']:.0f} s", flush=True)
    first = next((m for m in methods if "test_accuracy" in result["methods"].get(m, {})), None)
    result["distilled_method"] = first
    result["distilled_accuracy"] = (result["methods"][first]["test_accuracy"]["mean"]
                                    if first else None)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    if first:
        imgs = torch.tensor(result["methods"][first]["images"])
        plot_images(imgs, k, out / "distilled_images.png",
                    f"{first}, {args.model} {args.optimizer}, N={args.steps}: test accuracy "
                    f"{result['distilled_accuracy']:.3f} (random real "
                    f"{result['random_real_accuracy']:.3f})")
    plot_accuracy(_found(args.plot_from) if args.plot_from else [result],
                  out / "accuracy_vs_steps.png")
    print(f"distilled accuracy {result['distilled_accuracy']}, random real "
          f"{result['random_real_accuracy']:.3f}, full data {result['full_data_accuracy']}"
          f" -> {out / 'results.json'}", flush=True)
    return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
