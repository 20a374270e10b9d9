# `make demo` runs the main job on the embedded default; `make test` runs the test suite.
# Both create .venv from the repo's files first.
SYSTEM_PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := runs/demo
KEY := $(DEMO)/k.bin

.PHONY: venv demo test bench lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

$(KEY): | $(STAMP)
	$(PY) tools/make_key.py $(KEY)

demo: $(STAMP) $(KEY)
	$(PY) tools/make_shards.py --key $(KEY) --out $(DEMO)/shards
	$(PY) tools/make_shards.py --plain --out $(DEMO)/shards-plain
	$(PY) tools/verify_shards.py $(DEMO)/shards
	$(PY) tools/encryption_grid.py --key $(KEY) --out $(DEMO)/encryption_grid.png

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/bench_encrypt.py --out bench/results.json
	$(PY) bench/bench_make_shards.py --out bench/results.json

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache
