"""The shape every before/after measure shares: once before the first step, once after the last."""

from __future__ import annotations

from typing import Any

import lightning as L


class BeforeAfter(L.Callback):
    """Calls `probe("before", ...)` at the start of a new run (a resumed run already has its "before", in
    metrics.json) and `probe("after", ...)` at the end; `metrics()` gives what `probe` kept in `results`."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}

    def probe(self, when: str, trainer: L.Trainer, task: L.LightningModule) -> Any:
        raise NotImplementedError

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            self.probe("before", trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.probe("after", trainer, pl_module)

    def metrics(self) -> dict[str, Any]:
        return self.results
