# Set-up and the two everyday commands. `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Real data: ../shared/datasets when it is there (the offline copies on the development and CI
# machines); otherwise sparsetrain looks in $SPARSETRAIN_DATA or ~/.cache/sparsetrain and downloads.
SHARED := $(abspath ../shared/datasets)
ifneq ($(wildcard $(SHARED)/mnist),)
export SPARSETRAIN_DATA ?= $(SHARED)
endif

.PHONY: setup demo test bench reproduce clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/sparsetrain run --recipe demo

# The study engine's PostgreSQL tests get a throwaway server when PostgreSQL's binaries are here
# (scripts/postgres-server: started before, stopped after, also on failure); without them they skip.
test: setup
	scripts/postgres-server run -- $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_snip.py

reproduce: setup
	$(BIN)/sparsetrain reproduce snip-table1 --workers 2 --out docs/results/snip_table1.md

clean:
	rm -rf $(VENV) build *.egg-info
