# Two entry points: `make demo` (set up, then the main job) and `make test` (set up, then the tests).
# Set-up creates .venv once and re-runs only when pyproject.toml or requirements-nodeps.txt change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all setup system-data heads bench results results-long results-refset clean

demo: $(STAMP) system-data
	$(BIN)/lifelong demo

# The layering contracts (pyproject.toml [tool.importlinter]) first: a broken layer fails the tests.
test: $(STAMP) system-data
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# Including the slower integration tests on the embedded real models.
test-all: $(STAMP) system-data
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m ""

setup: $(STAMP) system-data

$(STAMP): pyproject.toml requirements-nodeps.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: a looser spec would pull a multi-GB CUDA build.
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev]"
	# Packages whose declared dependencies are broken or huge: installed without them.
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

# Debian's Fashion-MNIST, the fonts and clip-art of the text-to-image data, and chromium for the report's
# browser test (root only; otherwise the loaders' errors say how to get them, and the browser test skips).
system-data:
	@bash scripts/install_system_data.sh
	@bash scripts/install_t2i_data.sh >/dev/null || echo "note: the text-to-image data packages are not installed (see scripts/install_t2i_data.sh); their tests skip"
	@bash scripts/install_browser.sh

heads: $(STAMP)
	$(BIN)/python scripts/fit_vlm_heads.py

bench: $(STAMP) system-data
	$(BIN)/python benchmarks/loop_overhead.py
	$(BIN)/python benchmarks/cached_teachers.py

# Every continual-learning method on mtil-mini in 3 cyclic task orders (configs/mtil_all.yaml), its rows trained
# by JOBS worker processes at once (on 2 cores, 2 one-thread workers beat one two-thread process; see the README).
JOBS ?= 2
results: $(STAMP) system-data
	$(BIN)/lifelong run configs/mtil_all.yaml --jobs $(JOBS)

# The longer stream (10 tasks: mtil-mini + 5 openclipart groups), one order (configs/mtil_long.yaml).
results-long: $(STAMP) system-data
	$(BIN)/lifelong run configs/mtil_long.yaml --jobs $(JOBS)

# ZSCL and Select-and-Distill on the photo crops alone, against make results' photos+openclipart rows.
results-refset: $(STAMP) system-data
	$(BIN)/lifelong run configs/mtil_refset.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache
