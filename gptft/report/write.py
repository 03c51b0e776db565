"""Write DIR/report/: summary.md, summary.json, the figures, and tensorboard/ (the figures and the summary); and an
HParams session in each training's own tensorboard/ folder."""

from __future__ import annotations

import logging
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

# HParams metrics: a metrics.json "after" key → the run's own TensorBoard tag whose last point is that value. The
# HParams tab reads them from each training's curves; the report logs no scalar of its own.
HP_METRICS = {
    "val_loss": "val/loss",
    "val_ppl": "val/ppl",
    "style_ratio": "probe/style_ratio",
    "target_ratio": "probe/target_ratio",
    "copy_rate": "probe/copy_rate",
    "distinct_2": "probe/distinct_2",
    "exact_match": "probe/exact_match",
    "ref_loss": "ref/loss",
    "ref_kl": "ref/kl",
}
# The report's HParams session in a training's tensorboard/ folder: one events file, replaced by the next report.
SESSION_SUFFIX = ".gptft_report_hparams"


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
    _write_tensorboard(out / "tensorboard", runs, figures, text)
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
        "Style ratio: % of generated tokens among the training text's most frequent ids (of the held-out text: "
        "the same share in the held-out text itself, the level of real prose; a degenerate repetition of frequent "
        "tokens can exceed it, so read it with distinct-2); copy rate: share of "
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


def _write_tensorboard(target: Path, runs: list[Run], figures: dict[str, Any], text: str) -> None:
    """The report's own TensorBoard entry, one run beside the trainings: its figures and summary.md (groups,
    intervals and tests as a text table), written to a fresh folder that then replaces the old one. The HParams
    tab's rows are the trainings themselves: each gets a session (its overrides, and as metrics the tags of its own
    curves), so the tab names each training by its folder and the report adds no one-point charts."""
    from torch.utils.tensorboard import SummaryWriter

    tmp = Path(tempfile.mkdtemp(prefix=".tensorboard.", dir=target.parent))
    with SummaryWriter(str(tmp)) as writer:
        for name, fig in figures.items():
            if fig is not None:
                writer.add_figure(f"report/{name}", fig, close=False)
        writer.add_text("report/summary", text)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    tags = [tag for key, tag in HP_METRICS.items() if any(key in r.metrics.get("after", {}) for r in runs)]
    for run in runs:
        _write_session(run, tags)


def _write_session(run: Run, tags: list[str]) -> None:
    """The run's HParams session (start and end) in <run>/tensorboard/, replacing the one an earlier report wrote."""
    from torch.utils.tensorboard.summary import hparams
    from torch.utils.tensorboard.writer import FileWriter

    events = run.path / "tensorboard"
    if not events.is_dir() or not tags:
        return
    params: dict[str, Any] = {"lr": run.lr if run.lr is not None else float("nan")}
    params |= {k: _scalar(v) for k, v in run.overrides.items()}
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".hparams.", dir=events))
        writer = FileWriter(str(tmp), filename_suffix=SESSION_SUFFIX)
        for summary in hparams(params, dict.fromkeys(tags, 0.0)):
            writer.add_summary(summary)
        writer.close()
        for old in events.glob(f"*{SESSION_SUFFIX}"):
            old.unlink()
        for new in tmp.iterdir():
            new.rename(events / new.name)
        tmp.rmdir()
    except OSError as e:  # a folder this user may not write (another's runs): the report stands without it
        log.warning("no HParams entry for %s: %s", run.path, e)
