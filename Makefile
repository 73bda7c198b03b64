# Boring on purpose: CI calls the same targets a person does.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch keeps installs lean; override elsewhere, e.g. TORCH_SPEC='torch>=2.1'.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

# The home libraries themselves, for the parity tests and the benchmarks: torchvision (which
# transformers 5 runs its image processors on by default), timm and open_clip. They need a
# torch build that torchvision loads with, so they live in a venv of their own; the tests call
# it as a subprocess (tests/reference/home.py) and skip without it, unless VITCLI_REQUIRE_REF=1.
REF_VENV ?= .venv-ref
REF_SPEC ?= torch==2.14.1 torchvision==0.29.1 timm==1.0.31 transformers==5.25.0 open_clip_torch==3.3.0 \
	pytest==9.2.0
# The tests that import a home library in-process and need torchvision beside it (timm's model
# parity): run by the reference venv's own python when it exists.
REF_TESTS ?= tests/test_families_timm.py

.PHONY: runtime install demo test test-fast lint check-wheel bench weights clean ref-env

# The runtime alone: torch and vitcli's own dependencies, what `vit` needs to run.
$(BIN)/vit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e .
	touch $(BIN)/vit

# On top of it, for development: the dev extra (pytest, transformers, ruff, mypy) and the
# onnx extra (vit export, the ONNX Runtime tests).
$(VENV)/.dev-installed: $(BIN)/vit
	$(BIN)/python -m pip install -q -e ".[dev,onnx]"
	touch $(VENV)/.dev-installed

runtime: $(BIN)/vit

install: $(VENV)/.dev-installed

$(REF_VENV)/bin/python:
	$(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/python -m pip install -q --upgrade pip
	$(REF_VENV)/bin/python -m pip install -q $(REF_SPEC)

ref-env: $(REF_VENV)/bin/python

# The main job on the bundled default model: classify the examples, render attention sheets.
# The runtime only: no dev or onnx extras.
demo: runtime
	$(BIN)/vit predict examples/shapes-ring.jpg examples/shapes-star.jpg examples/shapes-triangle.jpg --format table
	$(BIN)/vit attention examples/ --out out/attention --html
	@echo "attention sheets written under out/attention/ (open out/attention/index.html)"

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	@if [ -x $(REF_VENV)/bin/python ]; then \
		echo "timm parity in the reference venv ($(REF_VENV)):"; \
		PYTHONPATH=$(CURDIR) $(REF_VENV)/bin/python -m pytest $(REF_TESTS) $(PYTEST_ARGS); \
	fi

# The suite without the tests marked slow (subprocesses, multi-process runs): 226 s measured
# on 2 cores at a load average of 3 to 4.5 (the whole suite, make test: 465 s).
test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check vitcli tests bench weights tools
	$(BIN)/ruff format --check vitcli tests bench weights tools
	$(BIN)/mypy

# A plain (non-editable) wheel must carry the bundled model and find it from any folder.
check-wheel: install
	rm -rf build/wheel build/site build/wheel-attention && mkdir -p build/wheel build/site
	$(BIN)/python -m pip wheel -q --no-deps . -w build/wheel
	$(BIN)/python -m pip install -q --no-deps --target build/site build/wheel/vitcli-*.whl
	cd /tmp && PYTHONPATH=$(CURDIR)/build/site $(CURDIR)/$(BIN)/python -c "import vitcli, sys; \
	from vitcli.weights.resolve import default_model_path as p; \
	assert vitcli.__file__.startswith('$(CURDIR)/build/site'), vitcli.__file__; print('bundled model:', p())"
	cd /tmp && PYTHONPATH=$(CURDIR)/build/site $(CURDIR)/$(BIN)/python -m vitcli predict $(CURDIR)/examples/shapes-star.jpg --format table
	cd /tmp && PYTHONPATH=$(CURDIR)/build/site $(CURDIR)/$(BIN)/python -m vitcli attention $(CURDIR)/examples/shapes-star.jpg \
		--out $(CURDIR)/build/wheel-attention --explore --html -q
	test -s build/wheel-attention/shapes-star/explorer.html && test -s build/wheel-attention/index.html

bench: install
	$(BIN)/python bench/predict.py
	$(BIN)/python bench/wait_policy.py
	$(BIN)/python bench/attention.py
	$(BIN)/python bench/train.py

# Retrain the bundled default model from scratch with the committed, seeded recipe.
weights: install
	bash weights/recipe/recipe.sh

clean:
	rm -rf $(VENV) $(REF_VENV) build dist *.egg-info out .pytest_cache
