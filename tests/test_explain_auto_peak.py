"""explain's predicted peak for auto is the figure its choice was made on (on the fused path
the choice leaves out the autograd graph its steps never build; the row once did not)."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

import amaml
from amaml.flow.auto import Auto

_UNIT = {"KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0}


def test_auto_row_equals_the_chosen_strategys_figure() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for mb in (0.05, 0.2, 1e4):  # revolve, checkpoint or store, store with the tapes
        text = amaml.explain(net, F.cross_entropy, (x, y), steps=200, lr=0.1,
                             optimizer="adam", memory=Auto(megabytes=mb))
        said = re.search(r"^memory: auto: .*predicted peak ([\d.e+]+) (KiB|MiB|GiB)", text,
                         re.M)
        row = re.search(r"^predicted peak \(MiB, 200 steps\): .* auto ([\d.e+]+)$", text, re.M)
        assert said is not None and row is not None, text
        said_mib = float(said.group(1)) * _UNIT[said.group(2)]
        assert abs(float(row.group(1)) - said_mib) <= 0.01 * said_mib, text
