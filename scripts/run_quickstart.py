"""Run the README's quick start and check what it promises: a finite, non-zero meta-gradient.

The snippet is the first ``python`` code block under the README's "Quick start" heading, so
the README, the tests (tests/test_light_core.py) and the wheel smoke check
(scripts/wheel_smoke.sh) run one and the same code.

    python scripts/run_quickstart.py README.md [--not-under DIR]

``--not-under DIR`` also checks that ``amaml`` was imported from outside ``DIR`` (an
installed wheel, not the source tree). Exits non-zero with one line if a check fails.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def quickstart(readme: Path) -> str:
    """The first ```python block after the "## Quick start" heading of ``readme``."""
    text = readme.read_text(encoding="utf-8")
    head = re.search(r"^## Quick start\s*$", text, flags=re.MULTILINE)
    if head is None:
        raise ValueError(f"{readme} has no '## Quick start' heading")
    block = re.search(r"^```python\n(.*?)^```", text[head.end():], flags=re.MULTILINE | re.DOTALL)
    if block is None:
        raise ValueError(f"{readme}'s quick start has no ```python block")
    return block.group(1)


def run(readme: Path, not_under: Path | None = None) -> str:
    """Execute the quick start; return a one-line report, or raise ``RuntimeError``."""
    namespace: dict[str, object] = {"__name__": "__quickstart__"}
    exec(compile(quickstart(readme), f"{readme} (quick start)", "exec"), namespace)

    import torch

    import amaml

    where = Path(amaml.__file__).resolve()
    if not_under is not None and not_under.resolve() in where.parents:
        raise RuntimeError(f"amaml was imported from the source tree ({where}), not the wheel")
    net = namespace.get("net")
    if not isinstance(net, torch.nn.Module):
        raise RuntimeError("the quick start defines no model named 'net'")
    grads = [p.grad for p in net.parameters()]
    if any(g is None for g in grads):
        raise RuntimeError("the quick start left a parameter without a meta-gradient")
    flat = torch.cat([g.reshape(-1) for g in grads if g is not None])
    if not bool(torch.isfinite(flat).all()) or float(flat.abs().max()) == 0.0:
        raise RuntimeError(f"the meta-gradient is not finite and non-zero: {flat}")
    return (f"quick start ran: amaml {amaml.__version__} from {where.parent}, "
            f"meta-gradient norm {float(flat.norm()):.4g} over {flat.numel()} parameters")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("readme", type=Path)
    parser.add_argument("--not-under", type=Path, default=None,
                        help="fail if amaml is imported from inside this folder")
    args = parser.parse_args()
    try:
        print(run(args.readme, args.not_under))
    except (RuntimeError, ValueError) as err:
        print(f"run_quickstart: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
