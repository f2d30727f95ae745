# ConCL-Bench. Two commands set everything up: `make benchmark` and `make test`.
# Every target installs what it needs; no target deletes mlruns/ or datasets/ content.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

METHOD  ?= concl
EPOCHS  ?=
GPUS    ?= 1
PROFILE ?= $(or $(CONCL_BENCH_PROFILE),auto)
SEEDS   ?=
WEIGHTS ?=
ARGS    ?=
CONFIG  ?=
PORT    ?= $(or $(CONCL_BENCH_PORT),5000)
BASELINE ?= mocov2
TRIALS  ?= 10
WORKERS ?= 1
STUDY   ?=
STORAGE ?=
DASHBOARD_PORT ?= 8080

COMMON   = --profile $(PROFILE) --gpus $(GPUS) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(SEEDS),--seeds $(SEEDS)) $(foreach f,$(CONFIG),--config $(f))
RUN_OPTS = --method $(METHOD) $(COMMON) $(ARGS)

.PHONY: install lock data pretrain benchmark finetune table test lint format bench gpu-check ui methods report browser \
	tune tune-best dashboard

install: $(STAMP)

# Re-installs only when pyproject.toml or constraints.txt changes (or the venv is missing);
# constraints.txt holds the exact versions the tests last passed on.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Re-pin constraints.txt to this venv (after a dependency change and a passing `make test`).
lock: $(STAMP)
	@{ echo "# The exact versions the test suite last passed on (Linux x86_64, CPython $$($(PY) -c 'import platform; print(platform.python_version())')); make install"; \
	  echo "# installs within them so that a benchmark's numbers can be reproduced on the same stack."; \
	  echo "# Regenerate after a dependency change with: make lock"; \
	  $(PY) -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^#'; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

data: $(STAMP)
	$(PY) -m benchmark data generate

pretrain: $(STAMP)
	$(PY) -m benchmark pretrain $(RUN_OPTS)

# Pre-train (or reuse), fine-tune on GlaS and CRAG for SEEDS seeds, aggregate, print the table.
benchmark: $(STAMP)
	$(PY) -m benchmark benchmark $(RUN_OPTS)

# The study table: every method plus the supervised and random reference rows, each with its
# probes and detector seeds, then the report against BASELINE. PROFILE=auto means the CPU study
# profile here (`cpu`: the demo with 3 seeds); resumable like every benchmark.
TABLE_METHODS ?= simclr byol pcl mocov1 mocov2 densecl concl supervised random
TABLE_PROFILE  = $(if $(filter auto,$(PROFILE)),cpu,$(PROFILE))
table: $(STAMP)
	@set -e; for m in $(TABLE_METHODS); do \
		$(PY) -m benchmark benchmark --method $$m --profile $(TABLE_PROFILE) --gpus $(GPUS) \
			$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(SEEDS),--seeds $(SEEDS)) \
			$(foreach f,$(CONFIG),--config $(f)) $(ARGS); \
	done
	$(PY) -m benchmark report --baseline $(BASELINE)

# Score someone else's torchvision-format ResNet-18 weights: make finetune WEIGHTS=path.pth
finetune: $(STAMP)
	@test -n "$(WEIGHTS)" || { echo "error: set WEIGHTS=path/to/backbone.pth"; exit 2; }
	$(PY) -m benchmark finetune --weights $(WEIGHTS) $(COMMON) $(ARGS)

methods: $(STAMP)
	$(PY) -m benchmark methods

# Debian's Chromium and ChromeDriver, for the test that opens the MLflow UI in a real browser.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		sudo=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$sudo apt-get update -qq && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

test: $(STAMP) browser
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) -m benchmark.devtools.bench --out reports/bench.json

gpu-check: $(STAMP)
	$(PY) -m benchmark.devtools.gpu_check

# reports/results.md, results.csv and figures from every finished benchmark in MLflow.
report: $(STAMP)
	$(PY) -m benchmark report --baseline $(BASELINE)

# Optuna study of METHOD (experiments/tune/<method>.yaml): TRIALS is the number of finished
# trials the study should hold, so re-running with a larger TRIALS adds only the missing ones.
tune: $(STAMP)
	$(PY) -m benchmark tune --method $(METHOD) --profile $(PROFILE) --trials $(TRIALS) \
		--workers $(WORKERS) $(if $(STUDY),--study $(STUDY)) $(if $(STORAGE),--storage $(STORAGE)) \
		$(foreach f,$(CONFIG),--config $(f)) $(ARGS)

# make -s tune-best STUDY=concl-demo > best.yaml; then make benchmark CONFIG=best.yaml
tune-best: $(STAMP)
	@test -n "$(STUDY)" || { echo "error: set STUDY=name, e.g. STUDY=concl-demo" >&2; exit 2; }
	@$(PY) -m benchmark tune --best $(STUDY) $(if $(STORAGE),--storage $(STORAGE))

# optuna-dashboard on 127.0.0.1:$(DASHBOARD_PORT) over the studies' storage.
dashboard: $(STAMP)
	@test -e "$(or $(STORAGE),mlruns/optuna.db)" || case "$(STORAGE)" in *://*) ;; *) \
		echo "error: no Optuna storage $(or $(STORAGE),mlruns/optuna.db) yet; run make tune first" >&2; exit 2;; esac
	$(VENV)/bin/optuna-dashboard $(or $(STORAGE),sqlite:///mlruns/optuna.db) --host 127.0.0.1 \
		--port $(DASHBOARD_PORT)

# The MLflow UI on 127.0.0.1:$(PORT) over the project's store; Ctrl-C stops it.
ui: $(STAMP)
	$(PY) -m benchmark ui --port $(PORT)
