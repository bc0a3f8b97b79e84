# Quick start: `make demo` and `make test`; both create .venv and install on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench jemalloc chromium clean

$(STAMP): setup.py requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

# CPU jobs run on jemalloc where this machine has it (mirasol3b/allocator.py says why): Debian's
# libjemalloc2, installed by `make jemalloc` when apt-get is root's to run. ALLOCATOR=system: glibc's.
ALLOCATOR ?= auto
ON_ALLOCATOR := $(PY) -m mirasol3b.allocator --allocator $(ALLOCATOR) --
WANT_JEMALLOC := $(if $(filter system,$(ALLOCATOR)),,jemalloc)

demo: $(STAMP) $(WANT_JEMALLOC)
	TF_CPP_MIN_LOG_LEVEL=2 $(ON_ALLOCATOR) $(PY) -m mirasol3b.demo --config=configs/tiny.py --workdir=runs/demo

# One pytest worker per core; a file stays on one worker so its module fixtures compile once; the
# slowest files go first (tests/conftest.py SLOW_FIRST).
test: $(STAMP) chromium
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

# Speed and memory on this CPU (benchmarks/README.md); appends rows to benchmarks/RESULTS.md.
bench: $(STAMP) $(WANT_JEMALLOC)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/run_all.py --allocator $(ALLOCATOR)

jemalloc: $(STAMP)
	@$(PY) -m mirasol3b.allocator --find \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && { echo "installing Debian's libjemalloc2 (mirasol3b/allocator.py says why)"; \
	            export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq libjemalloc2 >/dev/null \
	            || { apt-get update -qq && apt-get install -y -qq libjemalloc2 >/dev/null; }; }; } \
	  || echo "no jemalloc (not installed; apt-get needs root to install it): demo and benchmarks run on the system malloc"

# tests/test_report.py renders the evidence page in headless Chromium: Debian's chromium, installed
# here when apt-get is root's to run; without it that test skips and says why.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && { echo "installing Debian's chromium (tests/test_report.py renders the report page in it)"; \
	            export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq chromium >/dev/null \
	            || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; }; } \
	  || echo "no chromium (not installed; apt-get needs root to install it): the browser test of the report page skips"

clean:
	rm -rf runs/demo
