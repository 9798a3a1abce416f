# Two commands: `make demo` and `make test`. Each creates .venv if missing and installs first.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU build of torch is pinned; GPU users install their own torch first (see README).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flowdppo-video train run.output_dir=runs/demo-$$(date +%Y%m%d-%H%M%S)

# The import layers first (pyproject.toml's [tool.importlinter] contracts): seconds, and a broken
# layer is named before the minutes of pytest. Then the tests on WORKERS pytest-xdist workers, a test
# file per worker at a time (its module fixtures built once); each worker computes on one thread.
WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile

bench: $(STAMP)
	$(PY) tools/bench/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
