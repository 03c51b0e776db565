"""Checkpoints that end where training ends."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus `last.ckpt` at the final step whatever the interval.

    Lightning writes `last` at the end of training only when no periodic save happened before, so a 501-step
    run saving every 100 steps would end with last.ckpt at step 500, and `resume=<run> trainer.max_steps=...`
    would train step 501 again.
    """

    def __init__(self, *args: Any, enable_version_counter: bool = False, **kwargs: Any) -> None:
        # One last.ckpt per run: with Lightning's version counter, a resumed run whose last.ckpt was written by
        # SafeStop (not by this callback) would write last-v1.ckpt beside it.
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
