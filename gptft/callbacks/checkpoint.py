"""Checkpoints that end where training ends."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus `last.ckpt` at the final step whatever the interval.

    Lightning writes `last` at the end of training only when no periodic save happened before, so a 501-step
    run saving every 100 steps would end with last.ckpt at step 500, and `resume=<run> trainer.max_steps=...`
    would train step 501 again.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
