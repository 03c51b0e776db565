"""Benchmark 5, memory: peak resident memory of whole gptft runs, each in a fresh process.

Run by hand (`make bench`). Each variant is `python -m gptft.run ...` as a user types it (CPU, the defaults:
bf16-mixed here, chunked loss, fused AdamW); its peak is the process's RSS high-water mark (ru_maxrss from
os.wait4, so nothing of this process or of other variants counts). A peak covers everything a run holds:
Python and torch themselves, the book, the model, AdamW state, the training step, validation and the probes.
Prints a table and writes outputs/benchmarks/memory.json.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from gptft.utils.io import atomic_write_json

SHORT = ("trainer.val_check_interval=1000", "eval.repeats=1", "eval.free_prompts=2", "data.val_windows=4")
VARIANTS = {
    "quickstart (small, batch 8 × 128), 10 steps": (
        "experiment=quickstart",
        "trainer.max_steps=10",
        "trainer.val_check_interval=10",
        "callbacks.checkpoint.every_n_train_steps=10",
    ),
    "small, batch 32 × 128, 3 steps": (
        "experiment=quickstart",
        "data.batch_size=32",
        "trainer.max_steps=3",
        *SHORT,
    ),
    "small, batch 32 × 128, 3 steps, gradient checkpointing": (
        "experiment=quickstart",
        "data.batch_size=32",
        "trainer.max_steps=3",
        "model.gradient_checkpointing=true",
        *SHORT,
    ),
    "tiny, batch 16 × 256, 3 steps": ("model=tiny", "data.batch_size=16", "trainer.max_steps=3", *SHORT),
    "tiny, batch 16 × 256, 3 steps, gradient checkpointing": (
        "model=tiny",
        "data.batch_size=16",
        "trainer.max_steps=3",
        "model.gradient_checkpointing=true",
        *SHORT,
    ),
}


def peak_rss_mb(overrides: tuple[str, ...]) -> float:
    """Run gptft in a fresh process; its peak RSS in MB."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "MPLBACKEND": "Agg"}
    with tempfile.TemporaryDirectory() as out, open(Path(out) / "log.txt", "w") as log:
        cmd = [sys.executable, "-m", "gptft.run", *overrides, f"hydra.run.dir={out}/run"]
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{(Path(out) / 'log.txt').read_text()[-3000:]}")
    return usage.ru_maxrss / 1024  # Linux reports KB


def main() -> None:
    peaks = {}
    for name, overrides in VARIANTS.items():
        peaks[name] = peak_rss_mb(overrides)
        print(f"{name}: {peaks[name]:.0f} MB", flush=True)
    print(f"\n{'run (CPU, defaults)':<58}{'peak RSS MB':>12}")
    for name, mb in peaks.items():
        print(f"{name:<58}{mb:>12.0f}")
    for size in ("small, batch 32 × 128, 3 steps", "tiny, batch 16 × 256, 3 steps"):
        saved = peaks[size] - peaks[f"{size}, gradient checkpointing"]
        print(f"gradient checkpointing saves {saved:.0f} MB on '{size}'")
    overrides = {k: list(v) for k, v in VARIANTS.items()}
    atomic_write_json("outputs/benchmarks/memory.json", {"peak_rss_mb": peaks, "overrides": overrides})


if __name__ == "__main__":
    main()
