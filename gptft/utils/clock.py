"""The one clock of training-time measurements.

Two ways to read it. `device_clock` waits for the device and returns the time (one CUDA synchronize): for the ends
of a measurement read at once (a throughput window). `mark` does not wait: on CUDA it records an event on the
current stream, whose time is when the GPU reaches it, so a mark per training step costs no synchronisation
(eager GPT-2 124M is launch-bound on a GPU: a sync per step stalls the launch queue every step); `seconds` reads
the span between two marks later, waiting only for the second.
"""

from __future__ import annotations

import time

import torch

Mark = float | torch.cuda.Event


def device_clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done: CUDA runs ahead of Python, so time the work, not
    its launch (one synchronize; on a CPU there is nothing to wait for)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def mark(device: torch.device) -> Mark:
    """A timestamp of the device's work queued so far, taken without waiting for it: a CUDA event recorded on the
    device's current stream, elsewhere perf_counter (a CPU runs what Python asks when asked)."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event
    return time.perf_counter()


def seconds(start: Mark, end: Mark) -> float:
    """Seconds from `start` to `end` (two marks of one device); on CUDA this waits for `end` to be reached."""
    if isinstance(end, torch.cuda.Event):
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return end - start
