# The two commands of the README. Both create .venv with pip when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# No network but the package index: never let libraries reach for a hub at run time.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The linter first (ruff, configured in pyproject.toml): a second, cheap reviewer that CI enforces.
test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# The whole mission on bundled data (configs/demo.yaml): shapes world -> codec -> evaluation -> shards ->
# U-Net -> generation + prompt adherence -> runs/demo/report.md. Re-running resumes; `make clean` starts over.
demo: setup
	$(PY) -m experiments.demo --config configs/demo.yaml

clean:
	rm -rf runs data/shapes data/shapes-32 .pytest_cache
