"""Throughput and model FLOPs utilisation over windows of training steps.

RunRecord times the whole run (metrics.json `time`: mean and median step, tokens/s, the one tokens-per-second
figure of metrics.json); this monitor adds the rolling view: every `window` training batches it logs
perf/tokens_per_s, perf/samples_per_s and, when the device's peak is given, perf/mfu to TensorBoard, and
metrics.json `perf` gets the median MFU over the windows (the steady state: the first window, with compilation
and warm-up, is left out when there are more). Tokens are counted as RunRecord counts them: over all ranks,
those that carry a label.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

import lightning as L
import torch

from gptft.models.flops import dense_peak, model_flops_per_token
from gptft.tasks.freezing import trained_numel
from gptft.utils.clock import device_clock

log = logging.getLogger(__name__)


def _matmul_dtype(precision: str) -> torch.dtype:
    """The dtype of the matrix products under a Lightning precision ("bf16-mixed", "16-mixed", "32-true", ...)."""
    if "bf16" in precision:
        return torch.bfloat16
    return torch.float16 if precision.startswith("16") else torch.float32


class Throughput(L.Callback):
    """tokens/s and samples/s of the whole job (all ranks) and MFU per device, over windows of batches.

    `peak_flops` is one device's peak for the precision trained in (dense, no sparsity), e.g. 989e12 for an
    H100 SXM in bf16, 312e12 for an A100; None (the default): a known GPU's datasheet figure
    (gptft.models.flops.dense_peak), and no MFU on a CPU or an unknown chip. Nothing here syncs the device inside a
    step: only batch shapes are read per step, and the clock is read (after one CUDA synchronize) at the
    window's ends.
    """

    def __init__(self, window: int = 10, peak_flops: float | None = None):
        self.window, self.peak_flops = max(1, int(window)), float(peak_flops) if peak_flops else None
        self.flops_per_token = 0.0  # of the latest batch's length (instruction batches vary)
        self._dense = self._per_position = 0.0
        self.rows: list[dict[str, float]] = []
        self._t0 = self._flops = 0.0
        self._batches = self._tokens = self._samples = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Counted here, after freezing and before a strategy wraps (FSDP shards) the parameters. FLOPs per token
        # are linear in the context T, so two counts give them at every T.
        self._dense = model_flops_per_token(pl_module.model, 0, trained_numel)
        self._per_position = model_flops_per_token(pl_module.model, 1, trained_numel) - self._dense
        if self.peak_flops is None and pl_module.device.type == "cuda":
            self.peak_flops, source = dense_peak(pl_module.device, _matmul_dtype(str(trainer.precision)))
            log.info("MFU against a peak of %s FLOP/s (%s)", self.peak_flops or "no known", source)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restart(pl_module)  # after the "before" probes (an earlier callback), so they are not timed

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        x, _, step_tokens = batch[:3]
        self.flops_per_token = self._dense + self._per_position * x.size(1)
        self._flops += self.flops_per_token * x.numel()  # the work this rank did, padding included
        self._batches += 1
        self._samples += x.size(0) * trainer.world_size
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self._tokens += step_tokens  # the step's labelled tokens, all ranks: counted once per step
        # The last step closes its window here: on_train_end comes after the "after" probes.
        if self._batches >= self.window or trainer.global_step >= trainer.max_steps:
            self._close(trainer, pl_module, log=True)

    # Validation inside the training span is not training time: a window ends before it and restarts after.
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._batches:
            self._close(trainer, pl_module, log=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restart(pl_module)

    def metrics(self) -> dict[str, Any]:
        if not self.rows:
            return {}
        full = [r for r in self.rows if r["batches"] >= self.window] or self.rows
        steady = full[1:] if len(full) > 1 else full
        perf: dict[str, Any] = dict(
            windows=len(self.rows),
            window_batches=self.window,
            flops_per_token=self.flops_per_token,
            peak_flops=self.peak_flops,
        )
        if self.peak_flops:
            perf["mfu"] = round(statistics.median(r["mfu"] for r in steady), 6)
        return {"perf": perf}

    def _restart(self, pl_module: L.LightningModule) -> None:
        self._t0 = device_clock(pl_module.device)
        self._batches = self._tokens = self._samples = 0
        self._flops = 0.0

    def _close(self, trainer: L.Trainer, pl_module: L.LightningModule, log: bool) -> None:
        seconds = max(device_clock(pl_module.device) - self._t0, 1e-9)
        row = {
            "batches": self._batches,
            "tokens_per_s": self._tokens / seconds,
            "samples_per_s": self._samples / seconds,
        }
        if self.peak_flops:
            row["mfu"] = self._flops / seconds / self.peak_flops  # this rank's work on this rank's device
        self.rows.append(row)
        if log:
            values = {f"perf/{k}": v for k, v in row.items() if k in ("tokens_per_s", "samples_per_s", "mfu")}
            for logger in trainer.loggers:  # at the index Lightning gives this batch's train/loss
                logger.log_metrics(values, step=max(trainer.global_step - 1, 0))
        self._restart(pl_module)
