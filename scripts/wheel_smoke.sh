#!/usr/bin/env bash
# Build the sdist and the wheel (the wheel from the sdist), install the wheel into a fresh
# venv with torch first and only the core dependencies, and from outside the source tree:
# run the README's quick start, check the version and py.typed, and check that the amaml
# command without the [experiments] extra prints one line naming it and exits non-zero.
#
#   scripts/wheel_smoke.sh            # PYTHON (default python3) builds; TORCH_SPEC pins torch
#
# Any failed check exits non-zero. The build, the venv and the run live in a temporary
# folder, removed at exit (KEEP=1 keeps it).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/amaml-smoke.XXXXXX")"
[[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$WORK"' EXIT
say() { printf 'wheel_smoke: %s\n' "$*"; }
fail() { printf 'wheel_smoke: FAILED: %s\n' "$*" >&2; exit 1; }
SECONDS=0

"$PYTHON" -m build --version >/dev/null 2>&1 \
  || fail "$PYTHON has no 'build' package: pip install build, or run 'make smoke'"
say "building sdist and wheel"
"$PYTHON" -m build --outdir "$WORK/dist" "$ROOT" >"$WORK/build.log" 2>&1 \
  || { tail -n 30 "$WORK/build.log" >&2; fail "python -m build"; }
shopt -s nullglob
wheels=("$WORK"/dist/amaml-*.whl)
sdists=("$WORK"/dist/amaml-*.tar.gz)
(( ${#wheels[@]} == 1 && ${#sdists[@]} == 1 )) || fail "expected one wheel and one sdist in dist/"
WHEEL="${wheels[0]}"
say "built $(basename "$WHEEL") and $(basename "${sdists[0]}") (${SECONDS}s)"
"$PYTHON" - "$WHEEL" <<'PY' || fail "the wheel's contents"
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
for need in ("amaml/__init__.py", "amaml/py.typed", "amaml/flow/adjoint.py"):
    if need not in names:
        sys.exit(f"{need} is not in the wheel")
if any(n.startswith(("tests/", "docs/", "benchmarks/")) for n in names):
    sys.exit("the wheel carries tests/, docs/ or benchmarks/")
PY

say "fresh venv: $TORCH_SPEC, then the wheel with its core dependencies"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options (--index-url ...)
"$VPY" -m pip install -q $TORCH_SPEC || fail "pip install $TORCH_SPEC"
"$VPY" -m pip install -q "$WHEEL" || fail "pip install the wheel"
say "installed (${SECONDS}s)"

cd "$WORK"  # outside the source tree: the wheel's amaml, not src/
"$VPY" - <<'PY' || fail "the core install pulled in an optional dependency"
import importlib.util
extra = [m for m in ("matplotlib", "tqdm", "scipy", "xlrd", "PIL") if importlib.util.find_spec(m)]
if extra:
    raise SystemExit(f"installed without [experiments], yet present: {extra}")
PY
"$VPY" - <<'PY' || fail "version or py.typed"
import importlib.metadata, pathlib
import amaml
meta = importlib.metadata.version("amaml")
if amaml.__version__ != meta:
    raise SystemExit(f"amaml.__version__ {amaml.__version__} != the wheel's metadata {meta}")
if not (pathlib.Path(amaml.__file__).parent / "py.typed").is_file():
    raise SystemExit("py.typed is not installed")
print(f"wheel_smoke: amaml.__version__ == metadata version == {meta}; py.typed installed")
PY
"$VPY" "$ROOT/scripts/run_quickstart.py" "$ROOT/README.md" --not-under "$ROOT" \
  || fail "the README's quick start"

status=0
"$WORK/venv/bin/amaml" train --meta-iters 1 --out "$WORK/run" >"$WORK/cli.out" 2>"$WORK/cli.err" \
  || status=$?
(( status != 0 )) || fail "amaml train without the [experiments] extra exited 0"
grep -q "pip install 'amaml\[experiments\]'" "$WORK/cli.err" \
  || { cat "$WORK/cli.err" >&2; fail "amaml train's error does not name the extra"; }
! grep -q Traceback "$WORK/cli.err" || { cat "$WORK/cli.err" >&2; fail "a traceback"; }
(( $(wc -l <"$WORK/cli.err") == 1 )) || { cat "$WORK/cli.err" >&2; fail "not one line"; }
say "amaml train without the extra (exit $status): $(cat "$WORK/cli.err")"
say "passed in ${SECONDS}s (removing the temporary folder follows)"
