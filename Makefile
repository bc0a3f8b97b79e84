# Quick start: `make demo` and `make test`; both create .venv and install on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench jemalloc clean

$(STAMP): setup.py requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m mirasol3b.demo --config=configs/tiny.py --workdir=runs/demo

# One pytest worker per core; a file stays on one worker so its module fixtures compile once.
test: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

# Speed and memory on this CPU (benchmarks/README.md); appends rows to benchmarks/RESULTS.md.
# They run on jemalloc (benchmarks/README.md, "The allocator"): Debian's libjemalloc2, installed
# here when apt-get is ours to run. ALLOCATOR=system runs them on glibc's malloc instead.
ALLOCATOR ?= auto
bench: $(STAMP) $(if $(filter system,$(ALLOCATOR)),,jemalloc)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/run_all.py --allocator $(ALLOCATOR)

jemalloc: $(STAMP)
	@$(PY) -c 'import sys; sys.path[:0] = ["benchmarks"]; import run_all; sys.exit(not run_all.find_jemalloc())' \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && { echo "installing Debian's libjemalloc2 for the benchmarks"; \
	            export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq libjemalloc2 >/dev/null \
	            || { apt-get update -qq && apt-get install -y -qq libjemalloc2 >/dev/null; }; }; } \
	  || echo "no jemalloc (needs root and apt-get to install): the benchmarks run on the system malloc"

clean:
	rm -rf runs/demo
