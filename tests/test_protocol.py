"""The authors' protocol (``--protocol paper``): preset, Adam fine-tuning, proximal query
loss, reference rows, the inner-steps sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from amaml.algorithms import make_algorithm
from amaml.cli import main
from amaml.experiments.config import PROTOCOLS, TrainConfig
from amaml.experiments.evaluate import finetune_curve, nrmse_per_task
from amaml.tasks import Task, TaskSet

DT = torch.float64


def test_paper_preset_sets_every_documented_field() -> None:
    c = TrainConfig.from_protocol("paper")
    expected = {
        "meta_optimizer": "sgd", "meta_lr": 0.01, "meta_iters": 5000, "meta_batch": 5,
        "loss": "half-mse", "inner_lr": 0.01, "solver": "rk4", "proximal": 1.0,
        "proximal_in_query": True, "dtype": "float64", "n_train": 100, "n_test": 100,
        "pool": 1000, "finetune_optimizer": "adam", "finetune_lr": 1e-3,
        "finetune_weight_decay": 1e-6, "finetune_epochs": 1000, "finetune_every": 10,
    }
    assert {k: getattr(c, k) for k in expected} == expected
    assert set(PROTOCOLS["paper"]) >= set(expected)
    assert c.protocol == "paper"
    # Every field stays overridable; the default protocol changes nothing.
    o = TrainConfig.from_protocol("paper", meta_optimizer="adam", pool=None, steps=7)
    assert (o.meta_optimizer, o.pool, o.steps, o.solver) == ("adam", None, 7, "rk4")
    assert TrainConfig.from_protocol("amaml") == TrainConfig()
    with pytest.raises(ValueError, match="Unknown protocol 'nope'"):
        TrainConfig.from_protocol("nope")
    with pytest.raises(ValueError, match=r"shots \(--shots\) \(50\) must not exceed pool"):
        TrainConfig(pool=20)


def _tasks(n_tasks: int = 3, n: int = 12) -> TaskSet:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n_tasks):
        x = torch.randn(n, 2, generator=g, dtype=DT)
        y = torch.sin(2 * x[:, :1]) + 0.1 * torch.randn(n, 1, generator=g, dtype=DT)
        xt = torch.randn(30, 2, generator=g, dtype=DT)
        out.append(Task(x, y, x, y, xt, torch.sin(2 * xt[:, :1])))
    return TaskSet(out)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 1)).to(DT)


@pytest.mark.parametrize("optimizer,wd", [("adam", 1e-6), ("adam", 0.05), ("gd", 0.01)])
def test_batched_finetuning_matches_torch_optim_task_by_task(optimizer: str, wd: float) -> None:
    tasks, net, lr, epochs = _tasks(), _net(), 1e-2, 40
    curve = finetune_curve(net, torch.nn.functional.mse_loss, tasks, lr=lr, epochs=epochs,
                           every=10, optimizer=optimizer, weight_decay=wd)
    # Independent reference: each task alone, with torch.optim on a copy of the network.
    per_epoch: dict[int, list[float]] = {e: [] for e in curve["epochs"]}
    for task in tasks:
        model = _net()
        model.load_state_dict(net.state_dict())
        opt = (torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
               if optimizer == "adam" else
               torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd))
        for epoch in range(epochs + 1):
            if epoch in per_epoch:
                with torch.no_grad():
                    err = ((model(task.test_x) - task.test_y) ** 2).mean().sqrt()
                per_epoch[epoch].append(float(err))
            if epoch == epochs:
                break
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(task.support_x), task.support_y).backward()
            opt.step()
    for e, mean in zip(curve["epochs"], curve["nrmse_mean"]):
        ref = sum(per_epoch[e]) / len(per_epoch[e])
        assert abs(mean - ref) < 1e-6, (e, mean, ref)  # the tolerance
    assert curve["nrmse_mean"][-1] < curve["nrmse_mean"][0]  # it did fine-tune


def test_proximal_query_meta_gradient_matches_unrolled_autograd() -> None:
    """A-MAML's meta-objective L_q(u_N) + mu/2 ||u_N - theta||^2 (authors' code), RK4."""
    tasks, net, mu, lr, steps = _tasks(2), _net(), 0.7, 0.05, 6
    xs, ys, xq, yq = tasks.batch([0, 1])

    def half_mse(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.nn.functional.mse_loss(p, t)

    alg = make_algorithm("amaml", n_steps=steps, inner_lr=lr, solver="rk4", memory="store",
                         proximal=mu, proximal_in_query=True)
    net.zero_grad()
    alg.meta_step(net, half_mse, (xs, ys, xq, yq))
    got = torch.cat([p.grad.reshape(-1) for p in net.parameters()])

    names = [n for n, _ in net.named_parameters()]
    theta = [p for p in net.parameters()]
    total = 0.0
    for b in range(2):
        def field(u: list[torch.Tensor], b: int = b) -> list[torch.Tensor]:
            out = torch.func.functional_call(net, dict(zip(names, u)), (xs[b],))
            g = torch.autograd.grad(half_mse(out, ys[b]), u, create_graph=True)
            return [-lr * (gi + mu * (ui - ti)) for gi, ui, ti in zip(g, u, theta)]

        u = list(theta)
        for _ in range(steps):
            k1 = field(u)
            k2 = field([a + 0.5 * k for a, k in zip(u, k1)])
            k3 = field([a + 0.5 * k for a, k in zip(u, k2)])
            k4 = field([a + k for a, k in zip(u, k3)])
            u = [a + (p + 2 * q + 2 * r + s) / 6 for a, p, q, r, s in zip(u, k1, k2, k3, k4)]
        out = torch.func.functional_call(net, dict(zip(names, u)), (xq[b],))
        prox = sum(((a - t) ** 2).sum() for a, t in zip(u, theta))
        total = total + (half_mse(out, yq[b]) + 0.5 * mu * prox) / 2
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, theta)])
    assert float((got - ref).norm() / ref.norm()) < 1e-10  # float64 round-off
    # Without the query term the gradient differs: the flag is not a no-op.
    net.zero_grad()
    make_algorithm("amaml", n_steps=steps, inner_lr=lr, solver="rk4", memory="store",
                   proximal=mu).meta_step(net, half_mse, (xs, ys, xq, yq))
    plain = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    assert float((plain - ref).norm() / ref.norm()) > 1e-6


def test_nrmse_per_task_is_rmse() -> None:
    tasks, net = _tasks(2), _net()
    params = {n: p.detach().unsqueeze(0).expand(2, *p.shape) for n, p in net.named_parameters()}
    with torch.no_grad():
        ref = [float(((net(t.test_x) - t.test_y) ** 2).mean().sqrt()) for t in tasks]
    assert nrmse_per_task(net, params, tasks) == pytest.approx(ref, rel=1e-12)


def test_compare_paper_protocol_writes_reference_rows(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    # The command, with fewer and smaller tasks and a shorter flow to stay fast.
    code = main(["compare", "--protocol", "paper", "--family", "cosmixture", "--methods",
                 "amaml,maml", "--meta-iters", "20", "--finetune-epochs", "50", "--steps", "5",
                 "--n-train", "10", "--n-test", "6", "--pool", "60", "--hidden", "8",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    records = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in records] == ["amaml", "maml", "no-meta", "oracle"]
    assert [r["reference"] for r in records] == [False, False, True, True]
    for r in records[:3]:
        ft = r["finetune"]
        assert ft["optimizer"] == "adam" and ft["epochs"][-1] == 50 and len(ft["epochs"]) == 6
    assert records[3]["finetune"] is None and records[3]["nrmse_mean"] < records[2]["nrmse_mean"]
    config = json.loads((out / "amaml" / "config.json").read_text())
    assert (config["meta_optimizer"], config["finetune_optimizer"], config["finetune_lr"],
            config["finetune_weight_decay"], config["protocol"]) == \
        ("sgd", "adam", 0.001, 1e-06, "paper")
    table = (out / "results.md").read_text()
    assert "| *no-meta* |" in table and "| *oracle* |" in table
    assert (out / "finetune.png").stat().st_size > 0
    assert "no-meta" in capsys.readouterr().out


def test_sweep_steps_stops_maml_at_the_memory_budget(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from amaml.experiments import sweep

    # Deterministic memory figures: MAML's graph grows with N, A-MAML's state does not.
    monkeypatch.setattr(sweep, "_probe",
                        lambda cfg, fam: 5.0 * cfg.steps if cfg.method == "maml" else 3.0)
    result = sweep.sweep_steps(
        TrainConfig(family="sinusoid", shots=5, queries=5, meta_iters=2, meta_batch=2,
                    n_train=4, n_test=3, hidden=(8,), finetune_epochs=0),
        "amaml,maml", "1,2,4", tmp_path / "sw", max_memory_mb=12.0, progress=False)
    status = {(r["method"], r["steps"]): r["status"] for r in result["rows"]}
    assert status == {("amaml", 1): "ok", ("amaml", 2): "ok", ("amaml", 4): "ok",
                      ("maml", 1): "ok", ("maml", 2): "ok",
                      ("maml", 4): "over budget"}
    table = (tmp_path / "sw" / "sweep.md").read_text()
    assert "over budget" in table and "*oracle*" in table and "*no-meta*" in table
    assert (tmp_path / "sw" / "sweep.png").stat().st_size > 0
    # MAML trained with all N unrolled steps (not N // 10).
    cfg = json.loads((tmp_path / "sw" / "seed0" / "maml-N2" / "config.json").read_text())
    assert cfg["maml_steps"] == 2


def test_peak_memory_measures_a_real_allocation() -> None:
    from amaml.experiments.memory import peak_memory_mib

    def allocate() -> None:
        t = torch.ones(64 * 2**20 // 8, dtype=torch.float64)  # 64 MiB, touched
        assert float(t[-1]) == 1.0

    assert 48 < peak_memory_mib(allocate) < 200


def test_paper_preset_on_collaborative_families_has_no_pool() -> None:
    c = TrainConfig.from_protocol("paper", family="movielens-100k", shots=10, queries=15)
    assert (c.pool, c.n_train, c.finetune_optimizer, c.solver) == (None, None, "adam", "rk4")


def test_summary_keeps_reference_rows_out_of_the_contest(tmp_path: Path) -> None:
    from amaml.experiments.comparison import compare_seeds
    from amaml.experiments.summary import format_summary

    cfg = TrainConfig(family="cosmixture", shots=5, queries=5, steps=2, meta_iters=2,
                      meta_batch=2, n_train=4, n_test=3, hidden=(4,), finetune_epochs=2)
    summary = compare_seeds(cfg, "amaml,maml1", "0,1", tmp_path / "s", progress=False)
    rows = {e["method"]: e for e in summary["methods"]}
    assert rows["oracle"]["reference"] and rows["no-meta"]["reference"]
    # The oracle (0 on noiseless synthetic data) is lowest but wins nothing: it is a bound.
    assert rows["oracle"]["nrmse_mean"] < rows["amaml"]["nrmse_mean"]
    assert rows["amaml"]["lowest_in"] + rows["maml1"]["lowest_in"] == 2
    table = format_summary(summary)
    assert "| *oracle* | - |" in table and "| *no-meta* | - / 2 |" in table
