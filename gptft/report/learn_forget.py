"""Learning versus forgetting (Biderman et al., 2024, "LoRA Learns Less and Forgets Less"): one point per
method (a group of runs that differ only in their seed), what it learned on the training text against what it
forgot on the reference text, with what it cost (trainable parameters, step time, peak memory)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from matplotlib.figure import Figure

from gptft.report.replicates import Group
from gptft.report.stats import Spread, spread
from gptft.report.summary import markdown_table

LEARNING, FORGETTING, KL = "change.val_loss", "change.ref_loss", "after.ref_kl"


@dataclass
class Point:
    label: str
    learning: Spread  # drop of the held-out loss on the training text: before − after
    forgetting: Spread  # rise of the reference loss: after − before
    kl: Spread | None
    trainable: int | None
    step_s: Spread | None
    memory_mb: float | None
    memory_measure: str
    reference: str


def _spread_of(group: Group, measure: str, sign: float = 1.0) -> Spread | None:
    _, values = group.values(measure)
    return spread([sign * v for v in values]) if values else None


def points(groups: list[Group]) -> list[Point]:
    """A point per group whose runs measured both the held-out and the reference loss before and after."""
    out = []
    for group in groups:
        learning, forgetting = _spread_of(group, LEARNING, -1.0), _spread_of(group, FORGETTING)
        if learning is None or forgetting is None:
            continue
        runs = list(group.used.values())
        memory = [r.metrics["memory"] for r in runs if isinstance(r.metrics.get("memory"), dict)]
        reference = runs[0].metrics.get("reference", {}).get("texts", [])
        out.append(
            Point(
                label=group.label,
                learning=learning,
                forgetting=forgetting,
                kl=_spread_of(group, KL),
                trainable=runs[0].metrics.get("params", {}).get("trainable"),
                step_s=_spread_of(group, "time.median_step_s"),
                memory_mb=statistics.fmean(m["train_peak_mb"] for m in memory) if memory else None,
                memory_measure=memory[0].get("measure", "") if memory else "",
                reference="+".join(reference),
            )
        )
    return out


def _err(s: Spread | None) -> float:
    return 0.0 if s is None or s.half_width is None else s.half_width


def learn_forget_figure(groups: list[Group]) -> Figure | None:
    """Forgetting (reference-loss rise; KL to the starting model) against learning (held-out loss drop), one
    point per method; error bars are 95% intervals over training seeds when a method ran with several."""
    shown = points(groups)
    if not shown:
        return None
    import matplotlib.pyplot as plt

    from gptft.report.figures import MARKERS

    with_kl = [p for p in shown if p.kl is not None]
    panels = [("forgetting", "reference loss after − before"), ("kl", "KL(base ‖ tuned) per token")]
    panels = panels if with_kl else panels[:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6), squeeze=False)
    for ax, (attr, ylabel) in zip(axes[0], panels, strict=True):
        for i, p in enumerate(shown):
            y = getattr(p, attr)
            if y is None:
                continue
            ax.errorbar(
                p.learning.mean,
                y.mean,
                xerr=_err(p.learning),
                yerr=_err(y),
                fmt=MARKERS[i % len(MARKERS)],
                markersize=8,
                capsize=4,
                label=p.label,
            )
        if attr == "forgetting":
            ax.axhline(0, color="gray", lw=0.8, ls="--")
        ax.set(xlabel="learning: held-out loss before − after (training text)", ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_title("Forgetting: rise of the reference loss", fontsize=10)
    if with_kl:
        axes[0][1].set_title("Drift: KL to the starting model on the reference", fontsize=10)
    # One legend below the panels names the points (labels beside close points overlapped).
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(
        f"Learning versus forgetting on {book_title(shown[0].reference)}\n"
        "right: learns more; low: forgets less",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 4), 1, 1))
    return fig


# The books gptft's studies use, by the name the forgetting probe records (pg<Gutenberg id>).
TITLES = {"pg829": "Gulliver's Travels", "pg2701": "Moby Dick"}


def book_title(reference: str) -> str:
    """A reader's name for the reference text(s): "Moby Dick (Gutenberg 2701)" rather than "pg2701"."""
    if not reference:
        return "the reference text"
    names = []
    for name in reference.split("+"):
        number = name.removeprefix("pg")
        title = TITLES.get(name)
        names.append(f"{title} (Gutenberg {number})" if title else name)
    return " + ".join(names)


def _fmt(s: Spread | None, digits: int = 3) -> str:
    if s is None:
        return "–"
    return f"{s.mean:.{digits}g}" + (f" ± {s.half_width:.2g}" if s.half_width is not None else "")


def learn_forget_rows(groups: list[Group]) -> list[dict[str, str]]:
    rows = []
    for p in points(groups):
        rows.append(
            {
                "method": p.label,
                "seeds": str(p.learning.n),
                "trainable params": "–" if p.trainable is None else f"{p.trainable:,}",
                "learning: held-out loss drop": _fmt(p.learning),
                "forgetting: reference loss rise": _fmt(p.forgetting),
                "KL(base ‖ tuned)": _fmt(p.kl),
                "median step s": _fmt(p.step_s),
                "peak memory MB": "–" if p.memory_mb is None else f"{p.memory_mb:.0f}",
            }
        )
    return rows


def learn_forget_section(groups: list[Group]) -> list[str]:
    """The report's "Learning versus forgetting" section (Markdown lines); empty when no run has the probe."""
    rows = learn_forget_rows(groups)
    if not rows:
        return []
    shown = points(groups)
    measure = {
        "cuda_max_allocated": "torch.cuda.max_memory_allocated of the training steps",
        "rss_rise_per_step": "the rise of resident memory above the run's start during the training steps",
        "rss_rise_process": "the rise of the process's peak resident memory above the run's start",
    }.get(shown[0].memory_measure, "")
    lines = [
        "## Learning versus forgetting",
        "",
        markdown_table(rows),
        "",
        f"Learning: the drop of the held-out loss on the training text (before − after). Forgetting: the rise of "
        f"the loss on the reference text ({book_title(shown[0].reference)}, not trained on), after − before; KL: the mean "
        "per-token KL(starting model ‖ trained model) on its first windows."
        + (f" Peak memory: {measure}." if measure else "")
        + " With several training seeds, ± is the 95% interval of the mean.",
        "",
    ]
    return lines
