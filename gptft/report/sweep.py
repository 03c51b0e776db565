"""The Hydra callback that ends every sweep with its report. Hydra builds it at the start of every run, so it
imports the report's code (and matplotlib) only when a multirun ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from gptft.errors import ConfigError

log = logging.getLogger(__name__)


class SweepReport(Callback):
    """Hydra callback: when a multirun ends, write the sweep's report into its folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from gptft.report.write import write_report

        folder = Path(str(config.hydra.sweep.dir))
        try:
            text = write_report(folder)
        except ConfigError as e:
            log.error("no sweep report: %s", e)
            return
        print(text)
        log.info("sweep report: %s", folder / "report")
