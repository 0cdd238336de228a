# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then run the main job on the embedded default
#   make test   set up .venv, then run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch lies on this machine's disk; installing it first keeps
# pip from pulling a multi-GB CUDA build for the bare `torch` requirement.
TORCH  ?= torch==2.13.0
DEMO   ?= runs/demo

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	# Everything else in one resolver call, so no later install can break a pin.
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip check
	touch $@

# Until the federation lands, the main job is what a researcher and three site
# admins do first: synthesise three hospitals, index each site, show each catalog.
demo: setup
	$(BIN)/fedmri data synth --sites 3 --seed 0 --out $(DEMO)/hospitals
	set -e; for site in $(DEMO)/hospitals/site-*; do \
	  name=$$(basename $$site); \
	  $(BIN)/fedmri data index $$site/dicom --reports $$site/reports.csv \
	    --labels $$site/labels.csv --out $(DEMO)/catalogs/$$name --preset tiny; \
	  $(BIN)/fedmri data show $(DEMO)/catalogs/$$name; \
	done

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_index.py
	$(BIN)/python benchmarks/bench_encoder.py

clean:
	rm -rf $(VENV) runs .pytest_cache
