# gptft: `make run` (the main job, offline) and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build lies on this disk; a GPU user installs their CUDA build into .venv first (or sets TORCH=).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
UV     := $(VENV)/bin/uv
# gpu-check runs in a virtual environment made from the GPU image's Python with --system-site-packages (and a .pth
# file naming GPU_PY's own site-packages, for a GPU_PY that is itself a venv or conda env): the image's
# CUDA torch stays (a constraints file pins it: pip never replaces it) and pip adds gptft's other dependencies
# (pyproject.toml's list, printed by gpu_check.py --requirements) into the venv, never into the system Python (an
# apt-managed one refuses, PEP 668). WHEELS=<folder> installs them from a folder made by `make wheels` where PyPI
# cannot be reached, and finds the data files there. gptft itself runs from this folder (PYTHONPATH): no build step.
GPU_PY   ?= python3
GPU_VENV ?= .venv-gpu
WHEELS   ?=
# make wheels: the target node's Python version and platform (binary wheels must match them)
WHEELS_PY       ?= 3.11
WHEELS_PLATFORM ?= x86_64-manylinux_2_28

.PHONY: setup run test base studies bench gpu-check wheels lint floors tensorboard dashboard clean

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

# A pytest worker per core (pytest-xdist); --dist loadfile keeps each file on one worker, so a module's fixture
# trains once, and --no-loadscope-reorder hands them out in tests/conftest.py's order (the slowest first, so the
# workers end together; xdist would otherwise start the files with the most tests). TEST_WORKERS=1: one worker.
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 1)

test: setup
	MPLBACKEND=Agg $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The studies' offline base (experiment=base, pretrained on Moby Dick), then the five studies judged in one report
# (SCALE=smoke|cpu|paper; ARGS= any other key=value of conf/studies/).
base: setup
	HF_HUB_OFFLINE=1 $(PY) -m gptft.run experiment=base

studies: setup
	HF_HUB_OFFLINE=1 $(PY) -m gptft.studies $(if $(SCALE),scale=$(SCALE)) $(ARGS)

$(UV): $(STAMP)  # a .venv made before uv came in
	$(PY) -m pip install -q uv

bench: setup $(UV)
	$(UV) pip install -q --compile-bytecode --python $(PY) -e ".[dev,bench]"
	HF_HUB_OFFLINE=1 $(PY) benchmarks/train_step.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/products.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/data.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/probes.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/weight_delta.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/memory.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/lora.py

gpu-check:
	@$(GPU_PY) -c "import torch" 2>/dev/null || { echo "gpu-check: $(GPU_PY) has no torch: install a CUDA build of torch there (pytorch.org), or set GPU_PY=<a Python that has one>"; exit 2; }
	test -x $(GPU_VENV)/bin/python || $(GPU_PY) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_PY) -c "import site; print('\n'.join(site.getsitepackages()))" > "$$($(GPU_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/gpu_py.pth"
	$(GPU_VENV)/bin/python -c "import torch; print('torch==' + torch.__version__)" > $(GPU_VENV)/torch-constraint.txt
	$(GPU_VENV)/bin/python benchmarks/gpu_check.py --requirements > $(GPU_VENV)/requirements.txt
	$(GPU_VENV)/bin/python -m pip install -q -c $(GPU_VENV)/torch-constraint.txt $(if $(WHEELS),--no-index --find-links $(WHEELS)) -r $(GPU_VENV)/requirements.txt
	PYTHONPATH=$(CURDIR) HF_HUB_OFFLINE=1 $(if $(WHEELS),GPTFT_SHARED_DATA=$(abspath $(WHEELS))/data) $(GPU_VENV)/bin/python benchmarks/gpu_check.py $(ARGS)

# Everything an air-gapped GPU node lacks but torch: every dependency's wheel for WHEELS_PY on WHEELS_PLATFORM (uv
# resolves the whole tree; torch and the CUDA libraries it pulls in are left out: the node's own stay), and the
# data files the check reads (the team's shared/data copies).
wheels: $(UV)
	mkdir -p wheels/data
	$(PY) benchmarks/gpu_check.py --requirements > wheels/requirements.in
	$(UV) pip compile -q --python-version $(WHEELS_PY) --python-platform $(WHEELS_PLATFORM) --no-header --no-annotate wheels/requirements.in | grep -v -E '^(torch|triton|nvidia-|cuda-)' > wheels/requirements.txt
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(WHEELS_PY) --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d wheels -r wheels/requirements.txt
	$(PY) benchmarks/gpu_check.py --data-files | xargs -I{} cp {} wheels/data/

lint: setup
	$(VENV)/bin/ruff check .

# The floors of pyproject.toml, tested: a separate venv gets torch $(TORCH) (pip, from the disk as in setup) and the
# oldest release of every other direct dependency that pyproject.toml allows (uv's --resolution lowest-direct), then
# runs the tests that drive Hydra, transformers, Lightning, PEFT, Optuna, tensorboard and matplotlib. Not the whole
# suite: a handful of files, a few minutes on 2 cores. Lower a floor only where this passes.
FLOORS_VENV  ?= /tmp/gptft-floors
FLOORS_TESTS ?= tests/test_docs.py tests/test_config.py tests/test_models.py tests/test_metrics.py tests/test_run.py \
                tests/test_lora.py tests/test_report.py tests/test_search.py::test_study_ends_with_report_best_settings_and_figures
floors:
	@test -x $(UV) || $(MAKE) setup  # never reinstalls .venv because pyproject.toml changed
	rm -rf $(FLOORS_VENV)
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(UV) pip install -q --compile-bytecode --python $(FLOORS_VENV)/bin/python --resolution lowest-direct \
	  "$(TORCH)" -e ".[dev]"
	$(UV) pip freeze --python $(FLOORS_VENV)/bin/python > $(FLOORS_VENV)/floors.txt
	grep -iE '^(torch|lightning|torchmetrics|transformers|tiktoken|hydra-core|omegaconf|tensorboard|matplotlib|rich|peft|optuna|optuna-integration|optuna-dashboard|hydra-submitit-launcher|numpy)==' $(FLOORS_VENV)/floors.txt
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(FLOORS_VENV)/bin/python -m pytest -q -p no:cacheprovider $(FLOORS_TESTS)

# Sets up only where nothing is installed: serving curves never reinstalls because pyproject.toml changed.
tensorboard:
	@test -x $(VENV)/bin/tensorboard || $(MAKE) setup
	$(VENV)/bin/tensorboard --logdir outputs

# optuna-dashboard (Optuna's own browser dashboard) on a search's study: make dashboard STUDY=<study folder>, then
# open http://127.0.0.1:8080 (PORT=... for another port). It reads study.db while workers write it. Like
# tensorboard, it sets up only where optuna-dashboard is missing.
STUDY ?=
PORT  ?= 8080
dashboard:
	@test -x $(VENV)/bin/optuna-dashboard || $(MAKE) setup
	@test -f "$(STUDY)/study.db" || { echo "make dashboard: STUDY=$(STUDY) holds no study.db: give STUDY=<the folder of a python -m gptft.search study>" >&2; exit 2; }
	$(VENV)/bin/optuna-dashboard sqlite:///$(abspath $(STUDY))/study.db --host 127.0.0.1 --port $(PORT)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
