# Two commands a newcomer needs: `make run` and `make test`.
# Each builds its own virtual environment from the pinned requirements.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint clean

$(VENV)/.installed-run: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-run requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

run: $(VENV)/.installed-run
	$(VENV)/bin/kvd serve

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache

# Benchmarks (docs/benchmarks.md): `make bench`, `make bench-replay`,
# `make bench-compaction`, `make bench-listing` and `make bench-nats`, in their
# own environment so the benchmark's extra packages never reach .venv.
# Flags go through BENCH_ARGS, REPLAY_ARGS, COMPACTION_ARGS, LISTING_ARGS and NATS_ARGS, e.g.
#   make bench BENCH_ARGS="--duration 5 --servers kvd,etcd"
#   make bench-replay REPLAY_ARGS="--records 200000"
#   make bench-compaction COMPACTION_ARGS="--keys 200000 --repeats 1"
#   make bench-listing LISTING_ARGS="--keys 100000 --repeats 1"
#   make bench-nats NATS_ARGS="--duration 5 --workloads put,get"
BENCH_VENV ?= .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_ARGS ?=
REPLAY_ARGS ?=
COMPACTION_ARGS ?=
LISTING_ARGS ?=
NATS_ARGS ?=

.PHONY: bench bench-replay bench-replay-phases bench-compaction bench-listing bench-nats

$(BENCH_VENV)/.installed: requirements.txt pyproject.toml bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	printf '*\n' > $(BENCH_VENV)/.gitignore
	$(BENCH_PY) -m pip install --quiet --upgrade pip
	$(BENCH_PY) -m pip install --quiet -r requirements.txt -r bench/requirements.txt
	$(BENCH_PY) -m pip install --quiet pickledb==0.9.2 || echo "note: pickledb 0.9.2 did not install; the benchmark skips the original design"
	$(BENCH_PY) -m pip install --quiet --no-deps -e .
	touch $@

bench: $(BENCH_VENV)/.installed
	bash bench/setup.sh
	$(BENCH_PY) bench/run.py $(BENCH_ARGS)

bench-replay: $(BENCH_VENV)/.installed
	$(BENCH_PY) bench/replay.py $(REPLAY_ARGS)

bench-replay-phases: $(BENCH_VENV)/.installed
	$(BENCH_PY) bench/replay_phases.py $(PHASES_ARGS)

bench-compaction: $(BENCH_VENV)/.installed
	$(BENCH_PY) bench/compaction.py $(COMPACTION_ARGS)

# Needs wrk (apt-get install wrk).
bench-listing: $(BENCH_VENV)/.installed
	$(BENCH_PY) bench/listing_fairness.py $(LISTING_ARGS)

# Needs wrk and nats-server (apt-get install wrk nats-server).
bench-nats: $(BENCH_VENV)/.installed
	$(BENCH_PY) bench/nats.py $(NATS_ARGS)
