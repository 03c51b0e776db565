"""Reports of one run or a whole sweep: figures, a summary table, and the same in TensorBoard.

`python -m gptft.report DIR` writes DIR/report/ for any run or sweep folder; a Hydra callback
(`SweepReport`) does the same when a multirun ends.
"""

from gptft.report.write import SweepReport, write_report

__all__ = ["SweepReport", "write_report"]
