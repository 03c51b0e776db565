"""The report's table: one row per run, in Markdown."""

from __future__ import annotations

from typing import Any

from gptft.report.collect import Run, is_paired, repeat_std
from gptft.report.replicates import (
    Comparison,
    Group,
    all_measures,
    batches_check,
    measure_name,
    sentence,
)
from gptft.report.stats import DRAWS, EXACT_UP_TO, Spread, spread


def _num(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _count(value: int | None) -> str:
    return "–" if value is None else f"{value / 1e6:.2f} M"


def _spread(m: dict[str, Any] | None, digits: int = 3) -> str:
    """A probe's mean ± std over its generation repeats; the mean alone where one repeat measured no spread."""
    if not m:
        return "–"
    std = repeat_std(m)
    return f"{m['mean']:.{digits}g}" + ("" if std is None else f" ± {std:.2g}")


def summary_rows(runs: list[Run]) -> list[dict[str, str]]:
    rows = []
    for run in runs:
        m = run.metrics
        train = m.get("train", {})
        after = m.get("after", {})
        rows.append(
            {
                "run": run.label,
                "lr": _num(run.lr),
                "status": run.status,
                "steps": str(m.get("steps", "–")),
                "train loss first → last": f"{_num(train.get('loss_first'), 4)} → {_num(train.get('loss_last'), 4)}",
                "val loss": _num(after.get("val_loss"), 4),
                "val ppl": _num(after.get("val_ppl"), 4),
                "style ratio % before → after": (
                    f"{_spread(run.measure('before', 'style_ratio'))} → {_spread(run.measure('after', 'style_ratio'))}"
                ),
                # The reference point: real text of the book scores this, a degenerate repetition can score more.
                "style ratio % of the held-out text": _num(m.get("held_out_text", {}).get("style_ratio")),
                "target ratio before → after": (
                    f"{_spread(run.measure('before', 'target_ratio'))} → {_spread(run.measure('after', 'target_ratio'))}"
                ),
                "copy rate": _spread(run.measure("after", "copy_rate")),
                "distinct-2": _spread(run.measure("after", "distinct_2")),
                "trainable params": _count(m.get("params", {}).get("trainable")),
                "median step s": _num(m.get("time", {}).get("median_step_s"), 3),
                "fit time s": _num(m.get("time", {}).get("fit_s"), 4),
                "probes s": _num(m.get("time", {}).get("probes_s"), 3),
            }
        )
    # A column only the KL study fills stays out of the other studies' tables.
    if all(run.measure("after", "target_ratio") is None for run in runs):
        for row in rows:
            del row["target ratio before → after"]
    return rows


def paired_section(runs: list[Run]) -> list[str]:
    """Model A and model B of a freezing study: the time saving r = (T_A − T_B) / T_A."""
    if not is_paired(runs):
        return []
    a, b = (r.metrics.get("time", {}) for r in runs)
    lines = ["## A and B", "", f"A = {runs[0].label}, B = {runs[1].label}.", ""]
    for key, what in (
        ("train_s", "time of the training steps"),
        ("fit_s", "wall time of the fit (before/after probes included)"),
        ("median_step_s", "median step time"),
    ):
        if a.get(key) and b.get(key):
            r = (a[key] - b[key]) / a[key]
            lines.append(
                f"- {what}: T_A = {a[key]:.4g} s, T_B = {b[key]:.4g} s, saving r = (T_A − T_B) / T_A = {100 * r:.1f}%"
            )
    lines.append(f"- {_batches(*batches_check(*runs))}")
    return [*lines, ""]


def _batches(same: bool | None, lacking: list[str]) -> str:
    """What the data fingerprints say about A's and B's batches, in words."""
    if same is None:
        whose = " and ".join(f"{side}'s" for side in lacking)
        return f"no data fingerprint in {whose} metrics.json: same batches not checked"
    return f"A and B trained on {'the same' if same else 'DIFFERENT'} batches (data fingerprint)"


def samples_section(runs: list[Run], limit: int = 400) -> list[str]:
    """The first after-training sample of each run, side by side (as Markdown blocks)."""
    lines = []
    for run in runs:
        file = run.path / "samples" / "after.txt"
        if file.is_file():
            first = file.read_text().split("\n\n=== ")[0].split("\n", 1)
            body = first[1] if len(first) > 1 else first[0]
            text = body[:limit] + ("…" if len(body) > limit else "")
            lines += [f"**{run.label}**", "", "```", text.strip("\n"), "```", ""]
    return ["## Samples after training", "", *lines] if lines else []


def lengths_section(runs: list[Run]) -> list[str]:
    """Token lengths of the question/answer pairs and what the length limit did, for runs that have them."""
    rows = []
    for run in runs:
        s = run.metrics.get("lengths")
        if not s:
            continue
        for what in ("question", "answer", "row"):
            m = s.get(what, {})
            rows.append(
                {
                    "run": run.label,
                    "tokens of": what + ("s" if what != "row" else "s (templated, after the limit)"),
                    "count": str(m.get("count", "–")),
                    "mean": _num(m.get("mean"), 4),
                    "median": _num(m.get("median"), 4),
                    "p90": _num(m.get("p90"), 4),
                    "p99": _num(m.get("p99"), 4),
                    "max": str(m.get("max", "–")),
                }
            )
    if not rows:
        return []
    lines = ["## Lengths", "", markdown_table(rows), ""]
    for run in runs:
        s = run.metrics.get("lengths")
        if s:
            cut, dropped = s.get("truncated", {}), s.get("dropped", {})
            lines.append(
                f"- {run.label}: {s.get('source')}, data.max_length={s.get('max_length')} "
                f"({s.get('length_policy')}): truncated {cut.get('train', 0)} train / {cut.get('test', 0)} test "
                f"pairs, dropped {dropped.get('train', 0)} / {dropped.get('test', 0)}; trained on "
                f"{s.get('pairs', {}).get('train')} pairs, loss on "
                f"{'the answers only' if s.get('mask_prompt') else 'whole rows'} (histogram: lengths.png)"
            )
    return [*lines, ""]


def markdown_table(rows: list[dict[str, str]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h].replace("|", "\\|") for h in header) + " |" for row in rows]
    return "\n".join(lines)


def problems(runs: list[Run]) -> list[str]:
    """What the report cannot show, run by run: a crash before training, a run that did not complete."""
    notes = []
    for run in runs:
        if not run.metrics:
            notes.append(
                f"{run.label}: no metrics.json: it stopped before training started (see {run.path}/run.log)"
            )
        elif run.status != "completed":
            why = run.metrics.get("error") or (
                "still running, or killed before it could say so" if run.status == "running" else ""
            )
            missing = [w for w in ("before", "after") if w not in run.metrics]
            notes.append(
                f"{run.label}: status {run.status}{f' ({why})' if why else ''}; "
                f"missing: {', '.join(missing) or 'nothing'}"
            )
    return notes


def _cell(s: Spread | None, left_out: dict[int, str] | None = None) -> str:
    """mean ± std [95% interval]; where seeds of the group have no value, the cell's own n and who and why."""
    left = ", ".join(f"seed {seed} ({why})" for seed, why in sorted((left_out or {}).items()))
    if s is None:
        return f"– (left out: {left})" if left else "–"
    if s.n == 1:
        return f"{s.mean:.4g} (n = 1: no interval)" + (f"; left out: {left}" if left else "")
    text = f"{s.mean:.4g} ± {s.std:.2g} [{s.low:.4g}, {s.high:.4g}]"
    return text + (f"; n = {s.n}, left out: {left}" if left else "")


def replicates_section(groups: list[Group]) -> list[str]:
    """One column per group: each measure's mean ± std over training seeds and its 95% t interval."""
    rows = []
    for measure in all_measures(groups):
        row = {"measure": measure_name(measure)}
        for group in groups:
            _, values = group.values(measure)
            left_out = group.left_out(measure)
            if not values and all(why == "missing" for why in left_out.values()):
                left_out = {}  # a measure this group never took (e.g. the target ratio outside the KL study)
            row[f"{group.label} (n = {len(group.used)})"] = _cell(
                spread(values) if values else None, left_out
            )
        rows.append(row)
    lines = [
        "## Replicates: mean over training seeds",
        "",
        "Runs that differ only in `seed` form a group. Each cell: mean ± standard deviation over the group's "
        "training seeds [95% Student-t interval of the mean]; a probe's value per run is its mean over the "
        "`eval.repeats` generation seeds. A group of one run shows its value and no interval. A seed without a "
        "finite value of a measure (or without it recorded) is left out of that cell, which then says its own "
        "n, the seed and why.",
        "",
    ]
    if rows:
        lines += [markdown_table(rows), ""]
    for group in groups:
        lines.append(f"- {group.label}: seeds {', '.join(map(str, group.seeds)) or 'none completed'}")
        lines += [f"  - excluded: {run.label} ({why}), {run.path}" for run, why in group.excluded]
    return [*lines, ""]


def comparisons_section(comparisons: list[Comparison]) -> list[str]:
    """Each comparison B − A seed by seed: differences, their mean and 95% interval, the sign-flip p, a sentence."""
    if not comparisons:
        return []
    lines = [
        "## Paired comparisons: B − A, seed by seed",
        "",
        "Runs with the same seed are paired: the same batches and, for a model built from a config, the same "
        "initial weights. Mean of the per-seed differences ± the half-width of its 95% Student-t interval; p: "
        f"two-sided sign-flip permutation test over the seeds, exact up to {EXACT_UP_TO} seeds (all 2^n sign "
        "patterns of the n differences), whose smallest possible value is 2/2^n (0.25 with 3 seeds, 0.0625 "
        f"with 5, 0.031 with 6): fewer than 6 seeds can never reach p < 0.05. Beyond {EXACT_UP_TO} seeds p is a "
        f"Monte Carlo estimate over 2^16 random sign patterns (seeded), whose smallest possible value is "
        f"1/(2^16 + 1) = {1 / (DRAWS + 1):.2g}.",
        "",
    ]
    for c in comparisons:
        paired = sorted({s for t in c.tests for s in t.seeds})
        lines += [f"### B = {c.b.label} against A = {c.a.label}", ""]
        lines.append(f"- paired seeds: {', '.join(map(str, paired)) or 'none'}")
        for label, seeds in c.unpaired.items():
            if seeds:
                lines.append(
                    f"- only {label} completed seed{'s' if len(seeds) > 1 else ''} {seeds}: left out"
                )
        if c.same_batches:
            lines.append("- each pair trained on the same batches (data fingerprint)")
        lines += [f"- seed {s}: {_batches(False, [])}" for s in c.other_batches]
        lines += [f"- seed {s}: {_batches(None, sides)}" for s, sides in sorted(c.no_fingerprint.items())]
        rows = [
            {
                "measure": measure_name(t.measure),
                "B − A per seed": ", ".join(
                    [f"{s}: {d:+.3g}" for s, d in zip(t.seeds, t.differences, strict=True)]
                    + [f"{s}: left out ({why})" for s, why in sorted(t.left_out.items())]
                ),
                "mean [95% CI]": _cell(t.spread)
                if t.spread.n == 1
                else f"{t.spread.mean:+.3g} [{t.spread.low:+.3g}, {t.spread.high:+.3g}]",
                "p": "–" if t.p is None else f"{t.p:.3g}",
            }
            for t in c.tests
        ]
        if rows:
            lines += ["", markdown_table(rows), ""]
        lines += [f"- {sentence(t)}" for t in c.tests]
        lines.append("")
    return lines
