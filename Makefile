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

test: setup
	$(PY) -m pytest -q

# Until the end-to-end demo lands: train the tiny codec briefly on the bundled photos and write a
# reconstruction grid (runs/demo/codec/samples/) and the exported codec (runs/demo/codec/final/).
demo: setup
	$(PY) scripts/train_codec.py --config configs/codec/small.yaml --output-dir runs/demo/codec --max-steps 200
	@echo "reconstruction grids: runs/demo/codec/samples/"

clean:
	rm -rf runs .pytest_cache
