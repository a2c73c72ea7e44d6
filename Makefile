# fedrad: `make demo` runs the federated simulation, `make test` the tests.
# Both create .venv on first use (Python 3.11, pinned dependencies, their own dependencies fixed by constraints.txt; torch from local disk).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.14.1 torchvision==0.29.1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
# OpenMP threads sleep instead of spinning when they wait: on a busy 2-core machine
# spinning threads starve each other (measured: 30-60x slower small convolutions).
export OMP_WAIT_POLICY := PASSIVE

.PHONY: venv demo test test-slow test-bench test-all constraints clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so nothing later pulls another build
	$(BIN)/pip install --quiet $(TORCH)
	# constraints.txt: every transitive dependency at the version the tests passed with
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## synthetic data (if absent) + federated simulation -> runs/demo/report.md
	$(BIN)/fedrad simulate --out runs/demo

test: $(STAMP)  ## quick tests (a few minutes on 2 cores)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)  ## end-to-end runs (Flower simulation)
	$(BIN)/python -m pytest -q -m slow

test-bench: $(STAMP)  ## benchmarks run by hand, not in CI: 16 site daemons on one machine (~9 GB, 10+ min)
	$(BIN)/python -m pytest -q -s -m bench

test-all: test test-slow

constraints:  ## after changing a dependency in pyproject.toml: install without the old pins, then re-pin
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable; } > constraints.new
	mv constraints.new constraints.txt
	touch $(STAMP)

clean:
	rm -rf runs .pytest_cache
