"""metrics.json: the settings, the before/after numbers, the timings and the status of one run."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gptft.errors import StoppedEarly
from gptft.utils.clock import Mark, mark, seconds
from gptft.utils.io import atomic_write_json

log = logging.getLogger(__name__)


@runtime_checkable
class Measures(Protocol):
    """A callback that measures: RunRecord merges what `metrics()` returns into metrics.json (key by key, so
    several callbacks may each add measures under "before" and "after")."""

    def metrics(self) -> dict[str, Any]: ...


def status_of(exception: BaseException) -> str:
    """metrics.json's status for a run that ended with `exception`."""
    if isinstance(exception, StoppedEarly):
        return exception.status
    if isinstance(exception, KeyboardInterrupt | SIGTERMException):
        return "interrupted"
    return "failed"


class RunRecord(L.Callback):
    """Keeps metrics.json current: "running" at fit start, then "completed", "interrupted", "diverged" or
    "failed".

    What it measures (train losses, step times, labelled tokens, the batches' fingerprint, train/validation/fit
    time) is part of every checkpoint (Lightning's callback state), so a run stopped and resumed any number of
    times reports the same numbers as one that ran straight through (its timings aside). Within a segment, step
    losses are kept as detached device tensors and step ends as clock marks (CUDA events), read at a validation,
    a checkpoint or the end: recording adds no device sync to the training step.
    """

    def __init__(self, path: str | Path, config: dict[str, Any] | None = None, resume: bool = False):
        self.path = Path(path)
        # A resumed run keeps what the run before it measured (its "before" probe, its settings' record).
        previous = json.loads(self.path.read_text()) if resume and self.path.is_file() else {}
        previous.pop("error", None)  # how the last segment stopped: this one ends with its own status
        self.data: dict[str, Any] = {**previous, "status": "created", "config": config or {}}
        # Measured in earlier segments of this run (restored from the checkpoint) and in this one so far.
        self._state: dict[str, Any] = {
            "losses": [], "step_digests": [], "step_s": [], "tokens": 0, "train_s": 0.0, "val_s": 0.0, "fit_s": 0.0,
        }  # fmt: skip
        self._losses: list[torch.Tensor] = []  # this segment's step losses, not yet read from the device
        self._last_step = -1
        self._t_fit = self._t_val_start = 0.0
        # This segment's first step start, latest step end and current step start, and the (start, end) marks of
        # the steps not yet read: gptft.utils.clock marks, which wait for nothing.
        self._t_first: Mark | None = None
        self._t_last: Mark | None = None
        self._t_step: Mark | None = None
        self._steps: list[tuple[Mark, Mark]] = []
        self._val_s = 0.0

    def write(self) -> None:
        atomic_write_json(self.path, self.data)

    # -- what a checkpoint carries

    def state_dict(self) -> dict[str, Any]:
        self._settle()
        return {**self._state, "fit_s": self._fit_s(), "train_s": self._train_s(), "val_s": self._val_total()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state = {**self._state, **state_dict}

    def _settle(self) -> None:
        """Move this segment's device tensors and step marks into the plain lists a checkpoint holds (one sync)."""
        if self._losses:
            self._state["losses"] += torch.stack(self._losses).float().cpu().tolist()
            self._losses = []
        self._state["step_s"] += [seconds(start, end) for start, end in self._steps]
        self._steps = []

    def _train_s(self) -> float:
        if self._t_first is None or self._t_last is None:
            return self._state["train_s"]
        segment = seconds(self._t_first, self._t_last) - self._val_s
        return self._state["train_s"] + max(segment, 0.0)

    def _val_total(self) -> float:
        return self._state["val_s"] + self._val_s

    def _fit_s(self) -> float:
        return self._state["fit_s"] + (time.perf_counter() - self._t_fit if self._t_fit else 0.0)

    # -- hooks

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_fit = time.perf_counter()
        self._last_step = trainer.global_step
        from gptft.tasks.freezing import trained_numel  # freeze.qkv_parts trains only part of some tensors

        params = list(pl_module.parameters())
        # What the data measured at setup (InstructPairs: token lengths; BookWindows: the windows' starts), now
        # that the trainer's accumulation and ranks are known.
        self.data.update(getattr(trainer.datamodule, "metrics", dict)())
        self.data.update(
            status="running",
            params={
                "total": sum(p.numel() for p in params),
                "trainable": sum(trained_numel(p) for p in params),
            },
            device=str(trainer.strategy.root_device),
            precision=str(trainer.precision),
            versions={
                "python": platform.python_version(),
                "torch": torch.__version__,
                "lightning": L.__version__,
                "transformers": __import__("transformers").__version__,
            },
        )
        if trainer.is_global_zero:
            self.write()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._t_first is None:
            self._t_first = self._t_step = mark(pl_module.device)
            self._gather_and_write(trainer)  # the "before" probe survives a crash

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step:
            return  # a micro-batch inside an optimizer step (gradient accumulation)
        self._last_step = trainer.global_step
        self._losses.append(pl_module.step_loss)
        self._state["tokens"] += batch[2]  # labelled tokens of the whole step, all ranks (a plain int)
        self._state["step_digests"].append(batch[3])  # what the whole step trained on, however it was split
        self._t_last = mark(pl_module.device)
        self._steps.append((self._t_step, self._t_last))
        self._t_step = self._t_last

    # Periodic validation runs inside the training span; its time is not training time.
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._t_first is not None:
            self._val_s += time.perf_counter() - self._t_val_start
            self._t_step = mark(pl_module.device)  # the next step's time starts after validation
            self._settle()  # validation synced the device already: read the marks, hold no events for long
            self.data["steps"] = trainer.global_step
            self._gather_and_write(trainer)  # progress on disk at every validation

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._summarise(trainer)

    def _summarise(self, trainer: L.Trainer) -> None:
        """The train losses, step count, timings and data fingerprint so far (at the end, or at a stop)."""
        self._settle()
        losses, step_s = self._state["losses"], self._state["step_s"]
        if losses:
            self.data["train"] = {
                "loss_first": losses[0],
                "loss_last": losses[-1],
                "loss_last10_mean": statistics.fmean(losses[-10:]),
            }
        train_s = max(self._train_s(), 1e-9)
        self.data["steps"] = trainer.global_step
        self.data["tokens_trained"] = self._state["tokens"]
        self.data["time"] = {
            "train_s": round(train_s, 3),
            "val_s": round(self._val_total(), 3),
            "step_s": round(train_s / max(1, len(step_s)), 4),
            "median_step_s": round(statistics.median(step_s), 4) if step_s else None,
            # Over all ranks, counting the tokens that carry a label (padding and masked prompts do not).
            "tokens_per_s": round(self._state["tokens"] / train_s, 1),
        }
        if self._state["step_digests"]:
            digests = str(self._state["step_digests"]).encode()
            self.data["data_fingerprint"] = hashlib.blake2b(digests, digest_size=8).hexdigest()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.data.setdefault("time", {})["fit_s"] = round(self._fit_s(), 3)
        self.data["status"] = "completed"
        self._finish(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._summarise(trainer)
        self.data["status"] = status_of(exception)
        self.data["error"] = f"{type(exception).__name__}: {exception}"
        self._finish(trainer)

    def _finish(self, trainer: L.Trainer) -> None:
        self._gather_and_write(trainer)
        if trainer.is_global_zero:
            if "probes_s" in self.data.get("time", {}):
                log.info("%s", probes_line(self.data["time"], self.data["probes"]))
            log.info("metrics: %s", self.path)

    def _gather_and_write(self, trainer: L.Trainer) -> None:
        for callback in trainer.callbacks:
            if callback is not self and isinstance(callback, Measures):
                merge_into(self.data, callback.metrics())
        if self.data.get("probes") and "time" in self.data:  # the before/after probes' seconds, all of them
            seconds = [
                s for p in self.data["probes"].values() for s in (p.get("before_s"), p.get("after_s")) if s
            ]
            self.data["time"]["probes_s"] = round(sum(seconds), 3)
        if trainer.is_global_zero:
            self.write()


def probes_line(time_: dict[str, Any], probes: dict[str, dict[str, Any]]) -> str:
    """The run log's line on what the probes cost beside training."""
    each = ", ".join(
        f"{name} {p.get('before_s') or 0:.1f} + {p.get('after_s') or 0:.1f} s" for name, p in probes.items()
    )
    line = f"probes took {time_['probes_s']:.1f} s ({each}; before + after) beside {time_['train_s']:.1f} s of training"
    if time_.get("fit_s"):
        line += f": {100 * time_['probes_s'] / time_['fit_s']:.0f}% of the fit's {time_['fit_s']:.1f} s"
    return line


def merge_into(target: dict[str, Any], new: dict[str, Any]) -> None:
    """Merge `new` into `target` key by key, recursing into dicts both hold: several callbacks can each add
    their own measures under "before" and "after"."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_into(target[key], value)
        else:
            target[key] = value
