"""Overhead of the weight-change tracker: step time with and without WeightDelta (all attention weights).

Run by hand (`make bench`): the tiny GPT-2 (2 layers, d 64) on Gulliver windows, batch 8 × 256, the same
batches for both variants, interleaved repeats, medians. Prints a table and writes
outputs/benchmarks/weight_delta.json.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from gptft.callbacks import RunRecord, WeightDelta
from gptft.data import BookWindows
from gptft.models import build_model
from gptft.tasks import CausalLM
from gptft.utils.io import atomic_write_json
from gptft.utils.logs import quiet_lightning

TINY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256}
STEPS, REPEATS = 20, 3


def median_step(track: bool, data: BookWindows, folder: Path) -> float:
    torch.manual_seed(0)
    task = CausalLM(build_model(arch=TINY), {"lr": 1e-3, "weight_decay": 0.01}, {"name": "constant"})
    record = RunRecord(folder / "metrics.json")
    callbacks = [record] + ([WeightDelta(str(folder), ["*.attn.*weight"])] if track else [])
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        logger=TensorBoardLogger(str(folder), name="tb"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=1,
    )
    trainer.fit(task, datamodule=data)
    return record.data["time"]["median_step_s"]


def tracker_work_s(model: torch.nn.Module, calls: int = 200) -> float:
    """The tracker's own work per step (sub, norm, copy over all tracked matrices), timed alone."""
    import time

    tracker = WeightDelta(tempfile.gettempdir(), ["*.attn.*weight"])
    tracker.track(model)
    start = time.perf_counter()
    for _ in range(calls):
        tracker.step_norms()
    return (time.perf_counter() - start) / calls


def main() -> None:
    quiet_lightning()
    data = BookWindows(seq_len=256, batch_size=8)
    data.setup("fit")
    times: dict[str, list[float]] = {"without tracker": [], "with tracker": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(REPEATS):
            for track, name in ((False, "without tracker"), (True, "with tracker")):
                times[name].append(median_step(track, data, Path(tmp) / f"{name}-{repeat}"))
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["with tracker"] / medians["without tracker"]
    print(f"{'variant':<18}{'median step s':>15}   repeats")
    for name, values in times.items():
        print(f"{name:<18}{medians[name]:>15.4f}   {', '.join(f'{v:.4f}' for v in values)}")
    print(
        f"overhead in the fit: {100 * (ratio - 1):+.1f}% of step time (target ≤ 5%; the noise here is ±10%)"
    )
    work = tracker_work_s(build_model(arch=TINY))
    share = work / medians["without tracker"]
    print(f"tracker work alone: {1e3 * work:.3f} ms per step = {100 * share:.2f}% of the median step")
    atomic_write_json(
        "outputs/benchmarks/weight_delta.json",
        {
            "steps": STEPS,
            "repeats": times,
            "medians": medians,
            "ratio": ratio,
            "work_s": work,
            "work_share": share,
        },
    )


if __name__ == "__main__":
    main()
