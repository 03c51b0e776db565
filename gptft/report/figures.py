"""The report's figures (matplotlib, headless). Every plot of gptft lives here."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from gptft.report.collect import Run  # noqa: E402

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def loss_figure(runs: list[Run], curves: dict[str, tuple[list[int], list[float]]]) -> Figure | None:
    """All runs' train loss on one axis; a marker on every 7th point, one marker shape per run."""
    drawn = [(i, r) for i, r in enumerate(runs) if curves.get(r.label, ([], []))[0]]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, run in drawn:
        steps, losses = curves[run.label]
        ax.plot(
            steps,
            losses,
            marker=MARKERS[i % len(MARKERS)],
            markevery=7,
            markersize=5,
            lw=1.2,
            label=run.label,
        )
    ax.set(xlabel="step", ylabel="train loss", title="Train loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def before_after_figure(runs: list[Run], measure: str, ylabel: str) -> Figure | None:
    """Grouped bars, before and after training, per run; error bars are the std over generation seeds."""
    shown = [r for r in runs if r.measure("before", measure) or r.measure("after", measure)]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(shown) + 2), 4.5))
    width = 0.38
    for offset, when, color in ((-width / 2, "before", "#9aa5b1"), (width / 2, "after", "#1f77b4")):
        values = [r.measure(when, measure) or {"mean": float("nan"), "std": 0.0} for r in shown]
        xs = [i + offset for i in range(len(shown))]
        ax.bar(
            xs,
            [v["mean"] for v in values],
            width,
            yerr=[v["std"] for v in values],
            capsize=4,
            color=color,
            label=when,
        )
    ax.set_xticks(range(len(shown)), [r.label for r in shown], rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title("before and after training (mean ± std over generation seeds)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()
