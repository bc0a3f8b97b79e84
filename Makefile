# Quick start: `make demo` and `make test`; both create .venv and install on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

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
bench: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/run_all.py

clean:
	rm -rf runs/demo
