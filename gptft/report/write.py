"""Write DIR/report/: summary.md, loss.png, style_ratio.png, and tensorboard/ (figures + HParams)."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from gptft.errors import ConfigError
from gptft.report.collect import Run, find_runs
from gptft.report.figures import (
    before_after_figure,
    loss_figure,
    paired_loss_figure,
    png_bytes,
    weight_delta_figure,
)
from gptft.report.summary import (
    lengths_section,
    markdown_table,
    paired_section,
    problems,
    samples_section,
    summary_rows,
)
from gptft.utils.io import atomic_write_bytes, atomic_write_text

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


def write_report(folder: str | Path) -> str:
    """Write the report of every run under `folder` into `folder/report/`; return the summary text."""
    folder = Path(folder)
    runs = find_runs(folder)
    out = folder / "report"
    curves = {run.label: run.loss_curve() for run in runs}
    figures = {
        "loss": loss_figure(runs, curves),
        "style_ratio": before_after_figure(runs, "style_ratio", "style ratio (%)"),
    }
    missing = [name for name, fig in figures.items() if fig is None]
    # Figures that only some studies have data for: drawn when a run has them.
    optional = {
        "target_ratio": before_after_figure(runs, "target_ratio", "target ratio (share of target tokens)"),
        "loss_b_vs_a": paired_loss_figure(runs, curves),
        "weight_delta": weight_delta_figure(runs),
    }
    figures |= {name: fig for name, fig in optional.items() if fig is not None}
    text = _summary_text(folder, runs, missing)
    for name, fig in figures.items():
        if fig is not None:
            atomic_write_bytes(out / f"{name}.png", png_bytes(fig))
    atomic_write_text(out / "summary.md", text)
    _write_tensorboard(out / "tensorboard", runs, figures)
    for fig in figures.values():
        if fig is not None:
            import matplotlib.pyplot as plt

            plt.close(fig)
    return text


def _summary_text(folder: Path, runs: list[Run], missing_figures: list[str]) -> str:
    lines = [f"# Report: {folder}", "", markdown_table(summary_rows(runs)), ""]
    lines += [
        "Style ratio: % of generated tokens among the training text's most frequent ids; copy rate: share of "
        "generated 8-grams found verbatim in the training text; distinct-2: unique over all bigrams. "
        "Mean ± std over `eval.seeds` generation seeds, after training unless marked.",
        "",
    ]
    lines += paired_section(runs)
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


def _write_tensorboard(target: Path, runs: list[Run], figures: dict[str, Any]) -> None:
    """Figures and an HParams entry per run, written to a fresh folder that then replaces the old one."""
    from torch.utils.tensorboard import SummaryWriter

    tmp = Path(tempfile.mkdtemp(prefix=".tensorboard.", dir=target.parent))
    with SummaryWriter(str(tmp)) as writer:
        for name, fig in figures.items():
            if fig is not None:
                writer.add_figure(f"report/{name}", fig, close=False)
        for run in runs:
            params, metrics = _hparams(run)
            if metrics:
                writer.add_hparams(params, metrics, run_name=run.label.replace("/", "_") or run.path.name)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


class SweepReport(Callback):
    """Hydra callback: when a multirun ends, write the sweep's report into its folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.sweep.dir))
        try:
            text = write_report(folder)
        except ConfigError as e:
            log.error("no sweep report: %s", e)
            return
        print(text)
        log.info("sweep report: %s", folder / "report")
