"""Training replicates: group runs that differ only in `seed`, summarise each measure over the seeds, and
compare groups seed by seed (runs with one seed saw the same batches, and a model built from a config the same
initial weights, so the per-seed difference removes what the seed alone does)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptft.errors import ConfigError
from gptft.report.collect import Run
from gptft.report.stats import EXACT_UP_TO, LEVEL, Spread, p_method, sign_flip_p, smallest_p, spread

# Measure names in the report, in its order; a measure not named here keeps its metrics.json key.
NAMES = {
    "train.loss_last": "final train loss",
    "val_loss": "held-out loss",
    "val_ppl": "held-out perplexity",
    "style_ratio": "style ratio (%)",
    "target_ratio": "target ratio",
    "copy_rate": "copy rate",
    "distinct_1": "distinct-1",
    "distinct_2": "distinct-2",
    "exact_match": "exact match",
    "ref_loss": "reference loss",
    "ref_ppl": "reference perplexity",
    "ref_kl": "KL to the starting model",
    "time.train_s": "training-step time (s)",
    "time.fit_s": "fit time (s)",
    "time.median_step_s": "median step time (s)",
    "saving_r_train": "time saving r = (T_A − T_B) / T_A of the training steps (%)",
    "saving_r_fit": "time saving r = (T_A − T_B) / T_A of the fit, before/after probes included (%)",
}
# The freezing pair's savings r: each from one time of metrics.json, and how its sentence names it. The
# training steps are what the write-up times; the fit adds the before/after probes, about equal for A and B.
SAVINGS = {
    "saving_r_train": ("time.train_s", "r of the training steps"),
    "saving_r_fit": ("time.fit_s", "r of the fit"),
}
UNITS = {"style_ratio": "points of style ratio"}
_ORDER = list(NAMES)


def measure_name(measure: str) -> str:
    """'after.style_ratio' → 'style ratio (%) after training'; 'change.val_loss' → '... change from before'."""
    when, _, key = measure.partition(".")
    if when == "after":
        return f"{NAMES.get(key, key)} after training"
    if when == "change":
        return f"{NAMES.get(key, key)}: change from before (after − before)"
    return NAMES.get(measure, measure)


def _order(measure: str) -> tuple[int, int, str]:
    when, _, key = measure.partition(".")
    base = key if when in ("after", "change") else measure
    rank = _ORDER.index(base) if base in _ORDER else len(_ORDER) - 3  # unknown probes before the timings
    return rank, {"after": 0, "change": 1}.get(when, 0), measure


def _number(value: Any) -> float | None:
    """A scalar measure, or a probe's mean over its generation seeds (the per-run value of a probe)."""
    if isinstance(value, dict):
        value = value.get("mean")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def run_measures(run: Run) -> dict[str, float]:
    """Every scalar measure of one run: final train loss, each before/after measure after training and its
    change from before, the time of the training steps, of the fit, and the median step."""
    m = run.metrics
    before, after = m.get("before", {}), m.get("after", {})
    out: dict[str, float] = {}
    found = {"train.loss_last": m.get("train", {}).get("loss_last")}
    for key, value in after.items():
        if key == "step":
            continue
        found[f"after.{key}"] = value
        b, a = _number(before.get(key)), _number(value)
        if a is not None and b is not None:
            found[f"change.{key}"] = a - b
    found |= {f"time.{k}": m.get("time", {}).get(k) for k in ("train_s", "fit_s", "median_step_s")}
    for name, value in found.items():
        number = _number(value)
        if number is not None:
            out[name] = number
    return dict(sorted(out.items(), key=lambda item: _order(item[0])))


def _why_not(value: Any) -> str | None:
    """Why a recorded value is no number the statistics can use (None: it is one)."""
    if isinstance(value, dict):
        value = value.get("mean")
    if value is None:
        return "missing"
    if _number(value) is not None:
        return None
    return "NaN" if isinstance(value, float) and math.isnan(value) else "not a finite number"


def why_missing(run: Run, measure: str) -> str:
    """Why `run` has no value of `measure`: "NaN", "missing" (not recorded), ...; for a change, which side."""
    when, _, key = measure.partition(".")
    if when == "change":
        for side in ("after", "before"):
            why = _why_not(run.metrics.get(side, {}).get(key))
            if why:
                return f"{why} {side} training"
        return "missing"
    section = run.metrics.get(when)
    return _why_not(section.get(key) if isinstance(section, dict) else None) or "missing"


def left_out_json(left_out: dict[int, str]) -> list[dict[str, Any]]:
    """{seed: why} as summary.json lists it (JSON keys are strings; a list keeps seeds numbers)."""
    return [{"seed": s, "why": why} for s, why in sorted(left_out.items())]


def seed_of(run: Run) -> int | None:
    for value in (
        run.metrics.get("seed"),
        run.overrides.get("seed"),
        run.metrics.get("config", {}).get("seed"),
    ):
        try:
            return int(value)
        except (TypeError, ValueError):
            continue
    return None


def _canonical(value: str) -> str:
    """One spelling per value, so that optim.lr=1e-3 and optim.lr=0.001 fall in one group."""
    try:
        return repr(float(value))
    except ValueError:
        return value


@dataclass
class Group:
    """Runs with the same overrides apart from `seed`; `used` maps seed → the completed run in the statistics."""

    overrides: dict[str, str]
    runs: list[Run] = field(default_factory=list)
    label: str = ""
    used: dict[int, Run] = field(default_factory=dict)
    excluded: list[tuple[Run, str]] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return sorted(self.used)

    def values(self, measure: str) -> tuple[list[int], list[float]]:
        """(seeds, values) of one measure over the group's completed runs that have it."""
        pairs = [(s, run_measures(self.used[s]).get(measure)) for s in self.seeds]
        pairs = [(s, v) for s, v in pairs if v is not None]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def left_out(self, measure: str) -> dict[int, str]:
        """{seed: why} of the group's completed runs that have no usable value of `measure`."""
        have = set(self.values(measure)[0])
        return {s: why_missing(self.used[s], measure) for s in self.seeds if s not in have}

    def measures(self) -> list[str]:
        names = {name for run in self.used.values() for name in run_measures(run)}
        return sorted(names, key=_order)


def all_measures(groups: list[Group]) -> list[str]:
    """The measures any group has, in the report's order."""
    return sorted({m for g in groups for m in g.measures()}, key=_order)


def group_runs(runs: list[Run], folder: Path) -> list[Group]:
    """Group runs whose overrides differ only in `seed`, in the order of their first run."""
    groups: dict[frozenset, Group] = {}
    for run in runs:
        rest = {k: v for k, v in run.overrides.items() if k != "seed"}
        key = frozenset((k, _canonical(v)) for k, v in rest.items())
        groups.setdefault(key, Group(rest)).runs.append(run)
    for group in groups.values():
        _choose(group)
    _label(list(groups.values()), folder)
    return list(groups.values())


def _choose(group: Group) -> None:
    """Completed runs, one per seed, enter the statistics; the others are listed with the reason."""
    for run in group.runs:
        seed = seed_of(run)
        if run.status != "completed":
            error = run.metrics.get("error")
            group.excluded.append((run, f"status {run.status}" + (f": {error}" if error else "")))
        elif seed is None:
            group.excluded.append((run, "no seed in its metrics.json or overrides"))
        elif seed in group.used:
            twin = group.used[seed].path.name
            group.excluded.append(
                (run, f"seed {seed} again (as {twin}): the same batches, not a new replicate")
            )
        else:
            group.used[seed] = run


def _label(groups: list[Group], folder: Path) -> None:
    keys = sorted({k for g in groups for k in g.overrides})
    varying = [k for k in keys if len({g.overrides.get(k) for g in groups}) > 1]
    for group in groups:
        parts = [f"{k}={group.overrides[k]}" for k in varying if k in group.overrides]
        group.label = ", ".join(parts) or folder.name


def is_replicated(groups: list[Group]) -> bool:
    """Some setting ran with more than one training seed (completed or not)."""
    return any(len(g.runs) > 1 for g in groups)


@dataclass
class Test:
    """Per-seed differences B − A of one measure, their mean with a t interval, and the sign-flip test."""

    measure: str
    seeds: list[int]
    differences: list[float]
    spread: Spread
    p: float | None  # None with fewer than 2 pairs: one difference has no test
    left_out: dict[int, str] = field(default_factory=dict)  # paired seeds without this measure: why

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": measure_name(self.measure),
            "seeds": self.seeds,
            "differences": self.differences,
            **self.spread.as_dict(),
            "left_out": left_out_json(self.left_out),
            "p_sign_flip": self.p,
            "p_method": None if self.p is None else p_method(len(self.seeds)),
            "smallest_possible_p": smallest_p(len(self.seeds)) if self.seeds else None,
            "sentence": sentence(self),
        }


@dataclass
class Comparison:
    a: Group
    b: Group
    tests: list[Test]
    unpaired: dict[str, list[int]]  # seeds that only one side completed
    other_batches: list[int]  # paired seeds whose two runs have different data fingerprints
    no_fingerprint: dict[int, list[str]]  # paired seeds where a side recorded none: which ("A", "B")

    @property
    def same_batches(self) -> bool | None:
        """Every pair trained on the same batches (False: some did not; None: none differs, some unchecked)."""
        if self.other_batches:
            return False
        return None if self.no_fingerprint or not self.tests else True

    def as_dict(self) -> dict[str, Any]:
        return {
            "a": self.a.label,
            "b": self.b.label,
            "difference": "b - a, seed by seed",
            "paired_seeds": sorted({s for t in self.tests for s in t.seeds}),
            "unpaired_seeds": self.unpaired,
            "same_batches": self.same_batches,
            "seeds_with_different_batches": self.other_batches,
            "seeds_without_fingerprint": sorted(self.no_fingerprint),
            "measures": {t.measure: t.as_dict() for t in self.tests},
        }


def compare(a: Group, b: Group) -> Comparison:
    """B − A seed by seed for every measure both have; the time savings r when they differ only in freeze."""
    paired = sorted(set(a.used) & set(b.used))
    per_seed = {s: (run_measures(a.used[s]), run_measures(b.used[s])) for s in paired}
    measures = [m for m in b.measures() if m in set(a.measures())]
    if differ_only_in_freeze(a, b):
        for ma, mb in per_seed.values():
            for r, (time, _) in SAVINGS.items():
                if ma.get(time) and time in mb:
                    # r compares B with A already: A's 0 makes the "difference" below r itself, seed by seed
                    ma[r], mb[r] = 0.0, 100 * (ma[time] - mb[time]) / ma[time]
        measures += list(SAVINGS)
    tests = []
    for measure in measures:
        pairs = [
            (s, mb[measure] - ma[measure])
            for s, (ma, mb) in per_seed.items()
            if measure in ma and measure in mb
        ]
        if pairs:
            seeds, diffs = [s for s, _ in pairs], [d for _, d in pairs]
            p = sign_flip_p(diffs) if len(diffs) > 1 else None
            left_out = _left_out_of_pairs(a, b, [s for s in paired if s not in seeds], measure)
            tests.append(Test(measure, seeds, diffs, spread(diffs), p, left_out))
    checks = {s: batches_check(a.used[s], b.used[s]) for s in paired}
    other = [s for s, (same, _) in checks.items() if same is False]
    lacking = {s: sides for s, (same, sides) in checks.items() if same is None}
    unpaired = {a.label: sorted(set(a.used) - set(b.used)), b.label: sorted(set(b.used) - set(a.used))}
    return Comparison(a, b, tests, unpaired, other, lacking)


def batches_check(a: Run, b: Run) -> tuple[bool | None, list[str]]:
    """Whether runs A and B trained on the same batches (equal data fingerprints); None when a side recorded
    no fingerprint, with the sides that did not."""
    prints = {"A": a.metrics.get("data_fingerprint"), "B": b.metrics.get("data_fingerprint")}
    lacking = [side for side, x in prints.items() if not x]
    return (None if lacking else prints["A"] == prints["B"]), lacking


def _left_out_of_pairs(a: Group, b: Group, seeds: list[int], measure: str) -> dict[int, str]:
    """{seed: why} for paired seeds without a difference of `measure`: which side lacks it, and why."""
    base = SAVINGS[measure][0] if measure in SAVINGS else measure
    out = {}
    for s in seeds:
        sides = [
            f"{why_missing(g.used[s], base)} in {side}"
            for side, g in (("A", a), ("B", b))
            if base not in run_measures(g.used[s])
        ]
        out[s] = "; ".join(sides) or f"{base} is 0 in A"  # r divides by A's time
    return out


def differ_only_in_freeze(a: Group, b: Group) -> bool:
    """Model A and model B of a freezing study (with any number of seeds each)."""
    keys = set(a.overrides) | set(b.overrides)
    return {k for k in keys if a.overrides.get(k) != b.overrides.get(k)} == {"freeze"}


def comparisons(groups: list[Group], requested: list[str] | None = None) -> list[Comparison]:
    """The comparisons `--compare B:A` names, else every group against the first."""
    if requested:
        return [compare(_select(groups, a), _select(groups, b)) for b, a in map(_split, requested)]
    return [compare(groups[0], g) for g in groups[1:]]


def _split(spec: str) -> tuple[str, str]:
    parts = spec.split(":")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ConfigError(
            f"--compare {spec!r}: write B:A, e.g. --compare 'freeze=upper_qkv:freeze=none' (B − A)"
        )
    return parts[0].strip(), parts[1].strip()


def _select(groups: list[Group], selector: str) -> Group:
    """The one group whose overrides include every key=value of `selector` (comma-separated)."""
    wanted = dict(item.split("=", 1) for item in re.split(r",(?=[\w.+~/-]+=)", selector) if "=" in item)
    if not wanted:
        raise ConfigError(f"--compare: {selector!r} names no override: use key=value, e.g. optim.lr=1e-4")
    found = [
        g
        for g in groups
        if all(_canonical(g.overrides.get(k, "")) == _canonical(v) for k, v in wanted.items())
    ]
    if len(found) != 1:
        known = "; ".join(g.label for g in groups)
        how = "no group" if not found else f"{len(found)} groups"
        raise ConfigError(f"--compare: {selector!r} matches {how}: name exactly one of: {known}")
    return found[0]


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    return f"{x:+.3g}" if abs(x) >= 1e-3 else f"{x:+.2e}"


def _unit(measure: str) -> str:
    """How a difference of `measure` reads: "points of style ratio", "in the change of held-out loss"."""
    when, _, key = measure.partition(".")
    base = key if when in ("after", "change") else measure
    name = UNITS.get(base) or "in " + re.sub(r" \((%|s)\)$", "", NAMES.get(base, base))
    if base.startswith("time."):
        name = "s of " + name[3:]
    return f"{name} change (after − before)" if when == "change" else name


def sentence(test: Test) -> str:
    """One line a reader can quote: the mean difference, its interval, the test, and what it allows to say."""
    n, s = len(test.seeds), test.spread
    # r is already a comparison of B with A: its sentence gives r itself
    lhs, what = (SAVINGS[test.measure][1], "%") if test.measure in SAVINGS else ("B − A", _unit(test.measure))
    if n == 1:
        return f"{lhs}: {_fmt(s.mean)} {what} on seed {test.seeds[0]} (one seed: no interval, no test)"
    if s.std == 0:
        return f"{lhs}: {_fmt(s.mean)} {what} on each of {n} seeds (no spread: identical differences)"
    level = round(100 * LEVEL)
    floor = smallest_p(n)
    # beyond EXACT_UP_TO seeds p is a Monte Carlo estimate: the sentence says so, and its floor
    how = (
        ""
        if n <= EXACT_UP_TO
        else f"; Monte Carlo over 2^16 random sign patterns, smallest p 1/(2^16 + 1) = {floor:.2g}"
    )
    numbers = (
        f"{lhs}: {_fmt(s.mean)} ± {s.half_width:.2g} {what} ({level}% CI, {n} seeds, p = {test.p:.3g}{how})"
    )
    excludes_zero = s.low > 0 or s.high < 0
    if test.p is not None and test.p < 1 - LEVEL and excludes_zero:
        return numbers
    if floor >= 1 - LEVEL:  # n ≤ 5: no outcome of the exact test can reach 0.05
        limit = f"{n} seeds cannot give p < 0.05 (smallest p 2/2^{n} = {floor:.3g})"
        if excludes_zero:
            return numbers + f": the t interval excludes 0, but {limit}: use 6 or more seeds"
        return numbers + f": not distinguishable from noise with {n} seeds; {limit}"
    return numbers + f": not distinguishable from noise with {n} seeds"
