"""Peak memory of the training steps: what a method (full fine-tuning, freezing, LoRA) costs in memory."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch

from gptft.models.chunked_loss import release_logits_buffer

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB; None off Linux."""
    if not _STATUS.is_file():
        return None
    return int(re.search(rf"{field}:\s+(\d+)", _STATUS.read_text()).group(1)) / 1024


def _reset_rss_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux); False where the peak cannot be reset."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Give the memory earlier runs of this process freed back to the system (glibc keeps freed blocks in its
    heap; `malloc_trim` returns them), so this run's allocations show in its resident size again. The chunked
    loss's kept logits buffer goes too: each run counts the one it uses."""
    release_logits_buffer()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim, the rise may read low
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory(L.Callback):
    """The memory the training steps take, in MB, into metrics.json under "memory".

    On a GPU: `torch.cuda.max_memory_allocated` of the steps (weights, gradients, optimizer state, activations),
    its peak reset before every step (an allocator counter read on the host: no sync). On a CPU: how far the
    process's resident memory rose above what it held when training started (the loaded model and libraries),
    at its highest during a step: gradients, optimizer state, activations and logits. Resident memory is a
    process's, and a Hydra multirun trains every job in one process, so the process's own peak would grow job
    after job; the rise above each run's start is that run's own (freed memory is handed back before the start
    is read). The per-step reset leaves out the probes and validation, which keep full-vocabulary logits and would
    hide the difference between training methods.
    """

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self.measure = ""
        self._start_mb: float | None = None
        self._resettable = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type != "cuda":
            release_free_memory()
            self._start_mb = _status_mb("VmRSS")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        elif self._resettable:
            self._resettable = _reset_rss_peak()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if pl_module.device.type == "cuda":
            peak, self.measure = (
                torch.cuda.max_memory_allocated(pl_module.device) / 2**20,
                "cuda_max_allocated",
            )
        else:
            high = _status_mb("VmHWM")
            if high is None or self._start_mb is None:
                return  # not Linux: no resident-memory figures to read
            peak = high - self._start_mb
            self.measure = "rss_rise_per_step" if self._resettable else "rss_rise_process"
        self.peak_mb = max(self.peak_mb, peak)

    def metrics(self) -> dict[str, Any]:
        if not self.measure:
            return {}
        out = {"train_peak_mb": round(self.peak_mb, 1), "measure": self.measure}
        if self._start_mb is not None:
            out["start_mb"] = round(self._start_mb, 1)
        return {"memory": out}
