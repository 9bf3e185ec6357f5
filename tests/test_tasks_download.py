"""Tests of downloading, verifying and extracting archives, against a server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import socket
from pathlib import Path

import pytest
from _tasks_fixtures import (
    jester_matrix,
    local_http_server,
    random_ratings,
    write_u_data,
    write_xls,
    zip_bytes,
)

from amaml.tasks import ARCHIVES, DataError, default_root, download_family, make_family
from amaml.tasks import download as dl


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Only 127.0.0.1 may ever be contacted: the default mirror is a closed local port.
    monkeypatch.setenv(dl.MIRROR_ENV, f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv(dl.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(dl, "ARCHIVES", dict(ARCHIVES))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ml100k_zip(tmp_path: Path) -> bytes:
    u_data = write_u_data(tmp_path / "src", random_ratings(30, 25, seed=0)).read_bytes()
    return zip_bytes({"ml-100k/u.data": u_data, "ml-100k/README": b"tiny test copy\n"})


def serve(folder: Path, name: str, data: bytes) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return hashlib.md5(data).hexdigest()


def set_checksum(name: str, index: int = 0, **digests: str | None) -> None:
    archives = list(dl.ARCHIVES[name])
    fields: dict[str, str | None] = {"md5": None, "sha256": None, **digests}
    archives[index] = dataclasses.replace(archives[index], **fields)
    dl.ARCHIVES[name] = tuple(archives)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_download_extract_and_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = ml100k_zip(tmp_path)
    set_checksum("movielens-100k", md5=serve(tmp_path / "www", "ml-100k.zip", data))
    root = tmp_path / "data"
    with local_http_server(tmp_path / "www") as url:
        monkeypatch.setenv(dl.MIRROR_ENV, url)
        fam = make_family("movielens-100k", shots=3, queries=4, n_test=5, root=root, download=True)
    assert len(fam.test) == 5 and fam.info["n_users"] == 30
    assert listing(root) == ["ml-100k", "ml-100k.zip", "ml-100k/README", "ml-100k/u.data"]
    # Second call: the data is found, nothing is fetched (the server is gone).
    again = make_family("movielens-100k", shots=3, queries=4, n_test=5, root=root, download=True)
    assert again.info == fam.info


def test_cache_folder_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = ml100k_zip(tmp_path)
    set_checksum("movielens-100k", sha256=hashlib.sha256(data).hexdigest())
    serve(tmp_path / "www", "ml-100k.zip", data)
    with local_http_server(tmp_path / "www") as url:
        monkeypatch.setenv(dl.MIRROR_ENV, url)
        make_family("movielens-100k", shots=3, queries=4, n_test=5, download=True)
    assert default_root() == tmp_path / "cache"
    assert (tmp_path / "cache" / "ml-100k" / "u.data").is_file()


def test_checksum_mismatch_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serve(tmp_path / "www", "ml-100k.zip", ml100k_zip(tmp_path))
    set_checksum("movielens-100k", md5="0" * 32)
    root = tmp_path / "data"
    with local_http_server(tmp_path / "www") as url:
        monkeypatch.setenv(dl.MIRROR_ENV, url)
        with pytest.raises(
            DataError,
            match=r"ml-100k\.zip from http://127\.0\.0\.1:\d+/ml-100k"
            r"\.zip has MD5 [0-9a-f]{32}, expected 0{32}",
        ):
            make_family("movielens-100k", shots=3, queries=4, root=root, download=True)
    assert listing(root) == []


def test_unreachable_server(tmp_path: Path) -> None:
    root = tmp_path / "data"
    with pytest.raises(
        DataError,
        match=r"Could not download ml-1m\.zip from http://127\.0\.0\.1"
        r".*grouplens",
    ):
        make_family("movielens-1m", shots=3, queries=4, root=root, download=True)
    assert listing(root) == []


def test_http_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "www").mkdir()
    with local_http_server(tmp_path / "www") as url:
        monkeypatch.setenv(dl.MIRROR_ENV, url)
        with pytest.raises(DataError, match=r"Could not download ml-100k\.zip .*\(HTTP 404 "):
            download_family("movielens-100k", tmp_path / "data")
    assert listing(tmp_path / "data") == []


def test_unknown_checksum_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serve(tmp_path / "www", "ml-100k.zip", ml100k_zip(tmp_path))
    set_checksum("movielens-100k")
    with local_http_server(tmp_path / "www") as url:
        monkeypatch.setenv(dl.MIRROR_ENV, url)
        with pytest.warns(UserWarning, match=r"No checksum is known for ml-100k\.zip"):
            folder = download_family("movielens-100k", tmp_path / "data")
    assert folder == tmp_path / "data" / "ml-100k" and (folder / "u.data").is_file()


def test_jester_archives_with_bare_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = jester_matrix(random_ratings(24, 10, seed=1, scale=(-10.0, 10.0)), 24, 10)
    for k, part in enumerate((rows[:12], rows[12:20], rows[20:])):
        xls = write_xls(tmp_path / "src" / f"jester-data-{k + 1}.xls", part).read_bytes()
        archive = zip_bytes({f"jester-data-{k + 1}.xls": xls})
        digest = hashlib.sha256(archive).hexdigest()
        serve(tmp_path / "www", f"jester_dataset_1_{k + 1}.zip", archive)
        set_checksum("jester-1", k, sha256=digest)
    with local_http_server(tmp_path / "www") as url:
        monkeypatch.setenv(dl.MIRROR_ENV, url)
        fam = make_family(
            "jester-1", shots=2, queries=3, n_test=4, root=tmp_path / "d", download=True
        )
    assert fam.info["n_users"] == 24 and fam.input_dim == 10
    assert [Path(f).name for f in fam.info["files"]] == [
        "jester-data-1.xls",
        "jester-data-2.xls",
        "jester-data-3.xls",
    ]
    assert all(Path(f).parent == tmp_path / "d" / "jester-1" for f in fam.info["files"])


def test_corrupt_cached_archive_is_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = ml100k_zip(tmp_path)
    set_checksum("movielens-100k", md5=serve(tmp_path / "www", "ml-100k.zip", data))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ml-100k.zip").write_bytes(b"truncated")
    with local_http_server(tmp_path / "www") as url:
        monkeypatch.setenv(dl.MIRROR_ENV, url)
        download_family("movielens-100k", tmp_path / "data")
    assert (tmp_path / "data" / "ml-100k.zip").read_bytes() == data


def test_unsafe_member_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    evil = zip_bytes({"../escaped.txt": b"x", "ml-100k/u.data": b"1\t1\t1\t1\n"})
    set_checksum("movielens-100k", md5=serve(tmp_path / "www", "ml-100k.zip", evil))
    with local_http_server(tmp_path / "www") as url:
        monkeypatch.setenv(dl.MIRROR_ENV, url)
        with pytest.raises(DataError, match=r"unsafe member path '\.\./escaped\.txt'"):
            download_family("movielens-100k", tmp_path / "data")
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "data" / "ml-100k").exists()


def test_bad_zip_is_deleted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_checksum("movielens-100k", md5=serve(tmp_path / "www", "ml-100k.zip", b"not a zip"))
    with local_http_server(tmp_path / "www") as url:
        monkeypatch.setenv(dl.MIRROR_ENV, url)
        with pytest.raises(DataError, match=r"Could not extract .*ml-100k\.zip"):
            download_family("movielens-100k", tmp_path / "data")
    assert listing(tmp_path / "data") == []


def test_download_family_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"No download is known for 'sinusoid'"):
        download_family("sinusoid", tmp_path)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        download_family("movielens-100k", tmp_path, timeout=0)


def test_official_table() -> None:
    # The shipped table: official hosts, and a checksum for every archive.
    for name, archives in ARCHIVES.items():
        for a in archives:
            assert a.url.startswith("https://") and a.url.endswith("/" + a.filename), name
            assert a.md5 or a.sha256, a.filename
    assert dl.archive_url(ARCHIVES["movielens-1m"][0]).startswith("http://127.0.0.1:")
