# Two commands a newcomer needs: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# `make test` runs the tests side by side in this many processes (pytest-xdist): most of the suite's
# time is spent waiting on real servers and processes, not on the CPU, so more workers than cores pay;
# each worker has its own ports (tests/ports.py). The long tests (marked slow) start first, one per
# worker, and workers that run dry take over what waits behind them (--dist worksteal,
# tests/scheduling.py). PYTEST_WORKERS=0 runs everything in one process.
# The chaos tests (tests/chaos) run after the rest, by themselves: what they measure (duplicates
# after a killed worker, recovery within a minute) is their own scenario's, and with the whole
# suite beside them on 2 cores Redis's fsync and the workers' threads slowed down enough to double
# the window between a remote's 250 and our record of it (33 of 2,000 sent again, 0 alone).
# They run all at once: the one that counts duplicates ran last and by itself while its count of
# deliveries sent again after we had read the 250 grew with its neighbours' CPU (22, 33 and 68
# beside them, 1-15 alone): the window between a remote's 250 and our record of it. Since the
# outcome journal (worker/journal.py) records what a killed worker had not written, it is 0 beside
# them too (five runs), and the chaos phase takes 57-64 s where it took 47 + 51.
PYTEST_WORKERS ?= 6
CHAOS_WORKERS ?= 5

.PHONY: run test lint typecheck bytecode unit integration docs bench bench-scaling bench-ceiling clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

# Our modules compiled before anything starts: where the environment sets PYTHONDONTWRITEBYTECODE=1
# (this machine's does) Python never writes bytecode, and every mtaq process the tests start
# compiled our 111 modules again (a worker start 0.47 -> 0.36 s of CPU; the chaos test starts one
# a second). Up to date, this takes 0.07 s. Only an optimisation: a file that does not compile is
# named (compileall prints it) and nothing stops; a tree we cannot write to is left as it is.
bytecode: $(STAMP)
	@$(BIN)/python -m compileall -q ingress worker common mtaq bench tests \
		|| echo "make bytecode: not all of it compiled (above); processes compile what they import"

run: $(STAMP) bytecode
	$(BIN)/mtaq run

test: $(STAMP) lint typecheck bytecode
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist worksteal --ignore=tests/chaos $(PYTEST_ARGS)
	$(BIN)/pytest -q -n $(CHAOS_WORKERS) tests/chaos $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

# docs/settings.md from the Settings dataclass (tests/unit/test_docs.py fails when it is stale)
docs: $(STAMP)
	$(BIN)/python -m mtaq.docgen

bench: $(STAMP)
	$(BIN)/python -m bench.throughput $(BENCH_ARGS)

bench-scaling: $(STAMP)
	$(BIN)/python -m bench.scaling $(BENCH_ARGS)

# the Redis cost per message and the msgs/s one Redis core carries (issue 15); 1, 2, 4 workers
bench-ceiling: $(STAMP)
	$(BIN)/python -m bench.ceiling --phases $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache .hypothesis
