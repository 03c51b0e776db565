"""Stop a run safely: on Ctrl-C or SIGTERM at the end of the step, with a checkpoint; on a non-finite loss at
once, before the bad weights reach a checkpoint."""

from __future__ import annotations

import logging
import math
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch

from gptft.errors import Diverged, Interrupted

log = logging.getLogger(__name__)


class SafeStop(L.Callback):
    """Watches every training step for a stop request and for a loss that is nan or inf.

    - Ctrl-C (SIGINT) or SIGTERM: the step in progress finishes, `last.ckpt` is written, and the run ends with
      `Interrupted` (metrics.json says "interrupted"; gptft.run prints the command that resumes). A second
      Ctrl-C stops at once, as usual.
    - A non-finite loss: the run ends with `Diverged`, naming the first bad step. The check runs before any
      checkpoint is written (and Lightning runs checkpoint callbacks after all others), so bad weights never
      reach `last.ckpt`: it keeps the last good ones.

    It must be the last callback before the checkpoint callbacks: its stop checkpoint then holds what every other
    callback recorded of the step (RunRecord's losses and tokens, the weight-change rows).

    The loss is judged on the device (no sync); its verdict is read every step on the CPU and under DDP (where
    the ranks must agree through one small all-reduce per step anyway), else every `check_every_n_steps`
    steps, before every checkpoint and at the end, so a GPU never waits for it.
    """

    def __init__(self, check_every_n_steps: int = 10) -> None:
        self.check_every_n_steps = check_every_n_steps
        self._signal: str | None = None
        self._previous: dict[int, Any] | None = None  # the handlers put back at teardown
        self._first_bad: torch.Tensor | None = None  # step of the first non-finite loss, -1 while none
        self._bad_loss: torch.Tensor | None = None
        self._flush_due = False  # a checkpoint was written since the loggers last flushed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_bad = torch.tensor(-1, device=pl_module.device)
        self._bad_loss = torch.tensor(0.0, device=pl_module.device)
        # Signals can only be caught in the main thread (a notebook cell may run elsewhere).
        if threading.current_thread() is threading.main_thread():
            # SIGTERM too, in place of Lightning's handler: Lightning stops after the step's checkpoint callbacks
            # (or inside a validation) where the signal lands after this callback looked, without a checkpoint
            # of the step. Under DDP every rank learns of a stop through the all-reduce of each step.
            self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signal = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
            log.warning("Ctrl-C: stopping at the end of this step (press Ctrl-C again to stop now)")
        else:
            log.warning("SIGTERM: stopping at the end of this step")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = (outputs["loss"] if isinstance(outputs, dict) else outputs).detach().float()
        new = ~torch.isfinite(loss) & (self._first_bad < 0)
        self._first_bad = torch.where(new, trainer.global_step, self._first_bad)
        self._bad_loss = torch.where(new, loss, self._bad_loss)
        # Lightning's note of a SIGTERM that came before training (while the "before" probes ran) counts too. Stop
        # only after an optimizer step, never between the micro-batches of one (trainer.accumulate_grad_batches).
        requested = self._signal is not None or bool(getattr(trainer, "received_sigterm", False))
        stop = requested and (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        distributed = trainer.world_size > 1
        if distributed:
            flag = torch.tensor(float(stop), device=loss.device)
            stop = bool(trainer.strategy.reduce(flag, reduce_op="max").item())
        if (
            stop
            or distributed
            or loss.device.type == "cpu"
            or trainer.global_step % self.check_every_n_steps == 0
        ):
            self._check(trainer)
        if stop:
            self._interrupted(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._check(trainer)  # raising here aborts the write: last.ckpt keeps the last good weights
        self._flush_due = True

    # Lightning logs a step's scalars after its on_train_batch_end, where checkpoints are written: flush the
    # curves at the next hook instead, so what a kill loses is what the resumed run logs again.
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._flush_loggers(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush_loggers(trainer)

    def _flush_loggers(self, trainer: L.Trainer) -> None:
        if self._flush_due:
            self._flush_due = False
            for logger in trainer.loggers:
                logger.save()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The step loader's one epoch ends with the last step, before any on_train_end: the "after" probes and
        # the export never see diverged weights.
        self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        if self._first_bad is None:
            return
        first_bad = self._first_bad
        if trainer.world_size > 1:
            first_bad = trainer.strategy.reduce(first_bad.float(), reduce_op="max")
        step = int(first_bad.item())
        if step < 0:
            return
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else math.nan
        last = self._last_checkpoint(trainer)
        good = last if last is not None and last.is_file() else None
        kept = f"{good} is from before it" if good else "no checkpoint was written before it"
        raise Diverged(
            f"train/loss is {self._bad_loss.item()} at step {step} (lr {lr:.3g}): the run diverged; "
            f"lower optim.lr or add optim.warmup_steps; {kept}",
            str(good) if good else None,
        )

    def _last_checkpoint(self, trainer: L.Trainer) -> Path | None:
        cb = trainer.checkpoint_callback
        if cb is None or cb.dirpath is None:
            return None
        return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"

    def _interrupted(self, trainer: L.Trainer) -> None:
        why = self._signal or "SIGTERM"
        last = self._last_checkpoint(trainer)
        if last is not None:
            trainer.save_checkpoint(last)  # every rank calls it; the strategy writes on rank 0
        raise Interrupted(
            f"{why}: stopped after step {trainer.global_step}"
            + (f", checkpoint {last}" if last is not None else " (no checkpoint callback: nothing saved)"),
            str(last) if last is not None else None,
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            # Only where this callback's handler is still in place: Lightning puts back the handlers it found before
            # the callbacks' teardown runs, and restoring the Lightning handler replaced here would leave it
            # installed after the run (in a process that goes on: a search's trials, a notebook).
            for signum, handler in self._previous.items():
                if signal.getsignal(signum) == self._on_signal:
                    signal.signal(signum, handler)
            self._previous = None
