"""Write DIR/report/: summary.md, summary.json, loss.png, style_ratio.png, and tensorboard/ (figures + HParams)."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gptft.report.collect import Run, find_runs
from gptft.report.figures import (
    before_after_figure,
    group_before_after_figure,
    group_loss_figure,
    loss_figure,
    paired_loss_figure,
    paired_seeds_loss_figure,
    png_bytes,
    weight_delta_figure,
)
from gptft.report.learn_forget import learn_forget_figure, learn_forget_section
from gptft.report.replicates import (
    Comparison,
    Group,
    comparisons,
    differ_only_in_freeze,
    group_runs,
    is_replicated,
    left_out_json,
    measure_name,
    run_measures,
    seed_of,
)
from gptft.report.stats import EXACT_UP_TO, spread
from gptft.report.summary import (
    comparisons_section,
    lengths_section,
    markdown_table,
    paired_section,
    problems,
    replicates_section,
    samples_section,
    summary_rows,
)
from gptft.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

# metrics.json value → HParams metric name (TensorBoard's HParams tab compares runs on these)
HP_METRICS = {
    ("after", "val_loss"): "hp/val_loss",
    ("after", "val_ppl"): "hp/val_ppl",
    ("after", "style_ratio"): "hp/style_ratio_after",
    ("before", "style_ratio"): "hp/style_ratio_before",
    ("after", "copy_rate"): "hp/copy_rate_after",
    ("after", "target_ratio"): "hp/target_ratio_after",
    ("after", "distinct_2"): "hp/distinct_2_after",
}


def write_report(folder: str | Path, compare: list[str] | None = None) -> str:
    """Write the report of every run under `folder` into `folder/report/`; return the summary text.

    Runs that differ only in `seed` are grouped; `compare` names comparisons "B:A" (B − A, seed by seed),
    by default every group against the first.
    """
    folder = Path(folder)
    runs = find_runs(folder)
    groups = group_runs(runs, folder)
    pairs = comparisons(groups, compare)  # before any figure: a bad --compare stops with one line
    replicated = is_replicated(groups) or bool(compare)
    out = folder / "report"
    figures = _figures(runs, groups) if replicated else _run_figures(runs)
    figures["learn_forget"] = learn_forget_figure(
        groups
    )  # one point per method (group), error bars over seeds
    missing = [name for name in ("loss", "style_ratio") if figures.get(name) is None]
    figures = {name: fig for name, fig in figures.items() if fig is not None}
    text = _summary_text(folder, runs, missing, groups, pairs if replicated else [])
    for name, fig in figures.items():
        atomic_write_bytes(out / f"{name}.png", png_bytes(fig))
    atomic_write_text(out / "summary.md", text)
    atomic_write_json(out / "summary.json", summary_json(folder, runs, groups, pairs))
    _write_tensorboard(
        out / "tensorboard", runs, figures, groups if replicated else [], pairs if replicated else []
    )
    for fig in figures.values():
        if fig is not None:
            import matplotlib.pyplot as plt

            plt.close(fig)
    return text


def _run_figures(runs: list[Run]) -> dict[str, Any]:
    """One run, or runs without replicates: a curve and a pair of bars per run."""
    return {
        "loss": loss_figure(runs),
        "style_ratio": before_after_figure(runs, "style_ratio", "style ratio (%)"),
        # Figures that only some studies have data for: drawn when a run has them.
        "target_ratio": before_after_figure(runs, "target_ratio", "target ratio (share of target tokens)"),
        "loss_b_vs_a": paired_loss_figure(runs),
        "weight_delta": weight_delta_figure(runs),
    }


def _figures(runs: list[Run], groups: list[Group]) -> dict[str, Any]:
    """Replicates: one mean curve with a band, and one pair of bars with an interval, per group (of the runs in
    its statistics only)."""
    freeze_pair = len(groups) == 2 and differ_only_in_freeze(groups[0], groups[1])
    return {
        "loss": group_loss_figure(groups),
        "style_ratio": group_before_after_figure(groups, "style_ratio", "style ratio (%)"),
        "target_ratio": group_before_after_figure(
            groups, "target_ratio", "target ratio (share of target tokens)"
        ),
        "loss_b_vs_a": paired_seeds_loss_figure(groups[0], groups[1]) if freeze_pair else None,
        "weight_delta": weight_delta_figure(runs),
    }


def _summary_text(
    folder: Path, runs: list[Run], missing_figures: list[str], groups: list[Group], pairs: list[Comparison]
) -> str:
    lines = [f"# Report: {folder}", "", markdown_table(summary_rows(runs)), ""]
    lines += [
        "Style ratio: % of generated tokens among the training text's most frequent ids; copy rate: share of "
        "generated 8-grams found verbatim in the training text; distinct-2: unique over all bigrams. "
        "Mean ± std over `eval.repeats` generation seeds, after training unless marked.",
        "",
    ]
    lines += paired_section(runs)
    if pairs or any(len(g.runs) > 1 for g in groups):
        lines += replicates_section(groups)
        lines += comparisons_section(pairs)
        lines += ["Every number above is in `summary.json` (groups, per-seed values, intervals, tests).", ""]
    lines += learn_forget_section(groups)
    lines += lengths_section(runs)
    lines += samples_section(runs)
    notes = problems(runs) + [f"no data for {name}.png" for name in missing_figures]
    if notes:
        lines += ["## Missing", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def _hparams(run: Run) -> tuple[dict[str, Any], dict[str, float]]:
    params: dict[str, Any] = {"lr": run.lr if run.lr is not None else float("nan")}
    params |= {k: _scalar(v) for k, v in run.overrides.items()}
    metrics = {}
    for (when, key), name in HP_METRICS.items():
        value = run.metrics.get(when, {}).get(key)
        value = value.get("mean") if isinstance(value, dict) else value
        if isinstance(value, (int, float)) and math.isfinite(value):
            metrics[name] = float(value)
    return params, metrics


def _scalar(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        return value


def summary_json(
    folder: Path, runs: list[Run], groups: list[Group], pairs: list[Comparison]
) -> dict[str, Any]:
    """The report's numbers for a program: every run, every group over its seeds, every paired comparison."""
    of_run = {id(run): group for group in groups for run in group.runs}
    excluded = {id(run): why for group in groups for run, why in group.excluded}
    return {
        "folder": str(folder),
        "grouping": "runs whose overrides differ only in `seed` form a group",
        "interval": "95% Student-t interval of the mean over training seeds (null for a group of one run)",
        "test": f"two-sided sign-flip permutation test of the per-seed differences b - a: exact (all 2^n sign "
        f"patterns) up to {EXACT_UP_TO} seeds, Monte Carlo (2^16 random patterns, seeded) beyond; each "
        "comparison's p_method and smallest_possible_p say which",
        "runs": [
            {
                "label": run.label,
                "path": str(run.path),
                "group": of_run[id(run)].label,
                "seed": seed_of(run),
                "status": run.status,
                "in_statistics": id(run) not in excluded,
                "excluded_because": excluded.get(id(run)),
                "measures": run_measures(run),
            }
            for run in runs
        ],
        "groups": [_group_json(group) for group in groups],
        "comparisons": [pair.as_dict() for pair in pairs],
    }


def _group_json(group: Group) -> dict[str, Any]:
    measures = {}
    for measure in group.measures():
        seeds, values = group.values(measure)
        measures[measure] = {"name": measure_name(measure), "seeds": seeds, "values": values}
        measures[measure] |= spread(values).as_dict()
        measures[measure]["left_out"] = left_out_json(group.left_out(measure))  # n counts the others
    return {
        "label": group.label,
        "overrides": group.overrides,
        "n": len(group.used),
        "seeds": group.seeds,
        "runs": [group.used[s].label for s in group.seeds],
        "excluded": [{"run": r.label, "path": str(r.path), "why": why} for r, why in group.excluded],
        "measures": measures,
    }


def _group_hparams(group: Group) -> tuple[dict[str, Any], dict[str, float]]:
    """A group's entry: its overrides, n and seeds; each measure's mean, std and 95% interval over the seeds."""
    params: dict[str, Any] = {k: _scalar(v) for k, v in group.overrides.items()}
    params |= {
        "seed": f"mean of {len(group.used)}: {','.join(map(str, group.seeds))}",
        "n_seeds": len(group.used),
    }
    metrics = {}
    for measure in group.measures():
        s = spread(group.values(measure)[1])
        metrics[f"group/{measure}/mean"] = s.mean
        if s.n > 1:
            metrics |= {f"group/{measure}/std": s.std, f"group/{measure}/ci95_low": s.low}
            metrics[f"group/{measure}/ci95_high"] = s.high
    return params, metrics


def _comparison_hparams(pair: Comparison) -> tuple[dict[str, Any], dict[str, float]]:
    """A comparison's entry: B − A's mean, 95% interval and sign-flip p of each measure."""
    params = {
        "compare": f"{pair.b.label} − {pair.a.label}",
        "n_seeds": len(pair.tests[0].seeds) if pair.tests else 0,
    }
    metrics = {}
    for t in pair.tests:
        metrics[f"diff/{t.measure}/mean"] = t.spread.mean
        if t.spread.n > 1:
            metrics |= {
                f"diff/{t.measure}/ci95_low": t.spread.low,
                f"diff/{t.measure}/ci95_high": t.spread.high,
            }
        if t.p is not None:
            metrics[f"diff/{t.measure}/p"] = t.p
    return params, metrics


def _write_tensorboard(
    target: Path, runs: list[Run], figures: dict[str, Any], groups: list[Group], pairs: list[Comparison]
) -> None:
    """Figures and an HParams entry per run (and per group and comparison of replicates), written to a fresh
    folder that then replaces the old one."""
    from torch.utils.tensorboard import SummaryWriter

    entries = [(run.label or run.path.name, *_hparams(run)) for run in runs]
    entries += [(f"group {g.label}", *_group_hparams(g)) for g in groups]
    entries += [(f"compare {p.b.label} vs {p.a.label}", *_comparison_hparams(p)) for p in pairs]
    tmp = Path(tempfile.mkdtemp(prefix=".tensorboard.", dir=target.parent))
    with SummaryWriter(str(tmp)) as writer:
        for name, fig in figures.items():
            if fig is not None:
                writer.add_figure(f"report/{name}", fig, close=False)
        for name, params, metrics in entries:
            if metrics:
                writer.add_hparams(params, metrics, run_name=name.replace("/", "_"))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
