"""The documentation site builds with ``mkdocs build --strict``, offline, and has its pages.

Skipped where the ``docs`` extra is not installed (``dev`` includes it). Strict mode fails on
any broken link or anchor, so this also checks every page's links.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("material")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                             "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.mark.parametrize("page", [
    "index.html", "getting-started/index.html", "guarantees/index.html", "memory/index.html",
    "inner-optimizers/index.html", "meta-parameters/index.html", "batched-tasks/index.html",
    "compile-gpu/index.html", "cli/index.html", "migrating/index.html",
    "paper-results/index.html", "paper-protocol/index.html", "experiments/index.html",
    "long-horizons/index.html", "classification/index.html", "performance/index.html",
    "benchmarks/index.html", "method/index.html", "api/index.html", "changelog/index.html",
])
def test_page_is_built(site: Path, page: str) -> None:
    assert (site / page).is_file()


def test_api_reference_is_generated_from_the_docstrings(site: Path) -> None:
    html = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("amaml.adapt", "amaml.adapt_batch", "amaml.Checkpoint", "amaml.Revolve",
                 "amaml.optim.Adam", "amaml.DivergenceError"):
        assert f'id="{name}"' in html, name
    # A sentence of adapt's docstring, rendered; no Sphinx role left as text.
    assert "Adapt a model to one task by gradient flow" in html
    assert ":func:" not in html and ":class:" not in html


def test_readme_is_the_home_page_with_links_rewritten(site: Path) -> None:
    html = (site / "index.html").read_text(encoding="utf-8")
    assert "What amaml does that the peers do not" in html
    assert 'href="getting-started/"' in html  # docs/getting-started.md from the README
    assert 'href="benchmarks/"' in html  # benchmarks/README.md, published as a page
    assert 'href="docs/' not in html and 'src="docs/' not in html


def test_files_outside_docs_that_pages_link_are_published(site: Path) -> None:
    example = site / "repo" / "examples" / "meta_sgd_sinusoid.py"
    assert example.read_bytes() == (ROOT / "examples" / "meta_sgd_sinusoid.py").read_bytes()
    bench = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert "../figures/peers-cpu.png" in bench  # ../docs/figures/... from benchmarks/


def test_the_site_fetches_nothing_when_read(site: Path) -> None:
    # No web fonts or CDN scripts: the pages read offline.
    for page in ("index.html", "api/index.html"):
        html = (site / page).read_text(encoding="utf-8")
        assert "fonts.googleapis.com" not in html
        assert "<script src=\"http" not in html
