"""Shared fixtures: the real book, the real tokenizer, a tiny GPT-2 saved and loaded the real way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tests that run gptft in this process never reach the hub either (read when huggingface_hub is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite's forced precision=auto choice, if any (tests/README.md), read before a test measures the CPU (the
# measurement is written to the same variable for the processes a run starts).
FORCED_PRECISION = os.environ.get("GPTFT_CPU_BF16_SPEEDUP")
# Under pytest-xdist (make test: a worker per core) each worker and the runs it starts get their share of the cores:
# two workers of two torch threads each on 2 cores made every run several times slower (OpenMP threads spin).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    # the cores this process may use (nproc's count), or all of them where the OS cannot say (macOS)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // WORKERS))
# The files that take longest start first, so that the workers end together (make test's xdist hands out whole files
# in collection order: --dist loadfile --no-loadscope-reorder); measured with --durations on 2 cores, 2026-12-06.
SLOW_FIRST = ("test_gpu_check.py", "test_search.py", "test_cli.py", "test_reliability.py", "test_run.py",
              "test_report.py", "test_scale.py", "test_trust.py", "test_studies.py")  # fmt: skip

# For runs that force bf16-mixed: bf16 is emulated on a CPU without AVX-512 (500× slower), and the output layer's
# products are most of a tiny model's work: 2 rows × 16 tokens and 2 validation windows instead of debug=fast's
# 4 × 64 and 8 (≈ 8× less of it).
SMALL_BF16 = ("data.seq_len=16", "data.batch_size=2", "data.val_windows=2")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    # a stable sort: each file's tests keep their order
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A private data folder (token cache, downloads) so tests never write into the repo."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def gptft_env(data_dir) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYDRA_")}
    env.update(HF_HUB_OFFLINE="1", GPTFT_DATA_DIR=str(data_dir), MPLBACKEND="Agg", TQDM_DISABLE="1")
    return env


@pytest.fixture(scope="session")
def run_gptft(gptft_env):
    """Run `python -m gptft.run` with overrides in a subprocess, as a user would."""

    def run(*overrides: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "gptft.run", *overrides],
            cwd=REPO,
            env={**gptft_env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture(scope="session")
def run_ok(run_gptft):
    """`run_gptft` for runs that must succeed: a failure shows the end of stderr."""

    def run(*overrides: str, **kwargs) -> subprocess.CompletedProcess:
        result = run_gptft(*overrides, **kwargs)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    return run


@pytest.fixture(scope="session")
def train_here(data_dir, tmp_path_factory):
    """`gptft.run.train` in this process, on the config Hydra composes from `overrides` (what gptft.search
    does for a trial), into `out` (default: a new folder), with `callbacks` beside the config's: no
    interpreter start, so seconds faster than a subprocess. For runs refused before training (the
    ConfigError's message is gptft.run's one line) and for tests that read no TensorBoard events
    (test_reliability's signal tests, test_scale's graph count): in the full suite, runs trained here after
    the Slurm tests wrote no TensorBoard events (process-wide state left behind, probably Lightning's
    rank_zero_only.rank; not pinned down). The subprocess tests keep the command line's contract."""
    from gptft.run import train
    from gptft.search import compose

    def run(*overrides: str, out: Path | None = None, callbacks: tuple = ()) -> dict:
        out = out or tmp_path_factory.mktemp("here") / "run"
        saved = os.environ.get("GPTFT_DATA_DIR")
        os.environ["GPTFT_DATA_DIR"] = str(data_dir)
        try:
            return train(compose(list(overrides), output_dir=out), callbacks)
        finally:
            if saved is None:
                os.environ.pop("GPTFT_DATA_DIR")
            else:
                os.environ["GPTFT_DATA_DIR"] = saved

    return run


@pytest.fixture(scope="session")
def book_text() -> str:
    from gptft.text import load_book_text

    return load_book_text(829)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with the real vocabulary, saved with save_pretrained (weights + tokenizer files)."""
    import torch

    from gptft.models import build_model, export_hf_model

    torch.manual_seed(0)
    model = build_model(
        arch={"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256}
    )
    return export_hf_model(model, tmp_path_factory.mktemp("tiny") / "hf_model")
