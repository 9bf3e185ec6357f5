# Two entry points for a fresh machine:
#   make run   -> create .venv, install amaml (CPU torch), run the default meta-training job
#   make test  -> create .venv, install amaml + dev tools, run the test suite
#   make docs  -> the documentation site in site/ (mkdocs build --strict)
#   make smoke -> build sdist and wheel, install the wheel with the core dependencies only
#                 into a fresh venv, run the README's quick start from outside the tree
# TORCH_SPEC pins the torch wheel installed before amaml itself; override it for
# a CUDA machine, e.g. make test TORCH_SPEC="torch==2.13.0 --index-url <your index>".
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
OUT ?= runs/default

# The public API, held to mypy --strict (the internals to the [tool.mypy] section).
PUBLIC_API := src/amaml/__init__.py src/amaml/api.py src/amaml/optim.py src/amaml/support.py \
	src/amaml/allocator.py src/amaml/_types.py src/amaml/_extras.py

.PHONY: install run test lint typecheck docs smoke bench clean

$(BIN)/.amaml-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

$(BIN)/.amaml-docs-installed: pyproject.toml $(BIN)/.amaml-installed
	$(BIN)/python -m pip install -q -e ".[docs]"
	touch $@

install: $(BIN)/.amaml-installed

# The main job: A-MAML and MAML meta-trained on the paper's printed CosMixture family under
# the authors' protocol with an Adam meta-optimiser (the evidence for this choice is in
# docs/paper-protocol.md), beside the no-meta and oracle references (~2-3 min on 2 cores).
run: install
	$(BIN)/amaml compare --protocol paper --family cosmixture-paper --methods amaml,maml \
		--meta-optimizer adam --meta-lr 0.003 --meta-iters 200 --compile \
		--finetune-epochs 300 --out $(OUT)

test: install
	$(BIN)/python -m pytest -q

lint: typecheck
	$(BIN)/ruff check src tests benchmarks examples scripts

typecheck: install
	$(BIN)/mypy
	$(BIN)/mypy --strict --follow-imports=silent $(PUBLIC_API)

docs: $(BIN)/.amaml-docs-installed
	$(BIN)/mkdocs build --strict

smoke: install
	PYTHON=$(BIN)/python TORCH_SPEC="$(TORCH_SPEC)" scripts/wheel_smoke.sh

bench: install
	$(BIN)/python benchmarks/bench_meta_gradient.py

clean:
	rm -rf $(VENV) build dist site *.egg-info src/*.egg-info
