"""Tests of the task containers, the registry and the synthetic families."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from amaml.tasks import (
    AbstractSyntheticFunction,
    Alpine,
    AlpinePaper,
    CosMixture,
    CosMixturePaper,
    DataError,
    FamilyRequest,
    Sinusoid,
    Task,
    TaskFamily,
    TaskSet,
    list_families,
    make_family,
    register_family,
)
from amaml.tasks import registry as registry_module

SYNTHETIC = ["alpine", "alpine-paper", "cosmixture", "cosmixture-paper", "sinusoid"]
F64 = torch.float64


def small(name: str, **kw: object) -> TaskFamily:
    args: dict = dict(shots=6, queries=7, n_train=5, n_test=3, seed=1, dtype=F64)
    args.update(kw)
    return make_family(name, **args)


def make_task(shots: int = 3, queries: int = 4, n_test: int = 5, d: int = 2) -> Task:
    g = torch.Generator().manual_seed(shots * 100 + queries * 10 + n_test)

    def pair(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.randn(n, d, generator=g, dtype=F64),
            torch.randn(n, 1, generator=g, dtype=F64),
        )

    return Task(*pair(shots), *pair(queries), *pair(n_test))


# ----------------------------------------------------------------------------- registry


def test_list_families() -> None:
    assert list_families() == [
        "alpine",
        "alpine-paper",
        "cosmixture",
        "cosmixture-paper",
        "glyphs",
        "jester-1",
        "mini-imagenet",
        "movielens-100k",
        "movielens-1m",
        "omniglot",
        "omniglot-minimal",
        "omniglot-small1",
        "omniglot-small2",
        "sinusoid",
    ]


def test_tasks_package_imports_nothing_else_from_amaml() -> None:
    # One exception: amaml._extras, a standard-library-only leaf that names the optional
    # [experiments] dependency to install (scipy, xlrd, Pillow are imported where used).
    folder = Path(registry_module.__file__).parent
    extras = folder.parent / "_extras.py"
    for node in ast.walk(ast.parse(extras.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("amaml")
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("amaml") for a in node.names)
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module == "_extras":
                continue
            if isinstance(node, ast.ImportFrom):
                assert node.level in (0, 1), f"{path.name} imports from outside amaml.tasks"
                assert node.level == 1 or not (node.module or "").startswith("amaml"), path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("amaml") for a in node.names), path.name


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(shots=0), ValueError, "shots must be >= 1, got 0"),
        (dict(queries=0), ValueError, "queries must be >= 1"),
        (dict(queries=2.5), TypeError, "queries must be an int"),
        (dict(shots=True), TypeError, "shots must be an int"),
        (dict(n_train=0), ValueError, "n_train must be >= 1"),
        (dict(n_test=0), ValueError, "n_test must be >= 1"),
        (dict(seed=-1), ValueError, "seed must be >= 0"),
        (dict(dtype=torch.int64), TypeError, "dtype must be a floating"),
        (dict(root=3), TypeError, "root must be"),
        (dict(download="yes"), TypeError, "download must be a bool"),
    ],
)
def test_make_family_validates_arguments(kwargs: dict, exc: type, match: str) -> None:
    args: dict = dict(shots=2, queries=2, n_train=2, n_test=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        make_family("sinusoid", **args)


def test_unknown_family_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"Unknown task family 'sine'.*'sinusoid'"):
        make_family("sine", shots=2, queries=2)


def test_register_family(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_FAMILIES", dict(registry_module._FAMILIES))
    seen: list[FamilyRequest] = []

    def build(name: str, request: FamilyRequest) -> TaskFamily:
        seen.append(request)
        ts = TaskSet([make_task(request.shots, request.queries)])
        return TaskFamily(name=name, input_dim=2, train=ts, test=ts)

    register_family("toy", build)
    assert "toy" in list_families()
    fam = make_family("toy", shots=3, queries=4, seed=5)
    assert fam.name == "toy" and seen[0].seed == 5 and seen[0].dtype == torch.float32
    with pytest.raises(ValueError, match="already registered; pass overwrite=True"):
        register_family("toy", build)
    register_family("toy", build, overwrite=True)
    with pytest.raises(TypeError, match="builder must be callable"):
        register_family("toy2", 3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- containers


def test_task_validation() -> None:
    t = make_task()
    assert t.input_dim == 2 and t.dtype == F64
    with pytest.raises(ValueError, match=r"support_y must be 2-D \[n, 1\]"):
        Task(t.support_x, t.support_y[:, 0], t.query_x, t.query_y, t.test_x, t.test_y)
    with pytest.raises(ValueError, match="query_x has 3 rows but Task.query_y has 4"):
        Task(t.support_x, t.support_y, t.query_x[:3], t.query_y, t.test_x, t.test_y)
    with pytest.raises(ValueError, match="one input dimension"):
        Task(t.support_x, t.support_y, t.query_x[:, :1], t.query_y, t.test_x, t.test_y)
    with pytest.raises(ValueError, match="one dtype"):
        Task(t.support_x.float(), t.support_y, t.query_x, t.query_y, t.test_x, t.test_y)
    with pytest.raises(TypeError, match="test_x must be a torch.Tensor"):
        Task(t.support_x, t.support_y, t.query_x, t.query_y, t.test_x.numpy(), t.test_y)
    with pytest.raises(TypeError, match="floating dtype"):
        Task(t.support_x, t.support_y.long(), t.query_x, t.query_y, t.test_x, t.test_y)
    with pytest.raises(AttributeError):
        t.support_x = t.query_x  # type: ignore[misc]  # frozen
    assert t.to(dtype=torch.float32).test_y.dtype == torch.float32


def test_taskset_batch_and_validation() -> None:
    tasks = [make_task(n_test=5 + k) for k in range(4)]  # n_test may differ
    ts = TaskSet(tasks)
    assert (len(ts), ts.shots, ts.queries, ts.input_dim) == (4, 3, 4, 2)
    sx, sy, qx, qy = ts.batch([2, 0, 2])
    assert sx.shape == (3, 3, 2) and sy.shape == (3, 3, 1)
    assert qx.shape == (3, 4, 2) and qy.shape == (3, 4, 1)
    assert torch.equal(sx[0], tasks[2].support_x) and torch.equal(qy[1], tasks[0].query_y)
    assert torch.equal(ts.batch(torch.tensor([1]))[0][0], tasks[1].support_x)
    assert ts[1] is tasks[1] and list(ts) == tasks
    with pytest.raises(ValueError, match="at least one index"):
        ts.batch([])
    with pytest.raises(IndexError, match="Task index 4 is out of range for a TaskSet of 4"):
        ts.batch([0, 4])
    with pytest.raises(ValueError, match="needs at least one task"):
        TaskSet([])
    with pytest.raises(ValueError, match="Task 1 has .* all tasks of a TaskSet must agree"):
        TaskSet([make_task(shots=3), make_task(shots=4)])
    with pytest.raises(TypeError, match="TaskSet element 0 must be a Task"):
        TaskSet(["x"])  # type: ignore[list-item]
    assert ts.to(dtype=torch.float32).dtype == torch.float32


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize(
    "name, d, n_grid",
    [
        ("alpine", 2, 1024),
        ("alpine-paper", 2, 1024),
        ("cosmixture", 2, 1024),
        ("cosmixture-paper", 2, 1024),
        ("sinusoid", 1, 1000),
    ],
)
def test_shapes_and_defaults(name: str, d: int, n_grid: int) -> None:
    fam = make_family(name, shots=5, queries=8, n_test=4, seed=0)
    assert fam.name == name and fam.input_dim == d
    assert len(fam.train) == 100 and len(fam.test) == 4  # paper default: 100 functions
    t = fam.test[3]
    assert t.support_x.shape == (5, d) and t.query_y.shape == (8, 1)
    assert t.test_x.shape == (n_grid, d) and t.test_y.shape == (n_grid, 1)
    assert t.dtype == torch.float32  # the default dtype
    assert fam.info["n_train"] == 100 and fam.info["n_test_points"] == n_grid
    json.dumps(fam.info)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_pooled_standardisation(name: str) -> None:
    fam = small(name)
    sx, sy, qx, qy = fam.train.batch(range(len(fam.train)))
    x = torch.cat([sx, qx], dim=1).reshape(-1, fam.input_dim)
    y = torch.cat([sy, qy], dim=1).reshape(-1)
    # Exact up to float64 round-off: the statistics are those of exactly these points.
    torch.testing.assert_close(x.mean(0), torch.zeros(fam.input_dim, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(x.std(0, unbiased=False), torch.ones(fam.input_dim, dtype=F64))
    assert abs(y.mean().item()) < 1e-12 and abs(y.std(unbiased=False).item() - 1) < 1e-12
    info = fam.info
    assert len(info["x_mean"]) == len(info["x_std"]) == fam.input_dim
    assert info["y_std"] > 0


FUNCTIONS: dict[str, AbstractSyntheticFunction] = {
    "alpine": Alpine(),
    "alpine-paper": AlpinePaper(),
    "cosmixture": CosMixture(),
    "cosmixture-paper": CosMixturePaper(),
    "sinusoid": Sinusoid(),
}


@pytest.mark.parametrize("name", SYNTHETIC)
def test_test_points_are_the_standardised_grid_of_the_same_function(name: str) -> None:
    fam = small(name)
    fn, info = FUNCTIONS[name], fam.info
    x_mean, x_std = np.array(info["x_mean"]), np.array(info["x_std"])
    grid = fam.test[0].test_x.numpy() * x_std + x_mean
    lo, hi = info["domain"]
    np.testing.assert_allclose(grid.min(0), lo, atol=1e-12)
    np.testing.assert_allclose(grid.max(0), hi, atol=1e-12)
    for split, key in ((fam.train, "params_train"), (fam.test, "params_test")):
        for task, params in zip(split, info[key], strict=True):
            p = {k: np.asarray(v) for k, v in params.items()}
            for x, y in ((task.test_x, task.test_y), (task.support_x, task.support_y)):
                raw_x = x.numpy() * x_std + x_mean
                assert np.all((raw_x >= lo - 1e-12) & (raw_x <= hi + 1e-12))
                raw_y = y.numpy()[:, 0] * info["y_std"] + info["y_mean"]
                np.testing.assert_allclose(raw_y, fn(raw_x, p), atol=1e-10)


def test_function_formulas_by_hand() -> None:
    x = np.array([[0.0, 0.0], [0.5, -0.25]])
    params = {"c": np.asarray(0.5), "phi": np.asarray(1.0), "w": np.asarray(4.0)}
    cm = CosMixture()(x, params)
    expect0 = -0.5 * 2 * math.cos(1.0)
    expect1 = (
        -0.5 * (math.cos(4 * math.pi * 0.5 + 1) + math.cos(-4 * math.pi * 0.25 + 1)) - 0.25 - 0.0625
    )
    np.testing.assert_allclose(cm, [expect0, expect1], rtol=1e-14)

    s = np.array([math.pi / 12, -math.pi / 3])
    al = Alpine()(np.array([[0.0, 0.0], [2.0, -3.0]]), {"s": s})
    expect = abs(2 * math.sin(2 + math.pi + s[0]) + 0.2) + abs(
        -3 * math.sin(-3 + math.pi + s[1]) - 0.3
    )
    np.testing.assert_allclose(al, [0.0, expect], rtol=1e-14)

    si = Sinusoid()(
        np.array([[1.0], [-2.0]]), {"amplitude": np.asarray(3.0), "phase": np.asarray(0.5)}
    )
    np.testing.assert_allclose(si, [3 * math.sin(0.5), 3 * math.sin(-2.5)], rtol=1e-14)

    # The paper's printed formulas: -0.1 A cos(omega x + phi), and no + pi in Alpine's sine.
    x = np.array([[0.0, 0.0], [0.5, -0.25]])
    params = {"amplitude": np.asarray(0.5), "omega": np.asarray(4.0), "phi": np.asarray(3.5)}
    cp = CosMixturePaper()(x, params)
    expect1 = -0.1 * 0.5 * (math.cos(2.0 + 3.5) + math.cos(-1.0 + 3.5)) - 0.25 - 0.0625
    np.testing.assert_allclose(cp, [-0.1 * 0.5 * 2 * math.cos(3.5), expect1], rtol=1e-14)
    ap = AlpinePaper()(np.array([[0.0, 0.0], [2.0, -3.0]]), {"s": s})
    expect = abs(2 * math.sin(2 + s[0]) + 0.2) + abs(-3 * math.sin(-3 + s[1]) - 0.3)
    np.testing.assert_allclose(ap, [0.0, expect], rtol=1e-14)


def test_parameter_ranges() -> None:
    rng = np.random.default_rng(0)
    cm = [CosMixture().sample_params(rng) for _ in range(500)]
    for key, (lo, hi) in (("c", (0.1, 1.0)), ("phi", (0.5, 2.0)), ("w", (3.0, 6.0))):
        vals = np.array([p[key] for p in cm])
        assert vals.min() >= lo and vals.max() <= hi
        assert vals.min() < lo + 0.05 * (hi - lo) and vals.max() > hi - 0.05 * (hi - lo)
    s = np.array([Alpine().sample_params(rng)["s"] for _ in range(500)])
    k = s * 12 / np.pi
    assert s.shape == (500, 2) and k.min() >= -5 and k.max() <= 5
    assert np.all(s[:, 0] != s[:, 1])  # one shift per dimension, drawn independently
    assert len(np.unique(np.round(k, 6))) > 900  # continuous, not integer k
    sp = [Sinusoid().sample_params(rng) for _ in range(500)]
    amp = np.array([p["amplitude"] for p in sp])
    phase = np.array([p["phase"] for p in sp])
    assert amp.min() >= 0.1 and amp.max() <= 5.0
    assert phase.min() >= 0 and phase.max() <= math.pi
    with pytest.raises(ValueError, match="c_range must be a finite"):
        CosMixture(c_range=(1.0, 0.1))

    cp = [CosMixturePaper().sample_params(rng) for _ in range(500)]
    paper_ranges = (("amplitude", (0.1, 1.0)), ("omega", (0.5 * math.pi, 2 * math.pi)))
    for key, (lo, hi) in (*paper_ranges, ("phi", (3.0, 6.0))):
        vals = np.array([p[key] for p in cp])
        assert vals.min() >= lo and vals.max() <= hi
        assert vals.min() < lo + 0.05 * (hi - lo) and vals.max() > hi - 0.05 * (hi - lo)
    k = np.array([AlpinePaper().sample_params(rng)["s"] for _ in range(500)]) * 12 / np.pi
    assert k.shape == (500, 2) and k.min() >= -5 and k.max() <= 5
    assert np.all(k[:, 0] != k[:, 1])


@pytest.mark.parametrize("name", SYNTHETIC)
def test_flat_parameters_and_batched_evaluation(name: str) -> None:
    fn = FUNCTIONS[name]
    rng = np.random.default_rng(3)
    x = fn.sample_inputs(rng, 20)
    params = [fn.sample_params(rng) for _ in range(4)]
    theta = np.stack([fn.to_vector(p) for p in params])
    lower, upper = fn.param_bounds()
    assert theta.shape == (4, lower.shape[0]) and np.all((lower <= theta) & (theta <= upper))
    for p, t in zip(params, theta, strict=True):
        back = fn.from_vector(t)
        assert back.keys() == p.keys()
        for key in p:
            np.testing.assert_array_equal(back[key], p[key])
    batched = fn.evaluate(x, theta)
    assert batched.shape == (4, 20)
    # One function at a time is the same arithmetic as a batch: equal to the last bit.
    for row, p in zip(batched, params, strict=True):
        np.testing.assert_array_equal(row, fn(x, p))
    assert fn.evaluate(x, theta.reshape(2, 2, -1)).shape == (2, 2, 20)


# Computed by the code of commit cd0619f (before the paper variants, the pools and the flat
# parameters); repr() of a float round-trips exactly.
COSMIXTURE_SEED7 = [0.8134175980570207, -0.28975125586628675, -1.4843104891065955]
ALPINE_SEED7 = [1.3619667324856544, 0.30811368275545137]


def test_existing_families_are_unchanged() -> None:
    # The released-code families keep their exact draws: equal to the last bit.
    cm = make_family("cosmixture", shots=3, queries=2, n_train=2, n_test=1, seed=7, dtype=F64)
    al = make_family("alpine", shots=3, queries=2, n_train=2, n_test=1, seed=7, dtype=F64)
    got = [cm.train[1].support_y[:, 0].tolist(), al.test[0].query_y[:, 0].tolist()]
    assert got == [COSMIXTURE_SEED7, ALPINE_SEED7]


@pytest.mark.parametrize("name", SYNTHETIC)
def test_deterministic_given_seed(name: str) -> None:
    a, b, c = small(name), small(name), small(name, seed=2)
    for ta, tb in zip([*a.train, *a.test], [*b.train, *b.test], strict=True):
        for f in ("support_x", "support_y", "query_x", "query_y", "test_x", "test_y"):
            assert torch.equal(getattr(ta, f), getattr(tb, f))
    assert a.info == b.info
    assert not torch.equal(a.train[0].support_x, c.train[0].support_x)


def test_tasks_do_not_depend_on_split_sizes() -> None:
    a = small("cosmixture", n_train=3, n_test=2)
    b = small("cosmixture", n_train=6, n_test=4)
    assert a.info["params_train"] == b.info["params_train"][:3]
    assert a.info["params_test"] == b.info["params_test"][:2]


def test_no_global_random_state_used() -> None:
    torch_state = torch.random.get_rng_state()
    np_state = np.random.get_state()
    small("alpine")
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert np.array_equal(after[1], np_state[1]) and after[2] == np_state[2]


def test_dtype_and_batch_of_a_family() -> None:
    fam = make_family("cosmixture", shots=10, queries=20, n_train=7, n_test=2)
    sx, sy, qx, qy = fam.train.batch([0, 1, 2, 3, 4])
    assert (sx.shape, sy.shape, qx.shape, qy.shape) == (
        (5, 10, 2),
        (5, 10, 1),
        (5, 20, 2),
        (5, 20, 1),
    )
    assert sx.dtype == torch.float32


# ----------------------------------------------------------------------------- pools


@pytest.mark.parametrize("name", ["cosmixture-paper", "sinusoid"])
def test_pool_gives_training_tasks_pools_and_test_tasks_episodes(name: str) -> None:
    fam = small(name, pool=11)
    plain = small(name)
    assert (fam.train.shots, fam.train.queries) == (11, 11)
    assert (fam.test.shots, fam.test.queries) == (6, 7)
    assert fam.info["pool"] == 11 and plain.info["pool"] is None
    assert (fam.info["shots"], fam.info["queries"]) == (6, 7)
    # The same functions; only the number of points drawn for each differs.
    assert fam.info["params_train"] == plain.info["params_train"]
    assert fam.info["params_test"] == plain.info["params_test"]
    # Standardisation pooled over the meta-training pools, exactly as without pools.
    sx, sy, qx, qy = fam.train.batch(range(len(fam.train)))
    x = torch.cat([sx, qx], dim=1).reshape(-1, fam.input_dim)
    y = torch.cat([sy, qy], dim=1).reshape(-1)
    torch.testing.assert_close(x.mean(0), torch.zeros(fam.input_dim, dtype=F64), atol=1e-12, rtol=0)
    assert abs(y.mean().item()) < 1e-12 and abs(y.std(unbiased=False).item() - 1) < 1e-12
    json.dumps(fam.info)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(pool=5), ValueError, r"pool \(5, --pool\) must be at least shots \(6\)"),
        (dict(shots=2, pool=6), ValueError, r"must be at least shots \(2\) and queries \(7\)"),
        (dict(pool=0), ValueError, "pool must be >= 1"),
        (dict(pool=7.0), TypeError, "pool must be an int"),
    ],
)
def test_pool_validation(kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        small("alpine", **kwargs)


def test_family_to_keeps_function_and_info() -> None:
    fam = small("alpine-paper")
    moved = fam.to(dtype=torch.float32)
    assert moved.function is fam.function and isinstance(moved.function, AlpinePaper)
    assert moved.train.dtype == torch.float32 and moved.info["dtype"] == "float32"
    assert fam.info["dtype"] == "float64"  # the original is untouched
    assert "function" not in fam.info
