"""Reports of one run or a whole sweep: figures, a summary table, and the same in TensorBoard.

`python -m gptft.report DIR` writes DIR/report/ for any run or sweep folder; a Hydra callback
(`gptft.report.sweep.SweepReport`) does the same when a multirun ends. The names below load on first use: a run
imports this package for its small helpers without paying for matplotlib.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SweepReport", "write_report"]


def __getattr__(name: str) -> Any:
    if name == "SweepReport":
        from gptft.report.sweep import SweepReport

        return SweepReport
    if name == "write_report":
        from gptft.report.write import write_report

        return write_report
    raise AttributeError(f"module 'gptft.report' has no attribute {name!r}")
