"""The examples of docs/meta-parameters.md run, in order, and their assertions hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "meta-parameters.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_page_has_its_examples() -> None:
    blocks = _blocks()
    assert len(blocks) >= 7  # set-up + six kinds of meta-parameter
    for block in blocks[1:]:
        assert "assert" in block  # each example checks what it shows


@pytest.mark.parametrize("i", range(1, len(_blocks())))
def test_example_runs(i: int) -> None:
    ns: dict = {}
    torch.set_num_threads(1)
    exec(compile(_blocks()[0], f"{DOC.name}:setup", "exec"), ns)
    exec(compile(_blocks()[i], f"{DOC.name}:block{i}", "exec"), ns)
