"""The route of one inner Adam step under checkpoint through amaml's files, traced at run time.

    python scripts/trace_seam.py fused      # the paper's MLP (the fused kernel)
    python scripts/trace_seam.py autograd   # a model off the fused path (LayerNorm)

Prints the amaml source files entered (1) from the memory strategy's forward pass until the
first Adam update runs and (2) during one step's VJP, from ``FlowContext.vjp`` until it
returns; consecutive frames of one file are collapsed; ``returns`` counts re-entries of a file
already left. The "seam" lines leave out the step's own arithmetic (the step map, the loss
and the model, the Reads bundle's accessors) and the memory advice on a strategy's buffer:
what remains is the plumbing between the memory strategy and the kernel.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

import amaml

kind = sys.argv[1] if len(sys.argv) > 1 else "fused"
torch.manual_seed(0)
layers = [torch.nn.Linear(2, 8), torch.nn.Tanh()]
if kind == "autograd":
    layers.append(torch.nn.LayerNorm(8))
net = torch.nn.Sequential(*layers, torch.nn.Linear(8, 1))
x, y = torch.randn(16, 2), torch.randn(16, 1)
root = os.path.dirname(amaml.__file__)


def short(f: str) -> str:
    return os.path.relpath(f, root)


def trace(start_names, stop):
    seq, state = [], {"on": False, "depth": 0, "done": False}
    def prof(frame, event, arg):
        f = frame.f_code.co_filename
        if state["done"] or not f.startswith(root):
            return
        s, name = short(f), frame.f_code.co_name
        if event == "call":
            if not state["on"] and (s, name) in start_names:
                state["on"] = True
            if state["on"]:
                state["depth"] += 1
                if not seq or seq[-1] != s:
                    seq.append(s)
                if stop and stop(s, name):
                    state["done"] = True
        elif event == "return" and state["on"]:
            state["depth"] -= 1
            b = frame.f_back
            if b is not None and b.f_code.co_filename.startswith(root) and state["depth"] > 0:
                bs = short(b.f_code.co_filename)
                if seq[-1] != bs:
                    seq.append(bs)
            if state["depth"] == 0:
                state["done"] = True
    return seq, prof

MATH = ("flow/step_maps/", "flow/reads.py", "flow/objective.py", "mlp.py", "api.py",
        "support.py", "params.py", "batchnorm.py",
        # the memory advice on a strategy's buffer of kept states (amaml.allocator.huge_pages):
        # a call into the operating system before the first step, not a step's route
        "allocator.py",
        # the same roles before the change: the step maps, the loss and its derivatives
        "flow/optimizers.py", "flow/solvers.py", "flow/hvp.py", "flow/fused.py")


def report(label, seq):
    for name, files in (("all", seq), ("seam", _seam(seq))):
        seen, returns = set(), 0
        for s in files:
            returns += s in seen
            seen.add(s)
        print(f"{kind} {label} ({name}): {len(files) - 1} moves, {returns} returns, "
              f"{len(seen)} files: " + " -> ".join(files))


def _seam(seq):
    """The route without the step's own arithmetic: the step map, the loss and the model,
    the Reads bundle's accessors."""
    out = []
    for s in seq:
        if not s.startswith(MATH) and (not out or out[-1] != s):
            out.append(s)
    return out

mem = amaml.Checkpoint(tapes=False)
def first_update(s: str, name: str) -> bool:
    return name == "update" and ("adam" in s or s.endswith("optimizers.py"))


seq, prof = trace({("flow/memory.py", "forward")}, first_update)
sys.setprofile(prof)
p = amaml.adapt(net, F.mse_loss, (x, y), steps=4, lr=0.05, optimizer="adam", memory=mem)
sys.setprofile(None)
report("forward to the first update", seq)
loss = F.mse_loss(amaml.functional_call(net, p, x), y)
seq, prof = trace({("flow/context.py", "vjp"), ("flow/loop.py", "vjp")}, None)
sys.setprofile(prof)
loss.backward()
sys.setprofile(None)
report("one step VJP", seq)
