"""The shape every before/after measure shares: once before the first step, once after the last."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


class BeforeAfter(L.Callback):
    """Calls `probe("before", ...)` at the start of a new run (a resumed run already has its "before", in
    metrics.json) and `probe("after", ...)` at the end; `metrics()` gives what `probe` kept in `results`, and under
    "probes" its class name with the seconds each probe took and the settings it ran with.

    A resumed run's after probe compares with a before probe from the first segment: the checkpoint carries that
    probe's seconds and `settings()`, and where the resume changed them (resume=... eval.repeats=1) the run says
    in its log and metrics.json ("comparable": false) that before and after cannot be compared.
    """

    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}
        self.seconds: dict[str, float] = {}
        self.used: dict[str, dict[str, Any]] = {}  # settings() at each probe

    def probe(self, when: str, trainer: L.Trainer, task: L.LightningModule) -> Any:
        raise NotImplementedError

    def prepare(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        """Work a probe needs first (reading a text); timed with the probe."""

    def settings(self, trainer: L.Trainer) -> dict[str, Any]:
        """What the numbers depend on besides the model, named as the config names it: before and after compare
        only under the same settings."""
        return {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            self._timed("before", trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._timed("after", trainer, pl_module)

    def _timed(self, when: str, trainer: L.Trainer, task: L.LightningModule) -> None:
        start = time.perf_counter()
        # Eager under model.compile: a probe runs twice, on shapes and dtypes of its own (the forgetting probe's
        # fp32 windows, exact match's questions), so compiling it costs more than it saves: 13-22 s of a tiny
        # run's probes with aot_eager on a CPU, and inductor builds kernels for each graph.
        with torch.compiler.set_stance("force_eager"):
            self.prepare(trainer, task)
            self.probe(when, trainer, task)
        self.seconds[when] = round(time.perf_counter() - start, 3)
        self.used[when] = self.settings(trainer)
        if when == "after" and not self._comparable() and trainer.is_global_zero:
            changed = {k for k in self.used["before"].keys() | self.used["after"].keys() if not self._same(k)}
            log.warning(
                "%s: before and after are not comparable: the before probe ran with %s, the after probe with %s "
                "(a resume changed them; resume with the same settings to compare)",
                type(self).__name__,
                ", ".join(f"{k}={self.used['before'].get(k)}" for k in sorted(changed)),
                ", ".join(f"{k}={self.used['after'].get(k)}" for k in sorted(changed)),
            )

    def _same(self, key: str) -> bool:
        return self.used["before"].get(key) == self.used["after"].get(key)

    def _comparable(self) -> bool | None:
        if "before" not in self.used or "after" not in self.used:
            return None
        return all(self._same(k) for k in self.used["before"].keys() | self.used["after"].keys())

    def metrics(self) -> dict[str, Any]:
        record: dict[str, Any] = {f"{when}_s": self.seconds.get(when) for when in ("before", "after")}
        record |= {f"settings_{when}": settings for when, settings in self.used.items()}
        if (comparable := self._comparable()) is not None:
            record["comparable"] = comparable
        return {**self.results, "probes": {type(self).__name__: record}}

    # The before probe's seconds and settings travel in the checkpoint: a resumed run compares with them.
    def state_dict(self) -> dict[str, Any]:
        return {"seconds": dict(self.seconds), "used": dict(self.used)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seconds = dict(state_dict.get("seconds", {}))
        self.used = dict(state_dict.get("used", {}))
