"""<out>/REPORT.md, summary.json and the figures of `python -m gptft.studies`: every claim with its verdict, the
forgetting beside the learning of every study, and the effective rank of ΔW for the freezing and
learning-vs-forgetting runs."""

from __future__ import annotations

import os
import platform
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gptft.studies.claims import CLAIMS, StudyData, Verdict, judge, mean_rank, verdict_line

TITLES = {
    "lr_sweep": ("The learning-rate study", "lr_sweep.md"),
    "scratch": ('Training from scratch ("model 5")', "scratch.md"),
    "kl_x": ('KL toward the "x" tokens', "kl_x.md"),
    "freezing": ("Targeted freezing (A: everything trains; B: the upper half's q/k/v only)", "freezing.md"),
    "instruct": ("Instruction tuning", "instruct.md"),
    "learn_forget": ("Learning versus forgetting (no write-up: Biderman et al., 2024)", "learn_forget.md"),
}
RANKED = ("freezing", "learn_forget")  # the studies whose ΔW ranks the report gives
CAVEAT = (
    "A toy base is not GPT-2: the base here is a small model pretrained on one book (Moby Dick) for minutes, and "
    "every study runs far fewer steps than its write-up. A verdict says what happened at this scale, on this base; "
    "it neither confirms nor refutes the write-ups' GPT-2 numbers."
)


def machine() -> str:
    """The CPU's model name, its core count, and whether it has AMX (bf16 matrix tiles)."""
    name, amx = platform.processor() or platform.machine(), False
    try:
        info = Path("/proc/cpuinfo").read_text()
        found = re.search(r"model name\s*:\s*(.+)", info)
        name = found.group(1).strip() if found else name
        amx = "amx_bf16" in info
    except OSError:
        pass
    import torch

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{name}, {os.cpu_count()} cores{' (AMX)' if amx else ''}{gpu}"


def study_data(cfg: DictConfig, out: Path, name: str, base: str | None) -> StudyData | None:
    from gptft.errors import ConfigError
    from gptft.report.collect import find_runs
    from gptft.report.replicates import group_runs
    from gptft.studies.plan import _value

    folder = out / name
    if not folder.is_dir():
        return None
    try:
        runs = find_runs(folder)
    except ConfigError:
        return None
    sweep = OmegaConf.to_container(cfg.studies[name].sweep) or {}
    swept = {k: [_value(v) for v in values] for k, values in sweep.items()}
    uses_base = cfg.studies[name].get("from_base", True)
    return StudyData(name, folder, group_runs(runs, folder), base if uses_base else None, swept)


def _verdicts(cfg: DictConfig, data: dict[str, StudyData | None]) -> list[Verdict]:
    hint = (
        "a larger scale (scale=cpu, then scale=paper)"
        if cfg.scale == "smoke"
        else "a longer run (scale=paper)"
    )
    out = []
    for claim in CLAIMS:
        d = data.get(claim.study)
        if d is None:
            out.append(judge(claim, {}, hint))
            out[-1].why_missing = f"study {claim.study} not run"
            continue
        try:
            values = claim.evidence(d)
        except Exception as e:  # a measure the runs lack: the claim is not measured, the report stands
            values, error = {}, f"{type(e).__name__}: {e}"
        else:
            error = ""
        verdict = judge(claim, values, hint)
        if error or (not values and not verdict.why_missing):
            verdict.why_missing = error or "the runs lack this measure"
        elif not values:
            verdict.why_missing = "the runs lack this measure"
        out.append(verdict)
    return out


def _ranks(d: StudyData) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, int]]:
    """{method: {matrix: mean effective rank}}, {method: {matrix: mean ‖ΔW‖}}, {matrix: full rank}."""
    from gptft.studies.claims import _deltas

    ranks: dict[str, dict[str, float]] = {}
    norms: dict[str, dict[str, float]] = {}
    full: dict[str, int] = {}
    for group in d.groups:
        per_run = [x for x in (_deltas(d, run) for run in group.used.values()) if x]
        if not per_run:
            continue
        label = group.label
        ranks[label], norms[label] = {}, {}
        for name in per_run[0]:
            have = [x[name] for x in per_run if name in x]
            ranks[label][name] = sum(m["rank"] for m in have) / len(have)
            norms[label][name] = sum(m["norm"] for m in have) / len(have)
            full[name] = have[0]["full_rank"]
    return ranks, norms, full


def _samples(d: StudyData, limit: int = 400) -> list[str]:
    runs = d.runs()
    if not runs:
        return []
    run = runs[min(runs)]
    lines = []
    for when in ("before", "after"):
        file = Path(run.path) / "samples" / f"{when}.txt"
        if file.is_file():
            text = file.read_text()[:limit].rstrip()
            lines += [
                f"Seed {min(runs)}, {when} training (`{file.relative_to(d.folder.parent)}`):",
                "",
                "```text",
                text,
                "```",
                "",
            ]
    return lines


def _figure_links(d: StudyData, names: list[str]) -> list[str]:
    out = []
    for name in names:
        file = d.folder / "report" / name
        if file.is_file():
            out.append(f"![{d.name}: {name}]({file.relative_to(d.folder.parent)})")
    return out


def write_studies_report(
    cfg: DictConfig,
    out: Path,
    wanted: list[str],
    base: str | None,
    failed: list[str],
    minutes: float | None = None,
) -> Path:
    from gptft.report.figures import claims_figure, delta_rank_figure, png_bytes
    from gptft.report.learn_forget import learn_forget_rows
    from gptft.report.summary import markdown_table
    from gptft.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

    data = {name: study_data(cfg, out, name, base) for name in cfg.studies}
    verdicts = _verdicts(cfg, data)
    scale = f"{cfg.scale}"
    counts = {
        k: sum(v.verdict == k for v in verdicts) for k in ("reproduced", "contradicted", "inconclusive")
    }
    took = f", {minutes:.1f} min for this call" if minutes is not None else ""
    if hasattr(os, "getloadavg"):  # a shared machine's times are longer: say how busy it was
        took += f" (load average {os.getloadavg()[1]:.1f} over its last 5 min)"
    lines = [
        f"# The studies reproduced: scale {scale}",
        "",
        f"Base: `{base}`. Seeds: {cfg.seeds} per setting ({cfg.paired_seeds} for the paired designs). Machine: "
        f"{machine()}; {datetime.now():%Y-%m-%d}{took}. Settings: `studies.yaml` beside this file "
        f"(conf/studies/{scale}.yaml as it was when these studies started).",
        "",
        f"**{counts['reproduced']} reproduced, {counts['contradicted']} contradicted, {counts['inconclusive']} "
        f"inconclusive** of {len(verdicts)} claims. {CAVEAT}",
        "",
        "How to read a line: each claim is one number per training seed; its effect is their mean minus the null "
        "value, with the 95% Student-t interval and the exact two-sided sign-flip p over the seeds. Reproduced: "
        "the claimed direction with an interval that excludes 0 (a 'within' claim: the interval inside the margin); "
        "contradicted: the interval excludes 0 the other way; inconclusive: neither. With n seeds p cannot go "
        "below 2/2^n (0.25 with 3, 0.031 with 6).",
        "",
        "## Verdicts",
        "",
        markdown_table([_row(v) for v in verdicts]),
        "",
        "Each study's section below gives every claim's line in full: the testable statement, the numbers, the "
        "verdict and, where inconclusive, what would settle it.",
        "",
    ]
    if (out / "claims.png").exists() or verdicts:
        figure = claims_figure([v.as_dict() for v in verdicts])
        if figure is not None:
            atomic_write_bytes(out / "claims.png", png_bytes(figure))
            lines += ["![every claim's effect and interval](claims.png)", ""]
    summary: dict[str, Any] = {
        "scale": scale,
        "base": base,
        "seeds": cfg.seeds,
        "paired_seeds": cfg.paired_seeds,
        "machine": machine(),
        "caveat": CAVEAT,
        "claims": [v.as_dict() for v in verdicts],
        "studies": {},
        "failed_runs": failed,
    }
    for name in cfg.studies:
        title, page = TITLES.get(name, (name, f"{name}.md"))
        d = data.get(name)
        lines += [f"## {title}", ""]
        if d is None:
            lines += ["Not run" + (" (only= left it out)." if name not in wanted else "."), ""]
            continue
        overrides = " ".join(OmegaConf.to_container(cfg.studies[name].overrides))
        lines += [
            f"Runs: `{name}/` (its sweep report: `{name}/report/summary.md`); `experiment="
            f"{cfg.studies[name].experiment}` with `{overrides}`; the write-up's page: docs/studies/{page}.",
            "",
        ]
        lines += [verdict_line(v, scale) for v in verdicts if v.claim.study == name] + [""]
        figures = sorted({f for v in verdicts if v.claim.study == name for f in v.claim.figures})
        lines += [*_figure_links(d, figures), ""]
        if name == "scratch":
            lines += ["Samples (the write-up's prompt):", "", *_samples(d)]
        rows = learn_forget_rows(d.groups)
        study_summary: dict[str, Any] = {"folder": str(d.folder), "forgetting": rows}
        if rows:
            lines += [
                "Learning beside forgetting (what no write-up measured): learning is the drop of the held-out loss "
                "on the training text, forgetting the rise of the loss on the reference text, KL the drift from the "
                "starting model there; ± is the 95% interval over seeds. A negative forgetting is a reference loss "
                "that fell: a base that is still learning the language gains on its own text too.",
                "",
                markdown_table(rows),
                "",
            ]
        if name in RANKED and d.base:
            ranks, norms, full = _ranks(d)
            study_summary["delta_w"] = {"rank": ranks, "norm": norms, "full_rank": full}
            if ranks:
                figure = delta_rank_figure(ranks, full)
                if figure is not None:
                    atomic_write_bytes(out / f"delta_rank_{name}.png", png_bytes(figure))
                mean = {m: sum(r.values()) / len(r) for m, r in ranks.items() if r}
                table = [
                    {
                        "matrix": n.replace("transformer.", ""),
                        "full rank": str(full[n]),
                        **{
                            m: f"{ranks[m].get(n, float('nan')):.3g} ({norms[m].get(n, float('nan')):.2g})"
                            for m in ranks
                        },
                    }
                    for n in sorted(full, key=lambda n: (_block_index(n), n))
                ]
                lines += [
                    "Effective rank of ΔW = W_tuned − W_base per tracked matrix (the number of singular values that "
                    "hold 90% of ‖ΔW‖², fp64; mean over seeds; in brackets ‖ΔW‖_F). Mean over matrices: "
                    + ", ".join(f"{m}: {r:.3g}" for m, r in mean.items())
                    + ".",
                    "",
                    f"![effective rank of ΔW](delta_rank_{name}.png)",
                    "",
                    markdown_table(table),
                    "",
                ]
        summary["studies"][name] = study_summary
    if failed:
        lines += ["## Runs that failed", "", *[f"- {f}" for f in failed], ""]
    report = out / "REPORT.md"
    atomic_write_text(report, "\n".join(lines))
    atomic_write_json(out / "summary.json", summary)
    return report


def _row(v: Verdict) -> dict[str, str]:
    """A claim's line of the verdicts table."""
    from gptft.studies.claims import _fmt

    c = v.claim
    if v.why_missing:
        effect = f"not measured ({v.why_missing})"
    elif c.kind == "zero":
        effect = f"max {_fmt(max(abs(x) for x in v.values))}"
    else:
        ci = "" if v.low is None else f" [{_fmt(v.low)}, {_fmt(v.high)}]"
        effect = f"{_fmt(v.mean)}{ci} {c.unit}".strip()
    return {
        "claim": c.id,
        "the write-up says": c.write_up,
        "verdict": f"**{v.verdict}**",
        "effect − null [95% CI]": effect,
        "p": "–" if v.p is None else f"{v.p:.3g}",
        "n": str(v.n),
    }


def _block_index(name: str) -> int:
    from gptft.studies.weights import block_of

    b = block_of(name)
    return -1 if b is None else b


__all__ = ["mean_rank", "write_studies_report"]
