"""The learning-rate study end to end, and the report of any run or sweep folder."""

import json
import signal
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO

SMALL = (
    "data.batch_size=4",
    "data.seq_len=64",
    "data.val_windows=8",
    "eval.max_new_tokens=30",
    "eval.repeats=2",
)


def _report_cli(folder, env):
    return subprocess.run(
        [sys.executable, "-m", "gptft.report", str(folder)], cwd=REPO, env=env, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def sweep(run_ok, tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lr_sweep")
    run_ok(
        "experiment=lr_sweep",
        f"model.name_or_path={tiny_model_dir}",
        "trainer.max_steps=10",
        *SMALL,
        "optim.lr=1e-3,1e-4",
        f"hydra.sweep.dir={folder}",
    )
    return folder


def test_lr_sweep_is_one_hydra_multirun_job_per_lr(sweep):
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert [p.name[:2] for p in jobs] == ["0_", "1_"]  # numbered, then named by the overrides (swept ones first)
    records = [json.loads((p / "metrics.json").read_text()) for p in jobs]
    assert [r["config"]["optim"]["lr"] for r in records] == [1e-3, 1e-4]
    assert all(r["status"] == "completed" for r in records)


def test_lr_sweep_writes_its_report_by_itself(sweep):
    summary = (sweep / "report/summary.md").read_text()
    # The summary table's rows (the learning-vs-forgetting table below it names the runs too).
    rows = [line for line in summary.splitlines() if line.startswith("| optim.lr=") and "completed" in line]
    assert len(rows) == 2 and "| 0.001 |" in rows[0] and "| 0.0001 |" in rows[1]
    assert "→" in rows[0] and "completed" in rows[0]
    for png in ("loss.png", "style_ratio.png"):
        assert (sweep / "report" / png).stat().st_size > 10_000
    metrics = json.loads(next(sweep.glob("0_*/metrics.json")).read_text())
    for when in ("before", "after"):
        assert set(metrics[when]) >= {
            "val_loss",
            "val_ppl",
            "style_ratio",
            "copy_rate",
            "distinct_1",
            "distinct_2",
        }
        assert (
            0 <= metrics[when]["style_ratio"]["mean"] <= 100
            and len(metrics[when]["style_ratio"]["values"]) == 2
        )
    # the same prompts and seeds before training: both fresh copies of the model measure the same
    other = json.loads(next(sweep.glob("1_*/metrics.json")).read_text())
    assert metrics["before"]["style_ratio"] == other["before"]["style_ratio"]


def test_report_in_tensorboard(sweep):
    acc = EventAccumulator(str(sweep / "report/tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert {"report/loss", "report/style_ratio"} <= set(acc.Tags()["images"])
    assert not [p for p in (sweep / "report/tensorboard").iterdir() if p.is_dir()]  # the report: one entry
    jobs = [p.parent for p in sweep.glob("*/metrics.json")]  # the HParams rows: the trainings themselves
    assert len(jobs) == 2 and all(len(list(j.glob("tensorboard/*.gptft_report_hparams"))) == 1 for j in jobs)
    probe = EventAccumulator(str(next(sweep.glob("0_*/tensorboard"))), size_guidance={"scalars": 0})
    probe.Reload()
    assert {"probe/style_ratio", "probe/copy_rate", "probe/distinct_2"} <= set(probe.Tags()["scalars"])


def test_report_cli_reproduces_the_sweep_report(sweep, gptft_env):
    before = (sweep / "report/summary.md").read_text()
    result = _report_cli(sweep, gptft_env)
    assert result.returncode == 0, result.stderr
    assert (sweep / "report/summary.md").read_text() == before
    assert "| optim.lr=0.001 |" in result.stdout


def test_report_of_an_empty_folder(tmp_path, gptft_env):
    result = _report_cli(tmp_path, gptft_env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"gptft.report: error: {tmp_path} holds no runs (no metrics.json or .hydra/ under it): give a run or sweep folder from outputs/"
    ]


def test_report_of_runs_that_died(tmp_path, gptft_env):
    """A run killed mid-training and one that never started: report what exists, say what is missing."""
    env = {**gptft_env}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gptft.run",
            "debug=fast",
            "trainer.max_steps=100000",
            f"hydra.run.dir={killed}",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            metrics = killed / "metrics.json"
            if metrics.is_file() and "before" in json.loads(metrics.read_text()):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the run never wrote its before-training probe")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # A run that died before training: Hydra made its folder (.hydra/ and an empty run.log), nothing more. (A
    # refused setting leaves no folder at all: tests/test_first_hour.py.)
    never = tmp_path / "never"
    (never / ".hydra").mkdir(parents=True)
    (never / ".hydra" / "overrides.yaml").write_text("- debug=fast\n- optim.lr=0\n")
    (never / "run.log").write_text("")
    result = _report_cli(tmp_path, gptft_env)
    assert result.returncode == 0, result.stderr
    summary = (tmp_path / "report/summary.md").read_text()
    # runs are named by the overrides that tell them apart
    assert "| trainer.max_steps=100000 | 0.0001 | running |" in summary and "| optim.lr=0 |" in summary
    assert (
        "trainer.max_steps=100000: status running (still running, or killed before it could say so); missing: after"
        in summary
    )
    assert "optim.lr=0: no metrics.json: it stopped before training started" in summary


def test_only_a_freezing_pair_gets_the_paired_section(tmp_path):
    from gptft.report.collect import Run, is_paired

    def run(**overrides):
        return Run(tmp_path, overrides={"trainer.max_steps": "10", **overrides})

    assert is_paired([run(freeze="none"), run(freeze="upper_qkv")])
    assert not is_paired([run(**{"optim.lr": "1e-6"}), run(**{"optim.lr": "1e-4"})])  # an lr sweep of two
    assert not is_paired(
        [run(freeze="none", **{"optim.lr": "1"}), run(freeze="upper_qkv", **{"optim.lr": "2"})]
    )
    assert not is_paired([run(freeze="none")])
