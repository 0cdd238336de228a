# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then run the main job on the embedded default
#   make test   set up .venv, then run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch lies on this machine's disk; installing it first keeps
# pip from pulling a multi-GB CUDA build for the bare `torch` requirement.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test bench clean lock

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	# Everything else in one resolver call, so no later install can break a pin, at the versions
	# in constraints.txt (`make lock` renews them). uv (flwr depends on it, hence its range)
	# installs them, compiled, in 27 s instead of pip's 61 s (fresh venv on the 2-core machine,
	# 2026-12-07); pip does it wherever uv cannot.
	$(BIN)/python -m pip install --quiet -c constraints.txt "uv>=0.13.5,<0.14" \
	  && $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -c constraints.txt -e ".[test]" \
	  || $(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/python -m pip check
	touch $@

# Resolve pyproject.toml's ranges afresh in a scratch venv and pin the result in constraints.txt.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet "$(TORCH)" "uv>=0.13.5,<0.14"
	$(LOCK_VENV)/bin/uv pip install --quiet --python $(LOCK_VENV)/bin/python -e ".[test]"
	{ echo "# Every dependency's version, as resolved from pyproject.toml's ranges on $$(date +%F) (torch is pinned"; \
	  sed -n '2,4p' constraints.txt; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

# The main job: three synthetic hospitals, indexed, then a simulated federation
# (pretrain -> align -> evaluate) against local-only and centralized baselines,
# ending with one results table. Everything lands in runs/demo/.
demo: setup
	$(BIN)/fedmri simulate

# Two workers, one test file each at a time (the e2e module's tests share one
# deployment and run in file order), the longest files first (tests/conftest.py;
# --no-loadscope-reorder keeps that order instead of xdist's by test count, which
# started the minutes-long e2e files last). A third worker on the 2-core CI machine
# was no faster (14:11 and 14:28 against 14:29 with two, 2026-12-07): the suite is
# bound by CPU, above all ClientApp processes and Ray starting.
PYTEST_WORKERS ?= 2

test: setup
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

bench: setup
	$(BIN)/python benchmarks/bench_index.py
	$(BIN)/python benchmarks/bench_encoder.py
	$(BIN)/python benchmarks/bench_federation.py
	$(BIN)/python benchmarks/bench_segmentation.py

clean:
	rm -rf $(VENV) runs .pytest_cache
