# fedrad: `make demo` runs the federated simulation, `make test` the tests.
# Both create .venv on first use (Python 3.11, pinned dependencies; torch from local disk).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
# OpenMP threads sleep instead of spinning when they wait: on a busy 2-core machine
# spinning threads starve each other (measured: 30-60x slower small convolutions).
export OMP_WAIT_POLICY := PASSIVE

.PHONY: venv demo test test-slow test-all clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so nothing later pulls another build
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## synthetic data (if absent) + federated simulation -> runs/demo/report.md
	$(BIN)/fedrad simulate --out runs/demo

test: $(STAMP)  ## quick tests (a few minutes on 2 cores)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)  ## end-to-end runs (Flower simulation)
	$(BIN)/python -m pytest -q -m slow

test-all: test test-slow

clean:
	rm -rf runs .pytest_cache
