"""Console hygiene: one line per message under Hydra's logging, no advertising, no known-harmless noise."""

from __future__ import annotations

import logging
import warnings


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in str(record.msg)


def quiet_lightning() -> None:
    """Let Lightning's records reach Hydra's handlers once (it adds its own console handler too)."""
    import lightning  # noqa: F401  (its import installs the handler we remove)

    logging.getLogger("lightning").handlers.clear()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # The training loader is an IterableDataset with a length, read in the main process (no workers).
    warnings.filterwarnings("ignore", message=r".*IterableDataset. has .__len__. defined.*")
