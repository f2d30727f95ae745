# ConCL-Bench. Two commands set everything up: `make benchmark` and `make test`.
# Every target installs what it needs; no target deletes mlruns/ or datasets/ content.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

METHOD  ?= concl
EPOCHS  ?=
GPUS    ?= 1
PROFILE ?= auto
SEEDS   ?=
WEIGHTS ?=
ARGS    ?=
CONFIG  ?=
PORT    ?= 5000
BASELINE ?= mocov2

COMMON   = --profile $(PROFILE) --gpus $(GPUS) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(SEEDS),--seeds $(SEEDS)) $(foreach f,$(CONFIG),--config $(f))
RUN_OPTS = --method $(METHOD) $(COMMON) $(ARGS)

.PHONY: install data pretrain benchmark finetune test lint format bench gpu-check ui methods report

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

# Pre-train (or reuse), fine-tune on GlaS and CRAG for SEEDS seeds, aggregate, print the table.
benchmark: $(STAMP)
	$(PY) -m benchmark benchmark $(RUN_OPTS)

# Score someone else's torchvision-format ResNet-18 weights: make finetune WEIGHTS=path.pth
finetune: $(STAMP)
	@test -n "$(WEIGHTS)" || { echo "error: set WEIGHTS=path/to/backbone.pth"; exit 2; }
	$(PY) -m benchmark finetune --weights $(WEIGHTS) $(COMMON) $(ARGS)

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

# reports/results.md, results.csv and figures from every finished benchmark in MLflow.
report: $(STAMP)
	$(PY) -m benchmark report --baseline $(BASELINE)

# The MLflow UI on 127.0.0.1:$(PORT) over the project's store; Ctrl-C stops it.
ui: $(STAMP)
	$(PY) -m benchmark ui --port $(PORT)
