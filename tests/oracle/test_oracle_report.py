"""The report's numbers against an independent computation.

The report's input is files, so these tests write run folders the way runs write them (`.hydra/overrides.yaml`,
`metrics.json` with NaN written as `NaN`, TensorBoard events for the loss curve), run the report, and recompute
every group and comparison number from the same files with numpy / statistics / mpmath / itertools: group mean,
sample std and 95% t interval (mpmath's t quantile), B − A seed by seed, the sign-flip p by brute force over all
2^n sign patterns, the freezing pair's time saving r of the training steps and of the fit. Nothing here imports
gptft's arithmetic; gptft is only run (`write_report`) and read (`summary.json`, `summary.md`, the loss figure).
"""

import itertools
import json
import math
import random
import statistics

import numpy as np
import pytest
import yaml

from gptft.report import write as report_write
from gptft.report.write import write_report

from independent import t_quantile

EXACT = dict(rel=1e-9, abs=1e-12)
SEEDS = [s for s in range(1, 13) if s != 5]  # 11 seeds, not consecutive: seeds are names, not positions
PROBES = ("style_ratio", "copy_rate", "distinct_2")
NAN_SEED, MISSING_SEED = 4, 6  # in B: after.val_loss (and val_ppl) NaN; after.ref_kl not recorded
OTHER_BATCHES_SEED, NO_PRINT_SEED = 2, 3  # B's fingerprint differs from A's; B recorded none
CRASH_LOSS = 100.0  # the crashed rerun's loss curve, far from every completed one


def _write_run(folder, overrides, metrics, losses=None):
    """A run folder as gptft leaves it: the overrides Hydra saved, metrics.json, and the train-loss events."""
    (folder / ".hydra").mkdir(parents=True)
    items = [f"{k}={v}" for k, v in overrides.items()]
    (folder / ".hydra/overrides.yaml").write_text(yaml.safe_dump(items))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))  # NaN as NaN, as json.dumps writes it
    if losses is not None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(folder / "tensorboard")) as writer:
            for step, loss in enumerate(losses):
                writer.add_scalar("train/loss", loss, step)


def _probe(rng, centre, repeats, std_of_one):
    """A probe's record: mean and std over generation repeats; one repeat has no std (`null` or the old 0.0)."""
    values = [centre + rng.gauss(0, 1) for _ in range(repeats)]
    std = statistics.stdev(values) if repeats > 1 else std_of_one
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def _metrics(seed, rng, *, repeats=3, std_of_one=None, slower=1.0):
    """A completed run's metrics.json: measures before and after, times, the data fingerprint."""
    before_loss, after_loss = 6.4 + rng.gauss(0, 0.01), 6.3 + rng.gauss(0, 0.05)
    train_s = slower * (50 + rng.gauss(0, 2))
    val_s, probes_s = 1 + rng.random(), 8 + rng.random()  # fit_s counts the before/after probes too

    def when(loss, step):
        measures = {"step": step, "val_loss": loss, "val_ppl": math.exp(loss)}
        measures |= {p: _probe(rng, 50 if p == "style_ratio" else 0.5, repeats, std_of_one) for p in PROBES}
        return measures | {"ref_loss": 5 + rng.random(), "ref_ppl": 150 + rng.random()}

    after = when(after_loss, 40) | {"ref_kl": 1e-3 * rng.random()}
    return {
        "status": "completed",
        "seed": seed,
        "config": {"seed": seed, "optim": {"lr": 5e-4}},
        "before": when(before_loss, 0),
        "train": {"loss_first": 6.5 + rng.random(), "loss_last": after_loss + rng.gauss(0, 0.1)},
        "steps": 40,
        "time": {
            "train_s": train_s,
            "val_s": val_s,
            "median_step_s": train_s / 40,
            "fit_s": train_s + val_s + probes_s,
        },
        "data_fingerprint": f"{seed:016x}",
        "after": after,
    }


def _losses(rng):
    return [6.5 - 0.01 * step + rng.gauss(0, 0.02) for step in range(10)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The freezing pair × 11 seeds, with what goes wrong in practice: a NaN, a measure not recorded, one
    pair's batches differing, one fingerprint missing, a single generation repeat (B), a crashed rerun of seed 1
    in a later sweep folder. Returns (folder, raw metrics by (arm, seed), loss curves by (arm, seed), report
    text, the figures the report drew)."""
    root = tmp_path_factory.mktemp("oracle_report")
    rng = random.Random(25)
    raw, curves = {}, {}
    for i, (arm, seed) in enumerate(itertools.product(("none", "upper_qkv"), SEEDS)):
        b = arm == "upper_qkv"
        m = _metrics(
            seed, rng, repeats=1 if b else 3, std_of_one=None if seed % 2 else 0.0, slower=0.6 if b else 1
        )
        if b and seed == NAN_SEED:
            m["after"]["val_loss"] = m["after"]["val_ppl"] = float("nan")
        if b and seed == MISSING_SEED:
            del m["after"]["ref_kl"]
        if b and seed == OTHER_BATCHES_SEED:
            m["data_fingerprint"] = "0123456789abcdef"
        if b and seed == NO_PRINT_SEED:
            del m["data_fingerprint"]
        raw[(arm, seed)], curves[(arm, seed)] = m, _losses(rng)
        _write_run(
            root / "multirun_1" / f"{i}_freeze={arm},seed={seed}",
            {"freeze": arm, "seed": seed},
            m,
            curves[(arm, seed)],
        )
    crashed = {"status": "failed", "error": "RuntimeError: killed", "seed": 1, "config": {"seed": 1}}
    _write_run(
        root / "multirun_2" / "0_freeze=none,seed=1",
        {"freeze": "none", "seed": 1},
        crashed,
        [CRASH_LOSS] * 10,
    )
    drawn = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            report_write, "png_bytes", lambda fig, keep=report_write.png_bytes: drawn.append(fig) or keep(fig)
        )
        text = write_report(root)
    return root, raw, curves, text, drawn


def _summary(folder):
    return json.loads((folder / "report/summary.json").read_text())


def _value(m, measure):
    """A run's value of `measure` from its metrics.json (None when not recorded; NaN stays NaN)."""
    when, key = measure.split(".", 1)
    if when == "change":
        after, before = _value(m, f"after.{key}"), _value(m, f"before.{key}")
        return None if after is None or before is None else after - before
    value = m.get(when, {}).get(key)
    return statistics.fmean(value["values"]) if isinstance(value, dict) else value


def _measures(m):
    """The measure names the report gives a run: train loss, each after and change, the three times."""
    names = {"train.loss_last", "time.train_s", "time.fit_s", "time.median_step_s"}
    names |= {f"after.{k}" for k in m["after"] if k != "step"}
    return names | {f"change.{k}" for k in m["after"] if k in m["before"] and k != "step"}


def _finite(x):
    return x is not None and math.isfinite(x)


def _t_interval(values):
    """Mean, sample std and the 95% Student-t interval of the mean, with an independent t quantile (mpmath's incomplete beta)."""
    n, mean, std = len(values), float(np.mean(values)), float(np.std(values, ddof=1))
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return mean, std, half


def _sign_flip_p(d):
    """Two-sided sign-flip p by brute force: the share of all 2^n sign patterns whose |mean| ≥ the observed."""
    observed = abs(math.fsum(d))
    hits = sum(
        abs(math.fsum(s * x for s, x in zip(signs, d, strict=True))) >= observed * (1 - 1e-12)
        for signs in itertools.product((1, -1), repeat=len(d))
    )
    return hits / 2 ** len(d)


def _cells(line):
    """The cells of a Markdown table row."""
    return line.strip().strip("|").strip().split(" | ")


def _check_spread(got, values):
    mean, std, half = _t_interval(values)
    assert got["n"] == len(values)
    assert got["mean"] == pytest.approx(mean, **EXACT) and got["std"] == pytest.approx(std, **EXACT)
    assert got["ci95_half_width"] == pytest.approx(half, **EXACT)
    assert got["ci95"] == pytest.approx([mean - half, mean + half], **EXACT)


def test_group_mean_std_and_t_interval(sweep):
    folder, raw, _, text, _ = sweep
    groups = {g["label"]: g for g in _summary(folder)["groups"]}
    assert list(groups) == ["freeze=none", "freeze=upper_qkv"]
    for arm in ("none", "upper_qkv"):
        group = groups[f"freeze={arm}"]
        assert (
            group["n"] == len(SEEDS) and group["seeds"] == SEEDS and len(group["excluded"]) == (arm == "none")
        )
        names = set().union(*(_measures(raw[(arm, s)]) for s in SEEDS))
        assert set(group["measures"]) == names
        for measure in names:
            per_seed = {s: _value(raw[(arm, s)], measure) for s in SEEDS}
            seeds = [s for s in SEEDS if _finite(per_seed[s])]
            got = group["measures"][measure]
            assert got["seeds"] == seeds and got["values"] == pytest.approx(
                [per_seed[s] for s in seeds], **EXACT
            )
            _check_spread(got, [per_seed[s] for s in seeds])
            # a seed left out of one cell is named there, with why
            why = {s: "missing" if per_seed[s] is None else "NaN" for s in SEEDS if s not in seeds}
            if measure.startswith("change."):  # which side: here only ever after training
                why = {s: f"{w} after training" for s, w in why.items()}
            assert {d["seed"]: d["why"] for d in got["left_out"]} == why, measure


def test_a_cell_with_a_seed_left_out_says_its_n_and_why(sweep):
    folder, _, _, text, _ = sweep
    b = next(g for g in _summary(folder)["groups"] if g["label"] == "freeze=upper_qkv")
    loss = b["measures"]["after.val_loss"]
    assert (loss["n"], loss["left_out"]) == (10, [{"seed": NAN_SEED, "why": "NaN"}])
    assert b["measures"]["after.ref_kl"]["left_out"] == [{"seed": MISSING_SEED, "why": "missing"}]
    assert b["measures"]["change.val_loss"]["left_out"] == [{"seed": NAN_SEED, "why": "NaN after training"}]
    header = next(line for line in text.splitlines() if line.startswith("| measure | freeze=none"))
    assert header.endswith("| freeze=none (n = 11) | freeze=upper_qkv (n = 11) |")
    row = next(line for line in text.splitlines() if line.startswith("| held-out loss after training |"))
    cell_a, cell_b = _cells(row)[1:3]
    assert "left out" not in cell_a
    assert cell_b.endswith(f"n = 10, left out: seed {NAN_SEED} (NaN)")
    assert cell_b.startswith(f"{loss['mean']:.4g} ± {loss['std']:.2g} [{loss['ci95'][0]:.4g}, ")


def test_paired_differences_interval_and_sign_flip_p(sweep):
    folder, raw, _, text, _ = sweep
    (pair,) = _summary(folder)["comparisons"]
    assert (pair["a"], pair["b"]) == ("freeze=none", "freeze=upper_qkv")
    names = {m for s in SEEDS for m in _measures(raw[("none", s)]) & _measures(raw[("upper_qkv", s)])}
    assert set(pair["measures"]) == names | {"saving_r_train", "saving_r_fit"}
    for measure in names:
        diffs = {
            s: _value(raw[("upper_qkv", s)], measure) - _value(raw[("none", s)], measure)
            for s in SEEDS
            if _finite(_value(raw[("upper_qkv", s)], measure))
        }
        got = pair["measures"][measure]
        assert got["seeds"] == list(diffs) and got["differences"] == pytest.approx(
            list(diffs.values()), **EXACT
        )
        _check_spread(got, list(diffs.values()))
        assert got["p_sign_flip"] == pytest.approx(_sign_flip_p(list(diffs.values())), **EXACT), measure
        assert got["smallest_possible_p"] == 2 / 2 ** len(diffs) and got["p_method"].startswith("exact")
    left = pair["measures"]["after.val_loss"]["left_out"]
    assert left == [{"seed": NAN_SEED, "why": "NaN in B"}]


@pytest.mark.parametrize("which,key", [("train", "train_s"), ("fit", "fit_s")])
def test_freezing_pair_saving_r_of_the_training_steps_and_of_the_fit(sweep, which, key):
    folder, raw, _, text, _ = sweep
    (pair,) = _summary(folder)["comparisons"]
    r = [
        100
        * (raw[("none", s)]["time"][key] - raw[("upper_qkv", s)]["time"][key])
        / raw[("none", s)]["time"][key]
        for s in SEEDS
    ]
    got = pair["measures"][f"saving_r_{which}"]
    assert got["seeds"] == SEEDS and got["differences"] == pytest.approx(r, **EXACT)
    _check_spread(got, r)
    assert got["p_sign_flip"] == pytest.approx(_sign_flip_p(r), **EXACT)
    what = {"train": "r of the training steps", "fit": "r of the fit"}[which]
    assert got["sentence"].startswith(f"{what}: ") and got["sentence"] in text


def test_each_pair_with_other_batches_or_no_fingerprint_is_named(sweep):
    folder, _, _, text, _ = sweep
    (pair,) = _summary(folder)["comparisons"]
    assert pair["same_batches"] is False
    assert pair["seeds_with_different_batches"] == [OTHER_BATCHES_SEED]
    assert pair["seeds_without_fingerprint"] == [NO_PRINT_SEED]
    assert f"- seed {OTHER_BATCHES_SEED}: A and B trained on DIFFERENT batches (data fingerprint)" in text
    assert (
        f"- seed {NO_PRINT_SEED}: no data fingerprint in B's metrics.json: same batches not checked" in text
    )


def test_the_loss_figure_draws_only_the_runs_in_the_statistics(sweep):
    """A crashed rerun of seed 1 (same overrides, later sweep folder) is excluded from the numbers: the mean
    curve must not average it in either."""
    folder, _, curves, _, drawn = sweep
    (ax,) = next(f for f in drawn if f.axes[0].get_title().startswith("Train loss: mean")).axes
    lines = {line.get_label().split(" (")[0]: line for line in ax.get_lines()}
    for arm in ("none", "upper_qkv"):
        expected = np.mean([curves[(arm, s)] for s in SEEDS], axis=0)
        line = lines[f"freeze={arm}"]
        assert line.get_label().endswith(f"(mean of {len(SEEDS)} seeds)")
        assert list(line.get_xdata()) == list(range(10))
        assert line.get_ydata() == pytest.approx(expected, rel=1e-6)  # TensorBoard stores float32


def test_one_generation_repeat_shows_no_spread(sweep, tmp_path):
    """The per-run table: `mean ± std` for 3 repeats; the mean alone for 1 (std null or the old 0.0)."""
    _, raw, _, text, _ = sweep
    table = [_cells(line) for line in text.split("## Replicates")[0].splitlines() if line.startswith("| ")]
    column, status = (table[0].index(c) for c in ("style ratio % before → after", "status"))
    rows = {r[0]: r[column] for r in table[1:] if r[status] == "completed"}  # not seed 1's crashed rerun
    for s in SEEDS:
        a, b = raw[("none", s)]["after"]["style_ratio"], raw[("upper_qkv", s)]["after"]["style_ratio"]
        assert rows[f"freeze=none, seed={s}"].endswith(f"→ {a['mean']:.3g} ± {a['std']:.2g}")
        assert rows[f"freeze=upper_qkv, seed={s}"].endswith(f"→ {b['mean']:.3g}"), rows
    # one seed of the freezing pair, one repeat each (std null): the runs' own figures (bars per run) draw, no
    # spread is shown, and the A/B section gives both savings r
    rng, pair = random.Random(6), tmp_path / "pair"
    times = {}
    for arm, slower in (("none", 1.0), ("upper_qkv", 0.6)):
        m = _metrics(1, rng, repeats=1, std_of_one=None, slower=slower)
        _write_run(pair / arm, {"freeze": arm, "seed": 1}, m, _losses(rng))
        times[arm] = m["time"]
    text = write_report(pair)
    rows = [_cells(line) for line in text.split("\n\n")[1].splitlines()[2:]]  # the per-run table
    assert len(rows) == 2 and all("→" in row[7] and not any("±" in cell for cell in row) for row in rows), (
        rows
    )
    for key, what in (("train_s", "time of the training steps"), ("fit_s", "wall time of the fit")):
        a, b = times["none"][key], times["upper_qkv"][key]
        assert f"- {what}" in text and f"saving r = (T_A − T_B) / T_A = {100 * (a - b) / a:.1f}%" in text
    assert (pair / "report/style_ratio.png").stat().st_size > 10_000


def test_beyond_16_seeds_the_p_is_monte_carlo_and_says_its_floor(tmp_path):
    rng = random.Random(20)
    for lr in ("1e-4", "1e-3"):
        for seed in range(1, 21):
            m = _metrics(seed, rng)
            m["after"]["val_loss"] += 1.0 if lr == "1e-3" else 0.0  # B − A > 0 on every seed
            _write_run(tmp_path / f"{lr}_{seed}", {"optim.lr": lr, "seed": seed}, m)
    text = write_report(tmp_path)
    (pair,) = _summary(tmp_path)["comparisons"]
    got = pair["measures"]["after.val_loss"]
    floor = 1 / (2**16 + 1)
    assert len(got["seeds"]) == 20 and got["smallest_possible_p"] == floor
    assert "Monte Carlo" in got["p_method"] and "2^16" in got["p_method"]
    # every pattern but the observed one and its negation gives a smaller |mean|; 2^16 random draws can at best
    # show the observed one: p = 1/(2^16 + 1), never the exact 2/2^20 = 1.9e-6
    assert floor <= got["p_sign_flip"] < 2e-4
    assert "Monte Carlo" in got["sentence"] and "1/(2^16 + 1)" in got["sentence"]
    assert got["sentence"] in text and "Monte Carlo" in _summary(tmp_path)["test"]
    note = text[text.index("## Paired comparisons") :].split("\n\n")[1]
    assert "Monte Carlo" in note and "1/(2^16 + 1)" in note
