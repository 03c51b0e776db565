"""The search part of a study's report: its best settings, its trials, its optimisation history and the
settings' importances (Optuna's own matplotlib figures), written into <study folder>/report/."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import optuna

from gptft.report.figures import plt, png_bytes
from gptft.search import override
from gptft.utils.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)


def search_figures(study: optuna.Study, metric: str) -> dict[str, Any]:
    """history.png always (once a trial finished); importances.png when the finished trials tell the settings
    apart (Optuna's PED-ANOVA needs at least two finished trials with different values). Both name the measure
    (Optuna's default is "Objective Value") and are laid out again, so long setting names stay in the figure."""
    from optuna.visualization import matplotlib as vis

    figures: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        figures["history"] = vis.plot_optimization_history(study, target_name=metric).figure
        try:
            figures["importances"] = vis.plot_param_importances(study, target_name=metric).figure
        except (ValueError, RuntimeError) as e:  # too few finished trials, or a single value per setting
            log.info("no importances figure: %s", e)
    for fig in figures.values():
        fig.set_layout_engine("tight")  # drawn again at savefig, with the tick labels' real sizes
    return figures


def _trials_table(study: optuna.Study) -> list[str]:
    names = sorted({name for t in study.trials for name in t.params})
    head = ["trial", "state", "value", *names, "folder"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in study.trials:
        value = "" if t.value is None else f"{t.value:.5g}"
        if t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values:
            step = max(t.intermediate_values)
            value = f"pruned at step {step} ({t.intermediate_values[step]:.4g})"
        params = [
            f"{t.params[n]:.4g}" if isinstance(t.params.get(n), float) else str(t.params.get(n, ""))
            for n in names
        ]
        folder = Path(t.user_attrs.get("run_dir", "")).name
        lines.append("| " + " | ".join([str(t.number), t.state.name.lower(), value, *params, folder]) + " |")
    return lines


def write_search_report(study: optuna.Study, folder: str | Path) -> str:
    """Write report/search.md, report/history.png and report/importances.png; return the Markdown."""
    folder = Path(folder)
    out = folder / "report"
    definition = study.user_attrs.get("definition", {})
    direction = study.direction.name.lower()
    lines = [
        f"# Search: {folder}",
        "",
        f"{direction} `{definition.get('metric', '?')}` over "
        + ", ".join(f"`{s}`" for s in definition.get("spaces", [])),
        "",
    ]
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        overrides = [*definition.get("overrides", []), *(override(k, v) for k, v in best.params.items())]
        lines += [
            f"**Best**: trial {best.number}, {definition.get('metric', 'value')} = {best.value:.5g}, "
            f"in `{Path(best.user_attrs.get('run_dir', '')).name}`",
            "",
            "```bash",
            f"python -m gptft.run {' '.join(overrides)}",
            "```",
            "",
        ]
    else:
        lines += ["No trial has finished yet.", ""]
    counts = {
        s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in optuna.trial.TrialState
    }
    lines += [", ".join(f"{n} {k}" for k, n in counts.items() if n), "", *_trials_table(study), ""]
    if complete:
        figures = search_figures(study, definition.get("metric", "value"))
        for name, fig in figures.items():
            atomic_write_bytes(out / f"{name}.png", png_bytes(fig))
            plt.close(fig)
        lines += [f"![{name}]({name}.png)" for name in figures] + [""]
    text = "\n".join(lines)
    atomic_write_text(out / "search.md", text)
    return text
