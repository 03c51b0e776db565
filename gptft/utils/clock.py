"""The one clock of training-time measurements."""

from __future__ import annotations

import time

import torch


def device_clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done: CUDA runs ahead of Python, so time the work, not
    its launch (one synchronize; on a CPU there is nothing to wait for)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
