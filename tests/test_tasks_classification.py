"""N-way K-shot classification families: glyphs, Omniglot and mini-ImageNet (tiny fixtures)."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _tasks_fixtures import write_mini_imagenet, write_omniglot

from amaml.tasks import (
    FRESH_EPISODES,
    ClassificationTask,
    DataError,
    EpisodeSet,
    Glyphs,
    Rotated,
    TaskFamily,
    family_kind,
    make_family,
    register_family,
)
from amaml.tasks import registry as reg
from amaml.tasks.images import build_omniglot


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_batch(
    batch: tuple[torch.Tensor, ...],
    b: int,
    ways: int,
    shots: int,
    queries: int,
    shape: tuple[int, int, int],
) -> None:
    sx, sy, qx, qy = batch
    assert sx.shape == (b, ways * shots, *shape) and sx.dtype == torch.float32
    assert qx.shape == (b, ways * queries, *shape) and qx.dtype == torch.float32
    assert sy.shape == (b, ways * shots) and sy.dtype == torch.int64
    assert qy.shape == (b, ways * queries) and qy.dtype == torch.int64
    for y, per in ((sy, shots), (qy, queries)):
        assert torch.equal(y, torch.arange(ways).repeat_interleave(per).expand(b, -1))
    assert float(sx.min()) >= 0.0 and float(sx.max()) <= 1.0


# ----------------------------------------------------------------------------- glyphs


@pytest.fixture(scope="module")
def glyphs() -> TaskFamily:
    return make_family("glyphs", ways=5, shots=1, queries=3, n_test=4, seed=0)


def test_glyphs_family(glyphs: TaskFamily) -> None:
    assert family_kind("glyphs") == "classification" and glyphs.kind == "classification"
    assert glyphs.ways == 5 and glyphs.input_shape == (1, 28, 28) and glyphs.input_dim == 784
    assert len(glyphs.train) == FRESH_EPISODES and len(glyphs.test) == 4
    info = glyphs.info
    assert (info["classes_train"], info["classes_test"]) == (4800, 1600)
    assert (info["base_classes_train"], info["base_classes_test"]) == (1200, 400)
    assert info["n_train"] is None and info["ways"] == 5
    _check_batch(glyphs.sample_train_batch(3, _gen()), 3, 5, 1, 3, (1, 28, 28))
    _check_batch(glyphs.test.batch(range(4)), 4, 5, 1, 3, (1, 28, 28))
    task = glyphs.test[0]
    assert isinstance(task, ClassificationTask)
    assert task.test_x is task.query_x and task.test_y is task.query_y


def test_glyphs_build_renders_nothing() -> None:
    fam = make_family("glyphs", shots=1, queries=1, n_test=2)
    source = fam.test.source
    assert isinstance(source, Rotated) and isinstance(source.base, Glyphs)
    assert source.base._cache == {}
    assert fam.ways == 5  # the default


def test_glyph_episode_timing() -> None:
    # A fresh family: every class of the episode is rendered for the first time. The
    # bound is 5x the ~0.05 s measured on a loaded 2-core machine.
    fam = make_family("glyphs", ways=5, shots=5, queries=15, n_test=1, seed=3)
    start = time.perf_counter()
    fam.test.batch([0])
    assert time.perf_counter() - start < 0.5


def test_episodes_deterministic(glyphs: TaskFamily) -> None:
    again = make_family("glyphs", ways=5, shots=1, queries=3, n_test=4, seed=0)
    for a, b in zip(glyphs.test.batch([0, 3]), again.test.batch([0, 3])):
        assert torch.equal(a, b)
    # The same training draw from the same generator state; another state differs.
    for a, b in zip(glyphs.sample_train_batch(2, _gen(7)), again.sample_train_batch(2, _gen(7))):
        assert torch.equal(a, b)
    g = _gen(7)
    first, second = glyphs.sample_train_batch(2, g), glyphs.sample_train_batch(2, g)
    assert not torch.equal(first[0], second[0])  # fresh episodes per meta-iteration
    other = make_family("glyphs", ways=5, shots=1, queries=3, n_test=4, seed=1)
    assert not torch.equal(other.test.batch([0])[0], glyphs.test.batch([0])[0])
    # Episode i does not depend on how many test episodes there are.
    more = make_family("glyphs", ways=5, shots=1, queries=3, n_test=9, seed=0)
    assert torch.equal(more.test[2].query_x, glyphs.test[2].query_x)


def test_episode_classes_and_samples_distinct(glyphs: TaskFamily) -> None:
    ep = glyphs.test[1]
    images = torch.cat([ep.support_x, ep.query_x]).flatten(1)
    assert len({tuple(r.tolist()) for r in images}) == images.shape[0]
    # Samples of one class differ (jitter, width, wobble) but stay alike.
    g = Glyphs(n_base=3)
    a = g.images(0, np.arange(20))
    assert not np.array_equal(a[0], a[1])
    assert np.mean([np.abs(a[i] - a[0]).mean() for i in range(1, 20)]) < np.mean(
        [np.abs(g.images(c, np.arange(1)) - a[0]).mean() for c in (1, 2)]
    )


def test_rotations_are_distinct_classes() -> None:
    g = Glyphs(n_base=2)
    rot = Rotated(g)
    assert rot.n_classes == 8
    base = g.images(1, np.arange(3))
    for k in range(4):
        img = rot.images(4 + k, np.arange(3))
        assert np.array_equal(img, np.rot90(base, k=k, axes=(-2, -1)))
    flat = [rot.images(4 + k, np.arange(1)).ravel() for k in range(4)]
    assert all(not np.array_equal(flat[i], flat[j]) for i in range(4) for j in range(i))


def test_train_and_test_classes_disjoint(glyphs: TaskFamily) -> None:
    train, test = set(glyphs.train.classes), set(glyphs.test.classes)
    assert not train & test and len(train | test) == 6400
    # Every rotation of a base class stays in its split.
    assert {c // 4 for c in train} == set(range(1200))
    assert {c // 4 for c in test} == set(range(1200, 1600))


def test_fixed_train_episodes_and_to() -> None:
    fam = make_family("glyphs", ways=3, shots=2, queries=2, n_train=5, n_test=2, seed=0)
    assert len(fam.train) == 5 and fam.info["n_train"] == 5
    idx = fam.train.sample_indices(50, _gen())
    assert idx.dtype == torch.int64 and int(idx.min()) >= 0 and int(idx.max()) < 5
    f64 = fam.to(dtype=torch.float64)
    sx, sy, _, _ = f64.test.batch([1])
    assert sx.dtype == torch.float64 and sy.dtype == torch.int64 and f64.info["dtype"] == "float64"
    assert torch.equal(sx.float(), fam.test.batch([1])[0])


def test_regression_sample_train_batch_matches_pool_draw() -> None:
    # The regression path of sample_train_batch: randperm over the tasks, then a fresh
    # episode from each pool, as the training loop draws.
    from amaml.tasks import draw_episode

    fam = make_family("sinusoid", shots=3, queries=4, n_train=6, n_test=1, pool=10)
    got = fam.sample_train_batch(4, _gen(5))
    g = _gen(5)
    idx = torch.randperm(6, generator=g)[:4]
    want = draw_episode(fam.train.batch(idx.tolist()), 3, 4, g)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[0].shape == (4, 3, 1) and fam.kind == "regression" and fam.ways is None


def test_classification_task_validation() -> None:
    x, y = torch.zeros(4, 1, 2, 2), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1"):
        ClassificationTask(x, y + 1, x, y, ways=2)
    with pytest.raises(ValueError, match=r"support_y must be int64 \[4\]"):
        ClassificationTask(x, y.float(), x, y, ways=2)
    with pytest.raises(ValueError, match=r"query_x must be floating \[n, C, H, W\]"):
        ClassificationTask(x, y, x.flatten(1), y, ways=2)


# ----------------------------------------------------------------------------- errors


def test_ways_errors() -> None:
    with pytest.raises(ValueError, match=r"ways=5 \(--ways\) is for classification .*'sinusoid'"):
        make_family("sinusoid", shots=2, queries=2, ways=5)
    with pytest.raises(ValueError, match=r"ways \(1, --ways\) must be >= 2"):
        make_family("glyphs", shots=2, queries=2, ways=1)
    with pytest.raises(ValueError, match=r"ways \(1601, --ways\) exceeds the 1600 meta-test"):
        make_family("glyphs", shots=1, queries=1, ways=1601)
    with pytest.raises(TypeError, match=r"ways \(--ways\) must be an int"):
        make_family("glyphs", shots=1, queries=1, ways=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"--shots/--queries\) exceeds the 20 images"):
        make_family("glyphs", shots=5, queries=16)
    with pytest.raises(ValueError, match=r"--pool\) is for synthetic regression"):
        make_family("glyphs", shots=1, queries=1, pool=4)
    with pytest.raises(ValueError, match="kind must be one of"):
        register_family("x", make_family, kind="ranking")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- Omniglot

_ALPHABETS = {
    "images_background/Alpha": {"character01": 6, "character02": 6, "character03": 6},
    "images_background/Beta": {"character01": 6, "character02": 6},
    "images_evaluation/Gamma": {"character01": 6, "character02": 6},
}


@pytest.fixture
def tiny_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register "omniglot-tiny": 7 characters, the first 4 (sorted) meta-training."""
    monkeypatch.setattr(reg, "_FAMILIES", dict(reg._FAMILIES))
    monkeypatch.setattr(reg, "_KINDS", dict(reg._KINDS))
    builder = functools.partial(build_omniglot, n_train_characters=4, n_characters=None)
    register_family("omniglot-tiny", builder, kind="classification")


def test_omniglot_fixture(tmp_path: Path, tiny_registry: None) -> None:
    root = write_omniglot(tmp_path / "omniglot", _ALPHABETS)
    # root may be the data folder or the folder holding omniglot/.
    fam = make_family("omniglot-tiny", root=tmp_path, ways=5, shots=1, queries=5, n_test=3)
    assert fam.info["root"] == str(root)
    assert (fam.info["classes_train"], fam.info["classes_test"]) == (16, 12)
    assert fam.info["first_test_character"] == "Beta/character02"
    _check_batch(fam.sample_train_batch(2, _gen()), 2, 5, 1, 5, (1, 28, 28))
    _check_batch(fam.test.batch([0, 2]), 2, 5, 1, 5, (1, 28, 28))
    assert not set(fam.train.classes) & set(fam.test.classes)
    # Inverted: the white background is 0, the black ink 1.
    img = fam.test[0].support_x[0, 0]
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0
    assert float((img < 0.5).float().mean()) > 0.5
    # Rotated classes: class 4b+k is base b turned by 90k degrees.
    src = fam.test.source
    base = src.images(16, np.arange(2))
    assert np.array_equal(src.images(18, np.arange(2)), np.rot90(base, 2, axes=(-2, -1)))
    again = make_family("omniglot-tiny", root=root, ways=5, shots=1, queries=5, n_test=3)
    assert all(torch.equal(a, b) for a, b in zip(fam.test.batch([1]), again.test.batch([1])))


def test_omniglot_errors(tmp_path: Path, tiny_registry: None) -> None:
    with pytest.raises(DataError, match=r"No Omniglot found .* pass download=True"):
        make_family("omniglot", root=tmp_path / "none", shots=1, queries=1)
    root = write_omniglot(tmp_path / "o", _ALPHABETS)
    with pytest.raises(DataError, match=r"holds 7 Omniglot characters, expected 1623"):
        make_family("omniglot", root=root, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"ways \(13, --ways\) exceeds the 12 meta-test"):
        make_family("omniglot-tiny", root=root, shots=1, queries=1, ways=13)
    with pytest.raises(ValueError, match=r"exceeds the 6 images"):
        make_family("omniglot-tiny", root=root, shots=2, queries=5)
    (root / "images_evaluation" / "Gamma" / "character03").mkdir()
    with pytest.raises(DataError, match=r"Gamma/character03 holds no \.png image"):
        make_family("omniglot-tiny", root=root, shots=1, queries=1)


def test_omniglot_unreadable_png(tmp_path: Path, tiny_registry: None) -> None:
    root = write_omniglot(tmp_path / "o", _ALPHABETS)
    for png in root.rglob("*.png"):
        png.write_bytes(b"not a png")
    fam = make_family("omniglot-tiny", root=root, shots=1, queries=1, n_test=1)
    with pytest.raises(DataError, match=r"Cannot read image .*\.png .*re-extract"):
        fam.test[0]


# ----------------------------------------------------------------------------- mini-ImageNet

_SPLITS = {"train": ["n01", "n02", "n03"], "val": ["n04"], "test": ["n05", "n06", "n07"]}


def test_mini_imagenet_fixture(tmp_path: Path) -> None:
    root = write_mini_imagenet(tmp_path / "mini-imagenet", _SPLITS, per_class=4)
    fam = make_family("mini-imagenet", root=tmp_path, ways=3, shots=1, queries=3, n_test=2)
    assert family_kind("mini-imagenet") == "classification"
    assert fam.input_shape == (3, 84, 84) and fam.info["root"] == str(root)
    assert fam.info["labels_train"] == ["n01", "n02", "n03"]
    assert fam.info["labels_test"] == ["n05", "n06", "n07"]
    _check_batch(fam.sample_train_batch(2, _gen()), 2, 3, 1, 3, (3, 84, 84))
    _check_batch(fam.test.batch([0, 1]), 2, 3, 1, 3, (3, 84, 84))
    # The pixels are the file's, scaled to [0, 1].
    from PIL import Image

    ep = fam.test[0]
    files = [f for c in fam.test.classes for f in fam.test.source.files[c]]
    pixels = [np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1) / 255.0 for f in files]
    assert any(np.allclose(ep.support_x[0].numpy(), p, atol=1e-6) for p in pixels)


def test_mini_imagenet_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"No mini-ImageNet found .*no official archive"):
        make_family("mini-imagenet", root=tmp_path, shots=1, queries=1, download=True)
    root = write_mini_imagenet(tmp_path / "m", _SPLITS, per_class=4)
    with pytest.raises(ValueError, match=r"ways \(5, --ways\) exceeds the 3 meta-training"):
        make_family("mini-imagenet", root=root, shots=1, queries=1)
    (root / "test.csv").unlink()
    with pytest.raises(DataError, match=r"test\.csv is missing; mini-ImageNet has no official"):
        make_family("mini-imagenet", root=root, shots=1, queries=1, ways=2)
    (root / "test.csv").write_text("file,class\nx.png,n05\n")
    with pytest.raises(DataError, match=r"test\.csv must start with the header 'filename,label'"):
        make_family("mini-imagenet", root=root, shots=1, queries=1, ways=2)
    (root / "test.csv").write_text("filename,label\nmissing.png,n05\n")
    with pytest.raises(DataError, match=r"test\.csv line 2 names missing\.png, which is not in"):
        make_family("mini-imagenet", root=root, shots=1, queries=1, ways=2)


def test_episode_set_arguments() -> None:
    g = Rotated(Glyphs(n_base=2))
    with pytest.raises(ValueError, match=r"ways \(9, --ways\) must be between 2 and the 8"):
        EpisodeSet(g, range(8), ways=9, shots=1, queries=1, n_episodes=1, seed=0, split=6)
    es = EpisodeSet(g, range(8), ways=2, shots=1, queries=1, n_episodes=3, seed=0, split=6)
    with pytest.raises(IndexError, match="out of range"):
        es.batch([3])
    with pytest.raises(ValueError, match="at least one index"):
        es.batch([])


def test_omniglot_download_unverified(
    tmp_path: Path, tiny_registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The official archives, served from 127.0.0.1: each holds its own top folder.
    from _tasks_fixtures import local_http_server, zip_bytes

    from amaml.tasks import download as dl

    src = write_omniglot(tmp_path / "src", _ALPHABETS)
    www = tmp_path / "www"
    www.mkdir()
    for sub in ("images_background", "images_evaluation"):
        members = {
            str(p.relative_to(src)): p.read_bytes() for p in sorted((src / sub).rglob("*.png"))
        }
        (www / f"{sub}.zip").write_bytes(zip_bytes(members))
    data = tmp_path / "data"
    with local_http_server(www) as url:
        monkeypatch.setenv(dl.MIRROR_ENV, url)
        with pytest.warns(
            UserWarning, match=r"No checksum is known for images_(background|evaluation)\.zip"
        ):
            fam = make_family("omniglot-tiny", root=data, download=True, shots=1, queries=1)
    assert (data / "omniglot" / "images_evaluation" / "Gamma" / "character02").is_dir()
    assert fam.info["root"] == str(data / "omniglot")
    assert fam.test.batch([0])[0].shape == (1, 5, 1, 28, 28)
