# nanguard: `make demo` and `make test` each do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN := runs/demo-$(shell date +%Y%m%d-%H%M%S)
BACKEND ?= torch

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The main job: generate the shapes dataset (once), train the demo preset on the CPU, evaluate.
# make demo BACKEND=mindspore: the same with the MindSpore backend (~0.9 s a step on a 2-core CPU: ~33 min for the 2,200 steps).
demo: install
	$(VENV)/bin/nanguard train --config demo --out $(RUN) backend=$(BACKEND)

# Two workers (this machine's 2 cores), a test module at a time each, the longest modules first (tests/conftest.py).
test: install
	$(PY) -m pytest -q -n 2 --dist loadscope

bench: install
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/guard_overhead.py
	$(PY) benchmarks/audit_speed.py --annotations 200000

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build src/*.egg-info
