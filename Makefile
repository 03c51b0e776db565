# gptft: `make run` (the main job, offline) and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build lies on this disk; a GPU user installs their CUDA build into .venv first (or sets TORCH=).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup run test bench lint tensorboard clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: setup
	HF_HUB_OFFLINE=1 $(PY) -m gptft.run experiment=quickstart

test: setup
	MPLBACKEND=Agg $(PY) -m pytest -q

bench: setup
	$(PY) -m pip install -q -e ".[dev,bench]"
	HF_HUB_OFFLINE=1 $(PY) benchmarks/train_step.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/data.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/probes.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/weight_delta.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/memory.py

lint: setup
	$(VENV)/bin/ruff check .

tensorboard: setup
	$(VENV)/bin/tensorboard --logdir outputs

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
