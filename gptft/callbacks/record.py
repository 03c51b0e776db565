"""metrics.json: the settings, the before/after numbers, the timings and the status of one run."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gptft.errors import StoppedEarly
from gptft.utils.io import atomic_write_json

log = logging.getLogger(__name__)


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

    Train losses are kept as detached tensors and read once at the end, so recording adds no device sync
    to the training step.
    """

    def __init__(self, path: str | Path, config: dict[str, Any] | None = None, resume: bool = False):
        self.path = Path(path)
        # A resumed run keeps what the run before it measured (its "before" probe, its first loss).
        previous = json.loads(self.path.read_text()) if resume and self.path.is_file() else {}
        self.data: dict[str, Any] = {**previous, "status": "created", "config": config or {}}
        self._losses: list[torch.Tensor] = []
        self._batch_sums: list[torch.Tensor] = []
        self._batch_times: list[float] = []
        self._t_batch = 0.0
        self._tokens = 0
        self._t_fit = self._t_first = self._t_last = 0.0
        self._t_val_start = 0.0
        self._val_time = 0.0

    def write(self) -> None:
        atomic_write_json(self.path, self.data)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_fit = time.perf_counter()
        params = list(pl_module.parameters())
        self.data.update(
            status="running",
            params={
                "total": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
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
        if not self._t_first:
            self._t_first = time.perf_counter()
            self._gather_and_write(trainer)  # the "before" probe survives a crash
        self._t_batch = self._clock(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._losses.append(loss.detach())
        self._batch_sums.append(batch[0].sum())  # a fingerprint of what was trained on, no sync
        self._tokens += batch[0].numel()
        self._t_last = self._clock(pl_module)
        self._batch_times.append(self._t_last - self._t_batch)

    @staticmethod
    def _clock(pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()  # CUDA runs ahead of Python: time the work, not its launch
        return time.perf_counter()

    # Periodic validation runs inside the training span; its time is not training time.
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._t_first:
            self._val_time += time.perf_counter() - self._t_val_start
            self.data["steps"] = trainer.global_step
            self._gather_and_write(trainer)  # progress on disk at every validation

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._summarise(trainer)

    def _summarise(self, trainer: L.Trainer) -> None:
        """The train losses, step count, timings and data fingerprint so far (at the end, or at a stop)."""
        if self._losses:
            losses = torch.stack(self._losses).float().cpu()
            first = self.data.get("train", {}).get("loss_first", losses[0].item())
            self.data["train"] = {
                "loss_first": first,
                "loss_last": losses[-1].item(),
                "loss_last10_mean": losses[-10:].mean().item(),
            }
        train_s = max(self._t_last - self._t_first - self._val_time, 1e-9)
        self.data["steps"] = trainer.global_step
        self.data["tokens_trained"] = self._tokens
        self.data["time"] = {
            "train_s": round(train_s, 3),
            "val_s": round(self._val_time, 3),
            "step_s": round(train_s / max(1, len(self._losses)), 4),
            "median_step_s": round(statistics.median(self._batch_times), 4) if self._batch_times else None,
            "tokens_per_s": round(self._tokens / train_s, 1),
        }
        if self._batch_sums:
            sums = torch.stack(self._batch_sums).cpu().tolist()
            self.data["data_fingerprint"] = hashlib.blake2b(str(sums).encode(), digest_size=8).hexdigest()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.data.setdefault("time", {})["fit_s"] = round(time.perf_counter() - self._t_fit, 3)
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
            log.info("metrics: %s", self.path)

    def _gather_and_write(self, trainer: L.Trainer) -> None:
        for callback in trainer.callbacks:
            if callback is not self and hasattr(callback, "metrics"):
                merge_into(self.data, callback.metrics())
        if trainer.is_global_zero:
            self.write()


def merge_into(target: dict[str, Any], new: dict[str, Any]) -> None:
    """Merge `new` into `target` key by key, recursing into dicts both hold: several callbacks can each add
    their own measures under "before" and "after"."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_into(target[key], value)
        else:
            target[key] = value
