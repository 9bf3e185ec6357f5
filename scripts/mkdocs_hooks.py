"""MkDocs hook: pages outside ``docs/`` and links from pages to files outside ``docs/``.

``mkdocs build --strict`` fails on a link to a file it does not publish, and it publishes only
``docs/``. The repository's other Markdown and source files are linked from the pages
(``../examples/learned_schedule.py``, ``../benchmarks/README.md``) and read on GitHub the same
way, so rather than rewrite the pages this hook, at build time and offline:

- publishes the Markdown files of ``PAGES`` as pages of the site (``benchmarks/README.md``
  as ``benchmarks.md``);
- publishes every other file of the repository that a page links to under ``repo/``
  (``../examples/x.py`` -> ``repo/examples/x.py``, served as it is);
- rewrites each relative link of a page to where its target is published;
- drops the Sphinx roles some docstrings use (":func:`adapt`" reads as "`adapt`").

A link to something that does not exist is left alone, so ``--strict`` still reports it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

#: Markdown outside docs/ published as a page: site path -> repository path.
PAGES = {
    "index.md": "README.md",
    "benchmarks.md": "benchmarks/README.md",
    "changelog.md": "CHANGELOG.md",
}

# Inline links and images: ](target) or ](target#anchor) or ](target "title").
_LINK = re.compile(r"(\]\()([^)\s#]+)((?:#[^)\s]*)?(?:\s+\"[^\"]*\")?\))")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_published: dict[Path, str] = {}  # real file -> its path in the site


def _roots(config: Any) -> tuple[Path, Path]:
    docs = Path(config["docs_dir"]).resolve()
    return docs, Path(config["config_file_path"]).resolve().parent


def _targets(text: str) -> list[str]:
    text = _FENCE.sub("", text)  # links in code blocks are code
    return [m.group(2) for m in _LINK.finditer(text)
            if "://" not in m.group(2) and not m.group(2).startswith(("mailto:", "/"))]


def on_files(files: Files, config: Any) -> Files:
    docs, root = _roots(config)
    _published.clear()
    for uri, source in PAGES.items():
        _published[(root / source).resolve()] = uri
    todo = [Path(f.abs_src_path) for f in files.documentation_pages() if f.abs_src_path]
    todo += list(_published)
    seen: set[Path] = set()
    while todo:  # pages, then the Markdown files they publish, and so on
        page = todo.pop()
        if page in seen or not page.is_file():
            continue
        seen.add(page)
        for target in _targets(page.read_text(encoding="utf-8")):
            real = (page.parent / target).resolve()
            if not real.is_file() or real.is_relative_to(docs) or real in _published:
                continue
            if not real.is_relative_to(root):
                continue
            _published[real] = "repo/" + real.relative_to(root).as_posix()
            if real.suffix == ".md":
                todo.append(real)
    for real, uri in _published.items():
        if real.is_file():
            files.append(File.generated(config, uri, abs_src_path=str(real)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    docs, _ = _roots(config)
    if not page.file.abs_src_path:
        return markdown
    source_dir = Path(page.file.abs_src_path).resolve().parent
    page_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match[str]) -> str:
        target = match.group(2)
        if "://" in target or target.startswith(("mailto:", "/")):
            return match.group(0)
        real = (source_dir / target).resolve()
        if real in _published:
            uri = _published[real]
        elif real.is_file() and real.is_relative_to(docs):
            uri = real.relative_to(docs).as_posix()
        else:
            return match.group(0)
        new = posixpath.relpath(uri, page_dir or ".")
        return f"{match.group(1)}{new}{match.group(3)}"

    parts = re.split(r"(^(?:```|~~~).*?^(?:```|~~~)[^\n]*$)", markdown,
                     flags=re.MULTILINE | re.DOTALL)
    return "".join(p if i % 2 else _LINK.sub(rewrite, p) for i, p in enumerate(parts))


_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):(?=<code>)")


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    return _ROLE.sub("", html)


__all__ = ["PAGES", "on_files", "on_page_content", "on_page_markdown"]
