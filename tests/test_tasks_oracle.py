"""Tests of the least-squares oracle of the synthetic families."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amaml.tasks import (
    FamilyRequest,
    Ratings,
    TaskFamily,
    family_from_ratings,
    make_family,
    oracle_nrmse,
    supports_oracle,
)

F64 = torch.float64
PAPER_AND_CODE = ["alpine", "alpine-paper", "cosmixture", "cosmixture-paper", "sinusoid"]


def family(name: str, shots: int, **kw: object) -> TaskFamily:
    args: dict = dict(shots=shots, queries=5, n_train=4, n_test=4, seed=0, dtype=F64)
    args.update(kw)
    return make_family(name, **args)


@pytest.mark.parametrize("name", PAPER_AND_CODE)
def test_recovers_the_function_from_noiseless_support_points(name: str) -> None:
    fam = family(name, shots=50)
    assert supports_oracle(fam)
    errors = oracle_nrmse(fam)
    assert len(errors) == len(fam.test)
    # Noiseless float64 targets and 50 points for 2-3 parameters: the fit is exact up to
    # the solver's tolerances (seen: ~1e-15); 1e-6 leaves room for other BLAS/platforms.
    assert max(errors) < 1e-6


@pytest.mark.parametrize("name", ["cosmixture-paper", "alpine-paper", "sinusoid"])
def test_a_tiny_support_set_leaves_the_function_undetermined(name: str) -> None:
    # One point for 2-3 parameters: many functions fit it exactly, most of them wrongly.
    tiny = oracle_nrmse(family(name, shots=1))
    many = oracle_nrmse(family(name, shots=50))
    assert np.mean(tiny) > 1e-2 > 1e-6 > max(many)


def test_train_split_and_pools() -> None:
    fam = family("cosmixture-paper", shots=3, pool=40)
    assert max(oracle_nrmse(fam, split="train", restarts=2)) < 1e-6  # 40 pool points each
    assert len(oracle_nrmse(fam, split="test", restarts=2)) == 4


def test_deterministic_given_seed() -> None:
    fam = family("cosmixture", shots=2)
    assert oracle_nrmse(fam, restarts=2, seed=3) == oracle_nrmse(fam, restarts=2, seed=3)


def test_float32_family() -> None:
    errors = oracle_nrmse(family("sinusoid", shots=20, dtype=torch.float32), restarts=2)
    assert max(errors) < 1e-5  # float32 targets: round-off ~1e-7 relative


def test_collaborative_families_have_no_oracle() -> None:
    rng = np.random.default_rng(0)
    users, items = np.nonzero(rng.random((12, 8)) < 0.9)
    r = Ratings.from_triples(users, items, rng.integers(1, 6, users.shape[0]), source="toy")
    req = FamilyRequest(
        shots=2, queries=2, n_train=None, n_test=2, seed=0, root=None, download=False, dtype=F64
    )
    fam = family_from_ratings(r, req, "toy")
    assert fam.function is None and not supports_oracle(fam)
    with pytest.raises(ValueError, match="no oracle for family 'toy'"):
        oracle_nrmse(fam)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(split="val"), ValueError, r"split must be one of \['train', 'test'\]"),
        (dict(restarts=0), ValueError, "restarts must be >= 1"),
        (dict(seed=-1), ValueError, "seed must be >= 0"),
        (dict(restarts=2.0), TypeError, "restarts must be an int"),
    ],
)
def test_argument_errors(kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        oracle_nrmse(family("sinusoid", shots=3), **kwargs)
    with pytest.raises(TypeError, match="family must be a TaskFamily"):
        oracle_nrmse("sinusoid")  # type: ignore[arg-type]
