"""Training replicates: the freezing pair × 3 seeds of the tiny model, grouped and compared seed by seed."""

import json
import math
import shutil
import statistics

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptft.report.__main__ import main as report_main
from gptft.report.stats import sign_flip_p, smallest_p, spread, t_quantile
from gptft.report.write import write_report

# As cheap as a real run gets: 4 steps of 2 × 32 tokens, 2 validation windows, 2 free prompts of 8 tokens.
SWEEP = (
    "-m",
    "debug=fast",
    "freeze=none,upper_qkv",
    "seed=range(1,4)",  # Hydra's own sweep syntax: seeds 1, 2, 3
    "trainer.max_steps=4",
    "eval.repeats=1",
    "eval.max_new_tokens=8",
    "eval.free_prompts=2",
    "data.val_windows=2",
    "data.seq_len=32",
    "data.batch_size=2",
)
T_975_2 = 4.303  # Student t, 97.5% quantile, 2 degrees of freedom (any statistics table)


@pytest.fixture(scope="module")
def sweep(run_ok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("replicates")
    run_ok(*SWEEP, f"hydra.sweep.dir={folder}", timeout=900)
    return folder


def _raw(folder):
    """{(freeze, seed): metrics.json} of every run, read straight from the run folders."""
    return {
        (_freeze(f), json.loads(f.read_text())["seed"]): json.loads(f.read_text())
        for f in folder.glob("*/metrics.json")
    }


def _freeze(metrics_file):
    overrides = (metrics_file.parent / ".hydra/overrides.yaml").read_text()
    return next(line.split("=", 1)[1] for line in overrides.splitlines() if line.startswith("- freeze="))


def _value(m, measure):
    """The per-run value the issue asks for, from the raw metrics.json."""
    when, key = measure.split(".", 1)
    if when == "train":
        return m["train"][key]
    if when == "time":
        return m["time"][key]
    after = m["after"][key]
    after = statistics.fmean(after["values"]) if isinstance(after, dict) else after
    if when == "after":
        return after
    before = m["before"][key]
    return after - (statistics.fmean(before["values"]) if isinstance(before, dict) else before)


def _replicates(text, end="## Samples"):
    """The report's replicate sections (the samples below them are free text)."""
    return text[text.index("## Replicates") : text.index(end)]


def _copy(sweep, target):
    """The sweep's run folders without their weights (the report never reads them)."""
    shutil.copytree(sweep, target, ignore=shutil.ignore_patterns("checkpoints", "hf_model", "report"))
    return target


def _set_status(folder, freeze, seed, status):
    for file in folder.glob("*/metrics.json"):
        m = json.loads(file.read_text())
        if m["seed"] == seed and _freeze(file) == freeze:
            m |= {"status": status, "error": "killed by the test"}
            file.write_text(json.dumps(m))
            return file.parent
    raise AssertionError(f"no run freeze={freeze} seed={seed}")


MEASURES = ("train.loss_last", "after.val_loss", "after.val_ppl", "after.style_ratio", "change.style_ratio")


def test_groups_and_intervals_match_the_runs_metrics(sweep):
    raw = _raw(sweep)
    assert len(raw) == 6 and {seed for _, seed in raw} == {1, 2, 3}
    summary = json.loads((sweep / "report/summary.json").read_text())  # written by the sweep's own callback
    groups = {g["label"]: g for g in summary["groups"]}
    assert list(groups) == ["freeze=none", "freeze=upper_qkv"]
    for freeze in ("none", "upper_qkv"):
        group = groups[f"freeze={freeze}"]
        assert group["n"] == 3 and group["seeds"] == [1, 2, 3] and group["excluded"] == []
        for measure in (*MEASURES, "time.fit_s"):
            values = [_value(raw[(freeze, s)], measure) for s in (1, 2, 3)]
            got = group["measures"][measure]
            assert got["values"] == pytest.approx(values)
            assert got["mean"] == pytest.approx(statistics.mean(values))
            assert got["std"] == pytest.approx(statistics.stdev(values))
            half = T_975_2 * statistics.stdev(values) / math.sqrt(3)
            assert got["ci95_half_width"] == pytest.approx(half, rel=1e-3)
            mean = statistics.mean(values)
            assert got["ci95"] == pytest.approx([mean - half, mean + half], abs=1e-3 * half + 1e-12)
    text = (sweep / "report/summary.md").read_text()
    assert "## Replicates: mean over training seeds" in text
    assert "| measure | freeze=none (n = 3) | freeze=upper_qkv (n = 3) |" in text
    train = groups["freeze=none"]["measures"]["train.loss_last"]
    assert f"| final train loss | {train['mean']:.4g} ± {train['std']:.2g} [{train['ci95'][0]:.4g}, " in text
    assert "nan" not in _replicates(text).lower()
    for png in ("loss.png", "style_ratio.png", "loss_b_vs_a.png"):  # means with bands; B vs A per seed
        assert (sweep / "report" / png).stat().st_size > 10_000


def test_paired_differences_seed_by_seed(sweep):
    raw = _raw(sweep)
    summary = json.loads((sweep / "report/summary.json").read_text())
    (pair,) = summary["comparisons"]
    assert (pair["a"], pair["b"]) == ("freeze=none", "freeze=upper_qkv")
    assert pair["paired_seeds"] == [1, 2, 3] and pair["same_batches"] is True
    for measure in MEASURES:
        diffs = [
            _value(raw[("upper_qkv", s)], measure) - _value(raw[("none", s)], measure) for s in (1, 2, 3)
        ]
        got = pair["measures"][measure]
        assert got["seeds"] == [1, 2, 3] and got["differences"] == pytest.approx(diffs)
        assert got["mean"] == pytest.approx(statistics.mean(diffs))
        assert got["smallest_possible_p"] == 0.25
    # Freezing all but one block's q/k/v learns less in 4 steps on every seed: the extreme sign pattern
    train = pair["measures"]["train.loss_last"]
    assert all(d > 0 for d in train["differences"]) and train["p_sign_flip"] == 0.25
    assert "3 seeds cannot give p < 0.05 (smallest p 2/2^3 = 0.25)" in train["sentence"]
    # the freezing study's time saving r, seed by seed
    r = pair["measures"]["saving_r_fit"]
    fit = {k: m["time"]["fit_s"] for k, m in raw.items()}
    expected = [100 * (fit[("none", s)] - fit[("upper_qkv", s)]) / fit[("none", s)] for s in (1, 2, 3)]
    assert r["differences"] == pytest.approx(expected) and r["sentence"].startswith("r of the fit: ")
    text = (sweep / "report/summary.md").read_text()
    assert "### B = freeze=upper_qkv against A = freeze=none" in text and train["sentence"] in text
    # TensorBoard: the report's one entry holds summary.md (groups, intervals, tests) as text, no one-point charts;
    # the HParams rows are the 6 trainings
    board = sweep / "report/tensorboard"
    assert not [p for p in board.iterdir() if p.is_dir()]
    acc = EventAccumulator(str(board), size_guidance={"tensors": 0})
    acc.Reload()
    assert acc.Tags()["scalars"] == []
    (shown,) = acc.Tensors("report/summary/text_summary")
    assert shown.tensor_proto.string_val[0].decode() == text
    assert len(list(sweep.glob("*/tensorboard/*.gptft_report_hparams"))) == 6


def test_failed_runs_are_named_and_left_out(sweep, tmp_path):
    folder = _copy(sweep, tmp_path / "one_failed")
    failed = _set_status(folder, "upper_qkv", 2, "failed")
    text = write_report(folder)
    summary = json.loads((folder / "report/summary.json").read_text())
    group = summary["groups"][1]
    assert group["n"] == 2 and group["seeds"] == [1, 3]
    assert group["excluded"] == [
        {"run": "freeze=upper_qkv, seed=2", "path": str(failed), "why": "status failed: killed by the test"}
    ]
    raw = _raw(folder)
    values = [_value(raw[("upper_qkv", s)], "after.val_loss") for s in (1, 3)]
    assert group["measures"]["after.val_loss"]["mean"] == pytest.approx(statistics.mean(values))
    (pair,) = summary["comparisons"]
    assert pair["paired_seeds"] == [1, 3] and pair["unpaired_seeds"] == {
        "freeze=none": [2],
        "freeze=upper_qkv": [],
    }
    assert pair["measures"]["train.loss_last"]["smallest_possible_p"] == 0.5
    assert f"excluded: freeze=upper_qkv, seed=2 (status failed: killed by the test), {failed}" in text
    assert "freeze=upper_qkv, seed=2: status failed (killed by the test)" in text  # and in "Missing"

    # Two more failures leave a group of one: its values, no interval, no test, never a NaN or a zero spread.
    _set_status(folder, "upper_qkv", 3, "interrupted")
    text = write_report(folder)
    summary = json.loads((folder / "report/summary.json").read_text())
    one = summary["groups"][1]["measures"]["train.loss_last"]
    assert one["n"] == 1 and one["std"] is None and one["ci95"] is None
    assert f"{one['mean']:.4g} (n = 1: no interval)" in text
    only = summary["comparisons"][0]["measures"]["train.loss_last"]
    assert only["p_sign_flip"] is None and "(one seed: no interval, no test)" in only["sentence"]
    section = _replicates(text)
    assert "nan" not in section.lower()
    rows = [
        line.split(" | ")
        for line in _replicates(text, "## Paired").splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    assert rows[0][-1] == "freeze=upper_qkv (n = 1) |"
    assert all(
        row[-1] in ("– |", "(n = 1: no interval) |") or row[-1].endswith("(n = 1: no interval) |")
        for row in rows[1:]
    )


def test_compare_names_the_pairs(sweep, tmp_path, capsys):
    folder = _copy(sweep, tmp_path / "compare")
    assert report_main([str(folder), "--compare", "freeze=none:freeze=upper_qkv"]) == 0
    (pair,) = json.loads((folder / "report/summary.json").read_text())["comparisons"]
    assert (pair["b"], pair["a"]) == ("freeze=none", "freeze=upper_qkv")
    assert "saving_r_fit" in pair["measures"]
    capsys.readouterr()
    assert report_main([str(folder), "--compare", "freeze=lora:freeze=none"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "gptft.report: error: --compare: 'freeze=lora' matches no group: name exactly one of: freeze=none; "
        "freeze=upper_qkv"
    ]


def test_student_t_and_sign_flip_against_tables():
    assert t_quantile(0.975, 2) == pytest.approx(4.303, abs=5e-4)
    assert t_quantile(0.975, 4) == pytest.approx(2.776, abs=5e-4)
    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=5e-4)
    assert t_quantile(0.975, 29) == pytest.approx(2.045, abs=5e-4)
    assert t_quantile(0.025, 9) == pytest.approx(-2.262, abs=5e-4)
    # 3 positive differences: only "all +" and "all −" of the 8 sign patterns are as extreme: p = 2/8
    assert sign_flip_p([0.3, 0.1, 0.2]) == 0.25 == smallest_p(3)
    # 1, −2, 3: |±1 ± 2 ± 3| ≥ 2 for 6 of the 8 patterns (only 1 + 2 − 3 and its negation give 0)
    assert sign_flip_p([1.0, -2.0, 3.0]) == 0.75
    assert sign_flip_p([1.0] * 5) == 0.0625 and sign_flip_p([2.0] * 6) == 0.03125
    assert sign_flip_p([0.0, 0.0]) == 1.0
    one = spread([7.0])
    assert (one.n, one.mean, one.std, one.low) == (1, 7.0, None, None)
