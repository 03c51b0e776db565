"""Peak memory of the training steps: what a method (full fine-tuning, freezing, LoRA) costs in memory."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _peak_rss_mb() -> float:
    """The process's peak resident memory: VmHWM (Linux, resettable), else ru_maxrss."""
    if _STATUS.is_file():
        return int(re.search(r"VmHWM:\s+(\d+)", _STATUS.read_text()).group(1)) / 1024
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _reset_rss_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux); False where the peak cannot be reset."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PeakMemory(L.Callback):
    """The highest memory any training step reached, in MB, into metrics.json under "memory".

    On a GPU: `torch.cuda.max_memory_allocated`, its peak reset before every step (an allocator counter read
    on the host: no sync). On a CPU: the process's peak resident memory (VmHWM), reset before every step where
    Linux allows, else the whole process's peak (`resource.getrusage`). The reset leaves out the probes and
    validation, which keep full-vocabulary logits and would hide the difference between training methods.
    """

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self.measure = ""
        self._resettable = True

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
            peak = _peak_rss_mb()
            self.measure = "peak_rss_per_step" if self._resettable else "peak_rss_process"
        self.peak_mb = max(self.peak_mb, peak)

    def metrics(self) -> dict[str, Any]:
        if not self.measure:
            return {}
        return {"memory": {"train_peak_mb": round(self.peak_mb, 1), "measure": self.measure}}
