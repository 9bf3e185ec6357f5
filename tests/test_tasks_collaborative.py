"""Tests of the collaborative-filtering families on tiny files in the official layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _tasks_fixtures import (
    jester_matrix,
    random_ratings,
    write_jester_csv,
    write_ratings_dat,
    write_u_data,
    write_xls,
)

from amaml.tasks import DataError, FamilyRequest, TaskFamily, make_family, svd_features
from amaml.tasks import collaborative as cf

F64 = torch.float64
N_USERS, N_ITEMS = 40, 30
SHOTS, QUERIES, N_TEST = 4, 5, 8
FIELDS = ("support_x", "support_y", "query_x", "query_y", "test_x", "test_y")


@pytest.fixture(autouse=True)
def _no_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Never touch the user's cache or the network from these tests.
    monkeypatch.setenv("AMAML_DATA", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("AMAML_DATA_MIRROR", "http://127.0.0.1:9/never-contacted")


def ratings(seed: int = 0, **kw: object) -> list[tuple[int, int, float]]:
    return random_ratings(N_USERS, N_ITEMS, seed=seed, **kw)  # type: ignore[arg-type]


def build(name: str, root: Path, **kw: object) -> TaskFamily:
    args: dict = dict(shots=SHOTS, queries=QUERIES, n_test=N_TEST, seed=3, root=root, dtype=F64)
    args.update(kw)
    return make_family(name, **args)


def user_count(triples: list[tuple[int, int, float]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for u, _, _ in triples:
        out[u] = out.get(u, 0) + 1
    return out


def assert_same_taskset(a: object, b: object) -> None:
    assert len(a) == len(b)  # type: ignore[arg-type]
    for ta, tb in zip(a, b, strict=True):  # type: ignore[call-overload]
        for f in FIELDS:
            assert torch.equal(getattr(ta, f), getattr(tb, f)), f


# ----------------------------------------------------------------------------- loaders


def test_movielens_100k_layout_and_both_root_forms(tmp_path: Path) -> None:
    triples = ratings()
    write_u_data(tmp_path / "direct", triples)
    write_u_data(tmp_path / "holder" / "ml-100k", triples)
    r = cf.read_movielens_100k(tmp_path / "direct" / "u.data")
    assert r.values.shape == (len(triples),) and r.n_users == N_USERS
    assert r.n_items == len({i for _, i, _ in triples})
    assert r.user_ids[r.users[0]] == triples[0][0] and r.item_ids[r.items[5]] == triples[5][1]
    np.testing.assert_array_equal(r.values, [v for _, _, v in triples])
    a, b = (
        build("movielens-100k", tmp_path / "direct"),
        build("movielens-100k", tmp_path / "holder"),
    )
    assert_same_taskset(a.train, b.train)
    assert a.info["files"][0].endswith("u.data")


def test_movielens_1m_layout(tmp_path: Path) -> None:
    triples = ratings(seed=1)
    write_ratings_dat(tmp_path / "ml-1m", triples)
    r = cf.read_movielens_1m(tmp_path / "ml-1m" / "ratings.dat")
    assert r.n_users == N_USERS and r.values.shape == (len(triples),)
    fam = build("movielens-1m", tmp_path)
    assert fam.info["n_ratings"] == len(triples) and fam.name == "movielens-1m"


def test_jester_xls_several_files_and_csv(tmp_path: Path) -> None:
    triples = random_ratings(N_USERS, 20, seed=2, scale=(-10.0, 10.0), integer=False)
    rows = jester_matrix(triples, N_USERS, 20)
    write_xls(tmp_path / "jester-1" / "jester-data-1.xls", rows[:25])
    write_xls(tmp_path / "jester-1" / "jester-data-2.xls", rows[25:])
    write_jester_csv(tmp_path / "csv" / "jester-data-1.csv", rows)
    xls = cf.read_jester(sorted((tmp_path / "jester-1").glob("*.xls")))
    csv = cf.read_jester([tmp_path / "csv" / "jester-data-1.csv"])
    assert xls.n_users == N_USERS and xls.n_items == 20
    np.testing.assert_array_equal(xls.users, csv.users)
    np.testing.assert_allclose(xls.values, [v for _, _, v in triples])
    np.testing.assert_allclose(csv.values, xls.values, rtol=1e-5)  # csv written with %g
    fam = build("jester-1", tmp_path)
    assert fam.info["files"] == [
        str(tmp_path / "jester-1" / f"jester-data-{k}.xls") for k in (1, 2)
    ]
    assert fam.input_dim == 20  # fewer items than 100: one feature per item
    # A .csv beside the .xls of the same name is preferred (faster to read).
    write_jester_csv(tmp_path / "jester-1" / "jester-data-2.csv", rows[25:])
    files, _ = cf.find_data_files("jester-1", tmp_path)
    assert [p.name for p in files] == ["jester-data-1.xls", "jester-data-2.csv"]


# ----------------------------------------------------------------------------- tasks


def test_tasks_shapes_and_every_rating_used_once(tmp_path: Path) -> None:
    triples = ratings()
    write_u_data(tmp_path, triples)
    fam = build("movielens-100k", tmp_path)
    info = fam.info
    n_train_users = info["eligible_users"] - N_TEST
    assert len(fam.test) == N_TEST and len(fam.train) == n_train_users == info["n_train"]
    assert fam.input_dim == info["n_components"] == min(100, N_ITEMS, n_train_users)
    counts = user_count(triples)
    for uid, task in zip(info["test_user_ids"], fam.test, strict=True):
        assert task.support_x.shape == (SHOTS, fam.input_dim) and task.query_y.shape == (QUERIES, 1)
        assert task.test_x.shape == (counts[uid] - SHOTS - QUERIES, fam.input_dim)
        ys = torch.cat([task.support_y, task.query_y, task.test_y])[:, 0]
        raw = ys.numpy() * info["rating_std"] + info["rating_mean"]
        mine = sorted(v for u, _, v in triples if u == uid)
        np.testing.assert_allclose(np.sort(raw), mine, atol=1e-12)
    total = sum(
        t.support_y.shape[0] + t.query_y.shape[0] + t.test_y.shape[0]
        for t in [*fam.train, *fam.test]
    )
    assert total == info["n_ratings"]  # no skipped users here: every rating appears once
    json.dumps(info)


def test_targets_and_features_standardised_over_training_users(tmp_path: Path) -> None:
    write_u_data(tmp_path, ratings())
    fam = build("movielens-100k", tmp_path)
    y = torch.cat([torch.cat([t.support_y, t.query_y, t.test_y]) for t in fam.train])
    assert abs(y.mean().item()) < 1e-12 and abs(y.std(unbiased=False).item() - 1) < 1e-12
    assert fam.info["null_components"] == 0


def test_skipped_users_are_counted(tmp_path: Path) -> None:
    triples = [t for t in ratings() if not (t[0] <= 6 and t[1] > 9)]  # users 1-6: <= 9 ratings
    few = {u for u, c in user_count(triples).items() if c < SHOTS + QUERIES + 1}
    assert 1 <= len(few) <= 6
    write_u_data(tmp_path, triples)
    fam = build("movielens-100k", tmp_path)
    assert fam.info["skipped_users"] == len(few)
    assert fam.info["eligible_users"] == N_USERS - len(few)
    assert fam.info["min_ratings"] == SHOTS + QUERIES + 1
    assert len(fam.train) + len(fam.test) == N_USERS - len(few)
    assert not few & set(fam.info["test_user_ids"])


def test_n_train_limits_the_training_users(tmp_path: Path) -> None:
    write_u_data(tmp_path, ratings())
    fam = build("movielens-100k", tmp_path, n_train=10)
    assert len(fam.train) == 10 and fam.info["unused_users"] == N_USERS - N_TEST - 10
    assert fam.input_dim == 10  # the SVD has at most as many components as training users


def test_too_few_users_is_a_data_error(tmp_path: Path) -> None:
    write_u_data(tmp_path, ratings())
    with pytest.raises(DataError, match=r"only 40 of 40 users .* needs 41"):
        build("movielens-100k", tmp_path, n_test=40)
    with pytest.raises(DataError, match=r"only 0 of 40 users have at least .* = 51 ratings"):
        build("movielens-100k", tmp_path, shots=25, queries=25)


def test_deterministic_given_seed(tmp_path: Path) -> None:
    write_u_data(tmp_path, ratings())
    a, b = build("movielens-100k", tmp_path), build("movielens-100k", tmp_path)
    assert_same_taskset(a.train, b.train)
    assert_same_taskset(a.test, b.test)
    assert a.info == b.info
    c = build("movielens-100k", tmp_path, seed=4)
    assert c.info["test_user_ids"] != a.info["test_user_ids"]


def test_no_leakage_from_meta_test_users(tmp_path: Path) -> None:
    triples = ratings()
    write_u_data(tmp_path / "a", triples)
    base = build("movielens-100k", tmp_path / "a")
    test_users = set(base.info["test_user_ids"])
    # Every meta-test rating changed (5 <-> 1, 4 <-> 2): features and training tasks must
    # not move at all, bit for bit.
    changed = [(u, i, 6.0 - v if u in test_users else v) for u, i, v in triples]
    assert changed != triples
    write_u_data(tmp_path / "b", changed)
    other = build("movielens-100k", tmp_path / "b")
    assert other.info["test_user_ids"] == base.info["test_user_ids"]
    assert_same_taskset(base.train, other.train)
    for key in ("rating_mean", "rating_std", "feature_mean", "feature_std", "singular_values"):
        assert base.info[key] == other.info[key], key
    assert not torch.equal(base.test[0].support_y, other.test[0].support_y)


def test_features_come_from_the_training_users_svd(tmp_path: Path) -> None:
    triples = ratings()
    write_u_data(tmp_path, triples)
    fam = build("movielens-100k", tmp_path)
    info = fam.info
    test_users = set(info["test_user_ids"])
    train = [(u, i, v) for u, i, v in triples if u not in test_users]
    items = sorted({i for _, i, _ in triples})
    users = sorted({u for u, _, _ in train})
    mu = np.mean([v for _, _, v in train])
    mat = np.zeros((len(users), len(items)))
    for u, i, v in train:
        mat[users.index(u), items.index(i)] = v - mu
    s = np.linalg.svd(mat, compute_uv=False)
    k = info["n_components"]
    # Gram-matrix eigensolver vs LAPACK SVD: equal to ~1e-12 relative on this conditioning.
    np.testing.assert_allclose(info["singular_values"], s[:k], rtol=1e-9)
    assert info["rating_mean"] == pytest.approx(mu, abs=1e-12)
    # Both splits draw from one table of item features: no more distinct rows than items.
    rows = {tuple(r.tolist()) for t in [*fam.train, *fam.test] for r in t.test_x}
    assert len(rows) <= len(items)


def test_randomised_svd_matches_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    m, n, k = 120, 90, 10
    u, _ = np.linalg.qr(rng.normal(size=(m, n)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    s = 0.8 ** np.arange(n)
    mat = (u * s) @ v.T
    rows, cols = np.nonzero(np.ones_like(mat))
    exact_s, exact_v = cf._top_right_singular(rows, cols, mat[rows, cols], (m, n), k, seed=0)
    monkeypatch.setattr(svd_features, "EXACT_SVD_MAX", 5)  # read where it is used
    rand_s, rand_v = cf._top_right_singular(rows, cols, mat[rows, cols], (m, n), k, seed=0)
    # Spectrum decays by 0.8 per index, sketch width 60 and 10 power iterations: the
    # leading 10 components are resolved to round-off (0.8**(50 * 21) is ~1e-100).
    np.testing.assert_allclose(rand_s, s[:k], rtol=1e-10)
    np.testing.assert_allclose(exact_s, s[:k], rtol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(rand_v * v[:, :k], axis=0)), 1.0, atol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(exact_v * v[:, :k], axis=0)), 1.0, atol=1e-10)


def test_rank_deficient_components_are_zeroed() -> None:
    # Every training user rates identically: the centred matrix has rank <= 1.
    n_users, n_items = 14, 6
    triples = [(u, i, float(1 + i % 5)) for u in range(n_users) for i in range(n_items)]
    r = cf.Ratings.from_triples(*map(np.array, zip(*triples, strict=True)), source="toy")
    req = FamilyRequest(
        shots=2, queries=2, n_train=None, n_test=2, seed=0, root=None, download=False, dtype=F64
    )
    fam = cf.family_from_ratings(r, req, "toy")
    assert fam.info["null_components"] == fam.input_dim - 1
    x = fam.train[0].support_x
    assert torch.all(x[:, 1:] == 0) and torch.isfinite(x).all()


# ----------------------------------------------------------------------------- errors


def test_pool_is_refused(tmp_path: Path) -> None:
    write_u_data(tmp_path / "ml-100k", random_ratings(N_USERS, N_ITEMS, seed=0))
    with pytest.raises(ValueError, match=r"pool=30 \(--pool\) is for synthetic families"):
        make_family("movielens-100k", shots=2, queries=2, pool=30, root=tmp_path)


def test_missing_data_names_paths_and_download(tmp_path: Path) -> None:
    with pytest.raises(
        DataError,
        match=r"No movielens-100k data found \(tried .*u\.data.*"
        r"download=True.*ml-100k\.zip",
    ):
        build("movielens-100k", tmp_path)
    with pytest.raises(DataError, match=r"jester-data-\*.*download=True.*jester_dataset_1_1"):
        build("jester-1", tmp_path)
    with pytest.raises(DataError, match="empty-cache"):  # root=None: the cache folder
        make_family("movielens-1m", shots=2, queries=2)


@pytest.mark.parametrize(
    "content, match",
    [
        ("1\t2\t3\t4\n1\t3\t4\n", r"u\.data line 2 has 3 fields separated by '\\t', expected 4"),
        ("1,2,3,4\n", r"line 1 has 1 fields"),
        ("1\t2\tfive\t4\n", r"line 1 has a non-numeric field 'five'"),
        ("1\t2\t3\t4\n2\t2\tnan\t4\n", r"line 2 holds a NaN or infinite value"),
        ("1\t2\t3\t4\n2\t2\tinf\t4\n", r"line 2 holds a NaN or infinite value"),
        ("\n\n", r"u\.data is empty"),
        ("1\t2\t3\t4\n1\t2\t5\t5\n", r"rates item 2 by user 1 more than once"),
        ("1.5\t2\t3\t4\n", r"non-integer user or item id"),
        ("1\t2\t3\t4\n\n1\t3\tx\t4\n", r"line 3 has a non-numeric field 'x'"),
    ],
)
def test_bad_movielens_file(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "u.data").write_text(content)
    with pytest.raises(DataError, match=match):
        build("movielens-100k", tmp_path)


def test_bad_ratings_dat(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text("1::2::3::4\n1\t3\t4\t5\n")
    with pytest.raises(DataError, match=r"ratings\.dat line 2 has 1 fields separated by '::'"):
        build("movielens-1m", tmp_path)


def test_bad_jester_files(tmp_path: Path) -> None:
    rows = jester_matrix(random_ratings(12, 5, seed=0, scale=(-10.0, 10.0)), 12, 5)
    bad = rows.copy()
    bad[3, 2] = 12.5
    write_jester_csv(tmp_path / "range" / "jester-data-1.csv", bad)
    with pytest.raises(DataError, match=r"row 4 column 3 holds 12\.5, outside \[-10, 10\]"):
        build("jester-1", tmp_path / "range")
    holes = rows.copy()
    holes[2, 4] = np.nan  # an empty cell
    write_xls(tmp_path / "holes" / "jester-data-1.xls", holes)
    with pytest.raises(DataError, match=r"row 3 column 5 holds '', not a number"):
        build("jester-1", tmp_path / "holes")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "jester-data-1.xls").write_text("user,joke\n1,2\n")
    with pytest.raises(DataError, match=r"Cannot read .*jester-data-1\.xls as an \.xls workbook"):
        build("jester-1", tmp_path / "fake")
    write_xls(tmp_path / "mixed" / "jester-data-1.xls", rows)
    write_xls(tmp_path / "mixed" / "jester-data-2.xls", rows[:, :4])
    with pytest.raises(DataError, match=r"jester-data-2\.xls has 4 columns but .* has 6"):
        build("jester-1", tmp_path / "mixed")
    write_jester_csv(tmp_path / "one" / "jester-data-1.csv", rows[:, :1])
    with pytest.raises(DataError, match=r"has 1 column\(s\)"):
        build("jester-1", tmp_path / "one")
