# `make demo` runs the main job on the embedded default; `make test` runs the whole test suite
# (CI), `make test-fast` the tests not marked slow; `make frontier` measures what the key
# resists on the embedded photos (no model needed). Each creates .venv from the repo's files.
SYSTEM_PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := runs/demo
KEY := $(DEMO)/k.bin
DATAKEY := $(DEMO)/data.key

.PHONY: venv demo frontier block-sizes test test-fast bench lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

$(KEY): | $(STAMP)
	$(PY) tools/make_key.py $(KEY)

# the data key seals the demo's shards at rest (docs/sealing.md); training and the audit open them
$(DATAKEY): | $(STAMP)
	$(PY) tools/make_data_key.py $(DATAKEY)

SHARDS := $(DEMO)/shards/val.manifest.json
PLAIN := $(DEMO)/shards-plain/val.manifest.json
TORCHRUN := $(PY) -m torch.distributed.run --standalone --nproc_per_node=2

$(SHARDS): $(KEY) | $(DATAKEY)
	$(PY) tools/make_shards.py --key $(KEY) --seal $(DATAKEY) --out $(DEMO)/shards \
		--source-map $(DEMO)/sources.parquet
	$(PY) tools/verify_shards.py $(DEMO)/shards --data-key $(DATAKEY)

$(PLAIN): | $(DATAKEY)
	$(PY) tools/make_shards.py --plain --seal $(DATAKEY) --out $(DEMO)/shards-plain

# a run stopped before its end (its checkpoint there, no summary.json) is resumed
resume_if = $(if $(wildcard $(1)/checkpoint.pt),--resume)

$(DEMO)/protected/summary.json: $(SHARDS)
	$(TORCHRUN) train/ddp.py --data $(DEMO)/shards --data-key $(DATAKEY) --out $(DEMO)/protected \
		$(call resume_if,$(DEMO)/protected)

$(DEMO)/baseline/summary.json: $(PLAIN)
	$(TORCHRUN) train/ddp.py --data $(DEMO)/shards-plain --data-key $(DATAKEY) \
		--out $(DEMO)/baseline \
		$(call resume_if,$(DEMO)/baseline)

demo: $(STAMP) $(DEMO)/protected/summary.json $(DEMO)/baseline/summary.json
	$(PY) tools/encryption_grid.py --key $(KEY) --out $(DEMO)/encryption_grid.png
	$(PY) -m attacks --checkpoint $(DEMO)/protected/checkpoint.pt --key $(KEY) \
		--data $(DEMO)/shards --data-key $(DATAKEY) --baseline $(DEMO)/baseline/checkpoint.pt \
		--out report \
		--page docs/results/audit.md

# the demo's protected model, where `make demo` made one, also gets its accuracy with the
# estimated key
DEMO_MODEL := $(if $(wildcard $(DEMO)/protected/checkpoint.pt),--checkpoint \
	$(DEMO)/protected/checkpoint.pt --key $(KEY) --model-data $(DEMO)/shards \
	--data-key $(DATAKEY))

frontier: $(STAMP)
	$(PY) -m attacks.frontier --out report/frontier --page docs/results/frontier.md $(DEMO_MODEL)

# The accuracy side of the block size: a protected model per block size, with the
# demo's budgets, against the demo's baseline; each audited for correct, no and wrong keys.
BLOCKS := runs/blocksizes
block-sizes: $(STAMP) $(DEMO)/baseline/summary.json
	for M in 4 8 16; do \
	  test -f $(BLOCKS)/k$$M.bin || $(PY) tools/make_key.py $(BLOCKS)/k$$M.bin --block-size $$M; \
	  test -f $(BLOCKS)/s$$M/val.manifest.json || \
	    $(PY) tools/make_shards.py --key $(BLOCKS)/k$$M.bin --out $(BLOCKS)/s$$M || exit 1; \
	  test -f $(BLOCKS)/m$$M/summary.json || \
	    $(TORCHRUN) train/ddp.py --data $(BLOCKS)/s$$M --out $(BLOCKS)/m$$M \
	      $$(test -f $(BLOCKS)/m$$M/checkpoint.pt && echo --resume) || exit 1; \
	  $(PY) -m attacks --checkpoint $(BLOCKS)/m$$M/checkpoint.pt --key $(BLOCKS)/k$$M.bin \
	    --data $(BLOCKS)/s$$M --baseline $(DEMO)/baseline/checkpoint.pt --out $(BLOCKS)/r$$M \
	    --scenarios correct_key,no_key,wrong_keys || exit 1; \
	done

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

bench: $(STAMP)
	$(PY) bench/bench_encrypt.py --out bench/results.json
	$(PY) bench/bench_make_shards.py --out bench/results.json
	$(PY) bench/bench_listing.py --out bench/results.json
	$(PY) bench/bench_loader.py --out bench/results.json
	$(PY) bench/bench_frontier.py --out bench/results.json
	$(PY) bench/bench_seal.py --out bench/results.json
	$(PY) bench/report.py --results bench/results.json --page docs/results/benchmarks.md

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs report .pytest_cache
