"""lengths.png of a question/answer run, drawn from the lengths.json its data module wrote."""

from __future__ import annotations

import json
from pathlib import Path

from gptft.utils.io import atomic_write_bytes


def write_lengths_figure(run_dir: str | Path) -> Path | None:
    """Draw <run_dir>/lengths.png (density histograms of question and answer tokens) from lengths.json, if the
    run has one; return its path."""
    source = Path(run_dir) / "lengths.json"
    if not source.is_file():
        return None
    lengths = json.loads(source.read_text())
    if "tokens" not in lengths:
        return None
    import matplotlib.pyplot as plt  # only now: a book run has no lengths and never pays for matplotlib

    from gptft.report.figures import length_histogram_figure, png_bytes
    fig = length_histogram_figure(lengths["tokens"], title=f"Token lengths: {lengths['source']} (train)")
    try:
        return atomic_write_bytes(source.with_name("lengths.png"), png_bytes(fig))
    finally:
        plt.close(fig)
