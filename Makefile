# ConCL-Bench. Two commands set everything up: `make benchmark` and `make test`.
# Every target installs what it needs; no target deletes mlruns/ or datasets/ content.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

METHOD  ?= mocov2
EPOCHS  ?=
GPUS    ?= 1
PROFILE ?= auto
ARGS    ?=
PORT    ?= 5000

RUN_OPTS = --method $(METHOD) --profile $(PROFILE) --gpus $(GPUS) $(if $(EPOCHS),--epochs $(EPOCHS)) $(ARGS)

.PHONY: install data pretrain benchmark test lint format bench gpu-check ui methods

install: $(STAMP)

# Re-installs only when pyproject.toml changes (or the venv is missing).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

data: $(STAMP)
	$(PY) -m benchmark data generate

pretrain: $(STAMP)
	$(PY) -m benchmark pretrain $(RUN_OPTS)

# The transfer stage (GlaS/CRAG fine-tuning) joins this target with issue 3; today it
# pre-trains and exports the backbone.
benchmark: pretrain

methods: $(STAMP)
	$(PY) -m benchmark methods

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) -m benchmark.bench --out reports/bench.json

gpu-check: $(STAMP)
	$(PY) -m benchmark.gpu_check

ui: $(STAMP)
	mkdir -p mlruns/artifacts
	$(VENV)/bin/mlflow server --backend-store-uri sqlite:///mlruns/mlflow.db \
		--default-artifact-root ./mlruns/artifacts --host 127.0.0.1 --port $(PORT)
