"""The library needs only torch and numpy; the [experiments] extra's absence is one clear line.

Each check runs in a subprocess where matplotlib, tqdm, scipy, xlrd and Pillow cannot be
imported (``sys.modules[name] = None``, which is how ``import`` and ``find_spec`` treat a
package that is not installed), as in an environment installed with ``pip install amaml``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from amaml import _extras

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("matplotlib", "tqdm", "scipy", "xlrd", "PIL")
BLOCK = f"import sys\nfor _name in {OPTIONAL!r}:\n    sys.modules[_name] = None\n"


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
           "AMAML_MALLOC": "system"}
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_the_extra_lists_what_the_experiments_import() -> None:
    assert set(_extras.EXPERIMENTS) == set(OPTIONAL)
    # pyproject's [experiments] extra declares the same packages, and the core none of them.
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}

    declared = names(project["optional-dependencies"]["experiments"])
    assert declared == {_extras._DISTRIBUTION.get(m, m).lower() for m in OPTIONAL}
    assert names(project["dependencies"]) == {"torch", "numpy"}


def test_import_amaml_loads_no_optional_dependency() -> None:
    # Not blocked here: importing the package loads none of them beyond what torch itself
    # loads where they are installed (torch imports tqdm when it can).
    code = f"""
        import sys
        def optional():
            return {{m for m in sys.modules if m.split('.')[0] in {OPTIONAL!r}}}
        import numpy, torch
        before = optional()
        import amaml, amaml.algorithms, amaml.experiments, amaml.tasks, amaml.cli
        print(sorted(optional() - before))
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# One subprocess without the extra runs every check below (each import of torch costs
# seconds on a shared machine) and reports the outcomes as JSON.
_WITHOUT_EXTRA = """
    import contextlib, io, json, pathlib
    report = {}
    sys.path.insert(0, 'scripts')
    from run_quickstart import run
    report['quickstart'] = run(pathlib.Path('README.md'))
    import amaml
    report['version'] = amaml.__version__
    from amaml.cli import main
    for argv in (['train', '--meta-iters', '1'], ['compare', '--meta-iters', '1'],
                 ['summarize', 'runs/nowhere'], ['--version']):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(argv + ['--out', OUT] if argv[0] != '--version' else argv)
            except SystemExit as stop:
                status = stop.code
        report[argv[0]] = [status, out.getvalue(), err.getvalue()]
    report['out_exists'] = pathlib.Path(OUT).exists()
    from amaml._extras import MissingExtraError
    from amaml.experiments.plots import plot_training_curve
    try:
        plot_training_curve([0, 1], [1.0, 0.5], OUT + '.png')
    except MissingExtraError as err:
        report['plots'] = str(err)
    from amaml.tasks.base import DataError
    from amaml.tasks.ratings import _read_xls_table
    try:
        _read_xls_table(pathlib.Path(OUT + '.xls'))
    except DataError as err:
        report['xls'] = str(err)
    print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def without_extra(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = str(tmp_path_factory.mktemp("light") / "run")
    result = _python(f"OUT = {out!r}\n" + textwrap.dedent(_WITHOUT_EXTRA))
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return report


def test_quick_start_runs_without_the_extra(without_extra: dict[str, Any]) -> None:
    import amaml

    assert without_extra["quickstart"].startswith("quick start ran")
    assert without_extra["version"] == amaml.__version__


@pytest.mark.parametrize("command", ["train", "compare", "summarize"])
def test_the_command_names_the_extra_and_exits(without_extra: dict[str, Any],
                                               command: str) -> None:
    status, stdout, stderr = without_extra[command]
    assert status == 2
    assert stdout == ""
    assert stderr == (f"amaml: error: amaml {command} needs matplotlib: "
                      "pip install 'amaml[experiments]'\n")
    assert not without_extra["out_exists"]  # refused before any work


def test_version_works_without_the_extra(without_extra: dict[str, Any]) -> None:
    import amaml

    status, stdout, _ = without_extra["--version"]
    assert status == 0
    assert stdout == f"amaml {amaml.__version__}\n"


def test_library_calls_into_the_experiments_name_the_extra(without_extra: dict[str, Any]) -> None:
    assert without_extra["plots"] == (
        "amaml's figures needs matplotlib: pip install 'amaml[experiments]'")


def test_jester_without_xlrd_is_a_data_error(without_extra: dict[str, Any]) -> None:
    assert "needs xlrd: pip install 'amaml[experiments]'" in without_extra["xls"]
    assert "save the sheet as a .csv" in without_extra["xls"]


def test_the_command_names_the_first_missing_package() -> None:
    pytest.importorskip("matplotlib")
    out = _python("""
        del sys.modules['matplotlib']  # installed (the dev extra): found again
        from amaml import _extras
        print(_extras.missing(), _extras.missing(['numpy', 'tqdm.auto']),
              _extras.missing(['numpy', 'torch']))
        from amaml.cli import main
        raise SystemExit(main(['eval', '--checkpoint', 'none.pt']))
    """)
    assert out.returncode == 2
    assert out.stdout.split() == ["tqdm", "tqdm.auto", "None"]
    assert out.stderr == "amaml: error: amaml eval needs tqdm: pip install 'amaml[experiments]'\n"


def test_import_extra_reraises_a_broken_installed_package(tmp_path: Path) -> None:
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("import does_not_exist_anywhere\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ModuleNotFoundError, match="does_not_exist_anywhere"):
            _extras.import_extra("brokenpkg", "a test")
        message = r"^a test needs nothing_here: pip install 'amaml\[experiments\]'$"
        with pytest.raises(_extras.MissingExtraError, match=message):
            _extras.import_extra("nothing_here.sub", "a test")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("brokenpkg", None)


def test_pillow_is_named_by_its_distribution() -> None:
    assert _extras.extra_message("PIL.Image", "Reading x") == (
        "Reading x needs pillow: pip install 'amaml[experiments]'")
