"""The report's figures (matplotlib, headless). Every plot of gptft lives here."""

from __future__ import annotations

import io
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from gptft.report.collect import Run, is_paired, repeat_std  # noqa: E402
from gptft.report.replicates import Group  # noqa: E402
from gptft.report.stats import spread  # noqa: E402

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def curve_style(i: int) -> dict:
    """The i-th curve's line and marker (markers tell curves apart in grey print too)."""
    return dict(marker=MARKERS[i % len(MARKERS)], markevery=7, markersize=5, lw=1.2)


def loss_figure(runs: list[Run]) -> Figure | None:
    """All runs' train loss on one axis; a marker on every 7th point, one marker shape per run."""
    drawn = [(i, r) for i, r in enumerate(runs) if r.loss_curve()[0]]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, run in drawn:
        steps, losses = run.loss_curve()
        name = "\n".join(textwrap.wrap(run.label, 40, break_on_hyphens=False))
        (line,) = ax.plot(steps, losses, **curve_style(i), label=f"{name} train" if name else "train")
        val_steps, val_losses = run.val_curve()
        if val_steps:  # the held-out loss at each validation and probe, in the same colour, dashed
            label = f"{name} held-out" if name else "held-out"
            ax.plot(val_steps, val_losses, ls="--", marker="o", ms=4, color=line.get_color(), label=label)
    ax.set(xlabel="step", ylabel="loss", title="Train loss (solid) and held-out loss (dashed)")
    _integer_steps(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves, never over them
    fig.tight_layout()
    return fig


def _integer_steps(ax: Axes) -> None:
    """Steps are whole numbers: no 2.5 on a short run's axis."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _bars(ax: Axes, xs: list[float], heights: list[float], width: float, yerr: list[float], **style) -> None:
    """Bars with an outline and their value on top: a 0 (a random model's style ratio) shows as a line and "0"."""
    bars = ax.bar(xs, heights, width, yerr=yerr, capsize=4, edgecolor="black", linewidth=0.6, **style)
    ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)


def _baseline(ax: Axes, values: list[float | None], measure: str) -> None:
    """The held-out text's own value of `measure` (the style ratio of real text), one dashed line per bar pair,
    or across the axis when every run shares it: the level a model writing like the book would reach."""
    if measure != "style_ratio" or not any(v is not None for v in values):
        return
    style = dict(color="#d62728", ls="--", lw=1.2)
    known = [v for v in values if v is not None]
    if all(abs(v - known[0]) < 1e-9 for v in known):
        ax.axhline(known[0], **style, label=f"held-out text itself ({known[0]:.3g})")
        return
    for i, v in enumerate(values):
        if v is not None:
            ax.hlines(v, i - 0.45, i + 0.45, **style, label="held-out text itself" if i == 0 else None)


def held_out_value(run: Run, measure: str) -> float | None:
    """The run's held-out text's own value of a probe measure (metrics.json "held_out_text"), if it has one."""
    value = run.metrics.get("held_out_text", {}).get(measure)
    return value if isinstance(value, (int, float)) else None


def before_after_figure(runs: list[Run], measure: str, ylabel: str) -> Figure | None:
    """Grouped bars, before and after training, per run; error bars are the std over generation seeds (none
    where one seed measured no spread)."""
    shown = [r for r in runs if r.measure("before", measure) or r.measure("after", measure)]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(shown) + 2), 4.5))
    width = 0.38
    for offset, when, color in ((-width / 2, "before", "#9aa5b1"), (width / 2, "after", "#1f77b4")):
        values = [r.measure(when, measure) or {"mean": float("nan"), "std": None} for r in shown]
        xs = [i + offset for i in range(len(shown))]
        stds = [repeat_std(v) for v in values]
        yerr = [float("nan") if std is None else std for std in stds]  # NaN: no error bar drawn
        _bars(ax, xs, [v["mean"] for v in values], width, yerr, color=color, label=when)
    _baseline(ax, [held_out_value(r, measure) for r in shown], measure)
    title = "before and after training (mean ± std over generation seeds)"
    return _finish_bars(fig, ax, [r.label for r in shown], ylabel, title, fontsize=10)


def _finish_bars(fig: Figure, ax: Axes, labels: list[str], ylabel: str, title: str, fontsize: int) -> Figure:
    # Long labels (a sweep job's overrides) wrap instead of running off the figure.
    labels = ["\n".join(textwrap.wrap(label, 32, break_on_hyphens=False)) or label for label in labels]
    ax.set_xticks(range(len(labels)), labels, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=fontsize)
    ax.grid(axis="y", alpha=0.3)
    low, high = ax.get_ylim()
    if low >= 0:  # a bar of height 0 sits just above the axis, its outline visible, with room for the values
        ax.set_ylim(-0.02 * high, 1.08 * high)
        ax.axhline(0, color="black", lw=0.8)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the bars, never over them
    fig.set_figwidth(fig.get_figwidth() + 2)  # the legend's room
    fig.tight_layout()
    return fig


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    # bbox_inches="tight": a legend beside the axes and long tick labels stay in the picture.
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def paired_loss_figure(runs: list[Run]) -> Figure | None:
    """Loss of run B against run A at the same steps, with y = x: points below the line are steps B did better."""
    if not is_paired(runs):
        return None
    (steps_a, loss_a), (steps_b, loss_b) = runs[0].loss_curve(), runs[1].loss_curve()
    at_b = dict(zip(steps_b, loss_b, strict=True))
    pairs = [(a, at_b[s]) for s, a in zip(steps_a, loss_a, strict=True) if s in at_b]
    if not pairs:
        return None
    xs, ys = zip(*pairs, strict=True)
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.scatter(xs, ys, s=10, alpha=0.6)
    low, high = min(xs + ys), max(xs + ys)
    ax.plot([low, high], [low, high], color="black", lw=1, label="y = x")
    ax.set(
        xlabel=f"train loss, A: {runs[0].label}",
        ylabel=f"train loss, B: {runs[1].label}",
        title="Loss B vs loss A, step by step",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def weight_delta_figure(runs: list[Run]) -> Figure | None:
    """‖W_t − W_{t−1}‖_F of every tracked weight per step, one panel per run, log scale (zeros: frozen)."""
    tables = [(r, r.weight_deltas()) for r in runs]
    tables = [(r, t) for r, t in tables if t]
    if not tables:
        return None
    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4.5), sharey=True, squeeze=False)
    for ax, (run, (steps, columns)) in zip(axes[0], tables, strict=True):
        cmap = plt.get_cmap("viridis", max(2, len(columns)))
        for i, (name, values) in enumerate(columns.items()):
            shown = [(s, v) for s, v in zip(steps, values, strict=True) if v > 0]
            if shown:
                ax.plot(*zip(*shown, strict=True), lw=0.8, color=cmap(i), label=name)
        ax.set_yscale("log")
        ax.set(xlabel="step", title=run.label)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("‖ΔW‖_F per step")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if len(labels) <= 12:
        axes[0][-1].legend(fontsize=6)
    fig.suptitle(
        "Weight change per step of the tracked weights (frozen ones are 0 and not drawn)", fontsize=10
    )
    fig.tight_layout()
    return fig


def length_histogram_figure(counts: dict[str, list[int]], title: str = "Token lengths") -> Figure:
    """Token counts per kind (questions, answers) as overlaid density histograms, bins of 10 over 0-400."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bins = list(range(0, 401, 10))
    for (name, values), color in zip(counts.items(), ("#1f77b4", "#ff7f0e", "#2ca02c"), strict=False):
        beyond = sum(v > 400 for v in values)
        label = f"{name}s (n {len(values)}" + (f", {beyond} beyond 400 not shown)" if beyond else ")")
        ax.hist(values, bins=bins, density=True, alpha=0.5, color=color, label=label)
    ax.set(xlabel="tokens (GPT-2 BPE)", ylabel="density", title=title, xlim=(0, 400))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def group_loss_figure(groups: list[Group]) -> Figure | None:
    """Each group's train loss: the mean over the runs in its statistics (`Group.used`: one completed run per
    seed), and a band from their min to their max."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for i, group in enumerate(groups):
        runs = [r.loss_curve() for r in group.used.values()]
        runs = [dict(zip(steps, losses, strict=True)) for steps, losses in runs if steps]
        steps = sorted(set.intersection(*(set(c) for c in runs))) if runs else []
        if not steps:
            continue
        drawn = True
        table = [[c[s] for c in runs] for s in steps]
        mean = [sum(row) / len(row) for row in table]
        line = ax.plot(
            steps,
            mean,
            **curve_style(i),
            label=f"{group.label} (mean of {len(runs)} seed{'s' if len(runs) > 1 else ''})",
        )[0]
        if len(runs) > 1:
            ax.fill_between(
                steps, [min(r) for r in table], [max(r) for r in table], color=line.get_color(), alpha=0.2
            )
    if not drawn:
        plt.close(fig)
        return None
    ax.set(
        xlabel="step", ylabel="train loss", title="Train loss: mean over training seeds, band = min to max"
    )
    _integer_steps(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def group_before_after_figure(groups: list[Group], measure: str, ylabel: str) -> Figure | None:
    """Grouped bars, before and after training, per group: the mean over training seeds (a run's value is its
    mean over generation seeds); error bars are the 95% t interval of that mean (none for a group of one)."""
    shown = []
    for group in groups:
        before = [r.measure("before", measure) for r in group.used.values()]
        after = [r.measure("after", measure) for r in group.used.values()]
        if any(after) or any(before):
            shown.append((group, [b["mean"] for b in before if b], [a["mean"] for a in after if a]))
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(shown) + 2), 4.5))
    width = 0.38
    for offset, index, when, color in (
        (-width / 2, 1, "before", "#9aa5b1"),
        (width / 2, 2, "after", "#1f77b4"),
    ):
        stats = [spread(row[index]) if row[index] else None for row in shown]
        _bars(
            ax,
            [i + offset for i in range(len(shown))],
            [s.mean if s else float("nan") for s in stats],
            width,
            [s.half_width or 0.0 if s else 0.0 for s in stats],
            color=color,
            label=when,
        )
    _baseline(ax, [held_out_value(next(iter(g.used.values())), measure) for g, _, _ in shown], measure)
    labels = [f"{g.label}\n(n = {len(g.used)})" for g, _, _ in shown]
    title = "before / after training: mean over training seeds, 95% t interval"
    return _finish_bars(fig, ax, labels, ylabel, title, fontsize=9)


def paired_seeds_loss_figure(a: Group, b: Group) -> Figure | None:
    """Loss of B against A at the same steps, one marker shape per training seed, with y = x."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    everything = []
    for i, seed in enumerate(sorted(set(a.used) & set(b.used))):
        steps_a, loss_a = a.used[seed].loss_curve()
        at_b = dict(zip(*b.used[seed].loss_curve(), strict=True))
        pairs = [(x, at_b[s]) for s, x in zip(steps_a, loss_a, strict=True) if s in at_b]
        if pairs:
            xs, ys = zip(*pairs, strict=True)
            ax.scatter(xs, ys, s=10, alpha=0.6, marker=MARKERS[i % len(MARKERS)], label=f"seed {seed}")
            everything += [*xs, *ys]
    if not everything:
        plt.close(fig)
        return None
    low, high = min(everything), max(everything)
    ax.plot([low, high], [low, high], color="black", lw=1, label="y = x")
    ax.set(
        xlabel=f"train loss, A: {a.label}",
        ylabel=f"train loss, B: {b.label}",
        title="Loss B vs loss A, step by step, per seed",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


VERDICT_COLOURS = {"reproduced": "#2ca02c", "contradicted": "#d62728", "inconclusive": "#7f7f7f"}


def claims_figure(rows: list[dict]) -> Figure | None:
    """One line per claim (`python -m gptft.studies`): its effect (mean over seeds − the null) and 95% interval,
    each scaled by the largest of |mean|, |low|, |high| so that claims in different units share an axis; the sign
    and whether the interval crosses 0 is what it shows. Colour: the verdict. Rows: dicts with id, verdict, mean,
    ci95 (or None), kind, margin, null."""
    shown = [r for r in rows if r.get("mean") is not None]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(shown) + 1.6))
    for y, row in enumerate(reversed(shown)):
        low, high = row["ci95"] if row.get("ci95") else (row["mean"], row["mean"])
        scale = max(abs(row["mean"]), abs(low), abs(high), abs(row.get("margin") or 0)) or 1.0
        colour = VERDICT_COLOURS.get(row["verdict"], "black")
        ax.plot([low / scale, high / scale], [y, y], color=colour, lw=2)
        ax.plot(row["mean"] / scale, y, "o", color=colour, ms=6)
        if row.get("margin"):
            m = row["margin"] / scale
            ax.plot([-m, m], [y, y], color=colour, lw=8, alpha=0.15)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(shown)), [f"{r['id']} ({r['verdict']})" for r in reversed(shown)], fontsize=8)
    ax.set_xlim(-1.1, 1.1)
    ax.set_xlabel(
        "effect (mean − null) and 95% interval, scaled per claim (shaded: the ± margin of a 'within' claim)"
    )
    ax.set_title("The write-ups' claims across training seeds", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def delta_rank_figure(ranks: dict[str, dict[str, float]], full: dict[str, int]) -> Figure | None:
    """Effective rank of ΔW (singular values holding 90% of ‖ΔW‖²) per tracked matrix, one bar series per method
    (mean over seeds), on the matrix's full rank (dashed). `ranks`: {method: {matrix: rank}}."""
    methods = [m for m, r in ranks.items() if r]
    if not methods:
        return None
    names = sorted({n for m in methods for n in ranks[m]}, key=lambda n: (_block(n), n))
    fig, ax = plt.subplots(figsize=(max(8, 0.35 * len(names) * len(methods) / 2 + 3), 4.5))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(names))]
        ax.bar(
            xs,
            [ranks[method].get(n, float("nan")) for n in names],
            width,
            label=method,
            edgecolor="black",
            lw=0.4,
        )
    tops = {full.get(n) for n in names} - {None}
    for top in tops:
        ax.axhline(top, color="black", ls="--", lw=0.8)
    short = [n.replace("transformer.", "").replace(".weight", "") for n in names]
    ax.set_xticks(range(len(names)), short, rotation=90, fontsize=7)
    ax.set_ylabel("effective rank of ΔW (90% of ‖ΔW‖²)")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_title(
        "Rank of what fine-tuning changed, per matrix (dashed: full rank); frozen matrices: 0", fontsize=10
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    return fig


def _block(name: str) -> int:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a == "h" and b.isdigit():
            return int(b)
    return -1
