"""`python -m gptft.search`: an Optuna study of tiny gptft runs that prunes a bad trial at a validation point,
is killed mid-trial, and continues from its SQLite file to its budget without rerunning finished trials; and
bad search definitions that fail in a line before any trial runs."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from gptft import search

from conftest import REPO

# 4 steps, validation (and so a pruning point) every 2; one generation seed; no reference probe.
TRIAL = [
    "debug=fast", "eval.repeats=1", "eval.free_prompts=2", "eval.max_new_tokens=8", "~callbacks.reference",
    "data.val_windows=4", "trainer.max_steps=4", "trainer.val_check_interval=2",
]  # fmt: skip
# 1e-7 barely moves the loss, so after one finished trial at 3e-3 the median pruner stops it at step 2. With
# seed 0, Optuna's sampler draws 1e-7, 3e-3, 1e-7, ... (its startup trials are random draws).
SPACE = ["--space", "optim.lr=choice(3e-3,1e-7)", "--startup-trials", "1", "--seed", "0"]


def _states(db: Path) -> list[str]:
    try:
        with sqlite3.connect(db, timeout=30) as con:
            return [row[0] for row in con.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.OperationalError:  # not created yet
        return []


@pytest.fixture(scope="module")
def study(gptft_env, tmp_path_factory):
    """The study run as a user would: killed (SIGKILL) during its third trial, then the same command again."""
    folder = tmp_path_factory.mktemp("search") / "study"
    command = [sys.executable, "-m", "gptft.search", *TRIAL, *SPACE, "--trials", "4", "--heartbeat", "1",
               "--study-dir", str(folder)]  # fmt: skip
    with open(folder.parent / "first.log", "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=gptft_env, stdout=log, stderr=log)
        try:
            end = time.monotonic() + 900
            while time.monotonic() < end and proc.poll() is None:
                states = _states(folder / "study.db")
                started = any(folder.glob("002_*/.hydra/config.yaml"))  # the third trial has its settings
                if states.count("COMPLETE") + states.count("PRUNED") >= 2 and "RUNNING" in states and started:
                    break
                time.sleep(0.3)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, (folder.parent / "first.log").read_text()[-3000:]
    before = {
        p.parent.name: p.stat().st_mtime_ns for p in folder.glob("*/metrics.json") if p.parent.name < "002"
    }
    again = subprocess.run(command, cwd=REPO, env=gptft_env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    loaded = optuna.load_study(study_name="gptft", storage=f"sqlite:///{folder / 'study.db'}")
    return folder, loaded, before, again.stdout


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_study_continues_to_its_budget_after_a_kill(study):
    folder, loaded, before, _ = study
    by_state = {s: [t for t in loaded.trials if t.state == s] for s in optuna.trial.TrialState}
    finished = by_state[optuna.trial.TrialState.COMPLETE] + by_state[optuna.trial.TrialState.PRUNED]
    assert len(finished) == 4  # the budget, counted over both invocations
    # The trial killed mid-run was failed by its stale heartbeat and retried with the same settings ...
    (killed,) = by_state[optuna.trial.TrialState.FAIL]
    retried = [t for t in finished if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
               == killed.number]  # fmt: skip
    assert len(retried) == 1 and retried[0].params == killed.params
    # ... and the trials finished before the kill were not run again: their runs are untouched.
    assert set(before) == {Path(t.user_attrs["run_dir"]).name for t in finished if t.number < 2}
    for name, mtime in before.items():
        assert (folder / name / "metrics.json").stat().st_mtime_ns == mtime
    folders = sorted(p.name for p in folder.iterdir() if (p / ".hydra").is_dir())
    assert len(folders) == 5 and folders[0].startswith("000_optim.lr=")  # 4 finished + the killed one


def test_bad_trials_are_pruned_at_a_validation_point(study):
    _, loaded, _, _ = study
    pruned = loaded.get_trials(states=(optuna.trial.TrialState.PRUNED,))
    assert pruned and all(t.params["optim.lr"] == 1e-7 for t in pruned)
    for t in pruned:
        assert list(t.intermediate_values) == [2]  # reported at the global step, stopped at the first point
        metrics = json.loads((Path(t.user_attrs["run_dir"]) / "metrics.json").read_text())
        assert metrics["status"] == "pruned" and metrics["steps"] < 4
    complete = loaded.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    best = loaded.best_trial
    assert best.params["optim.lr"] == 3e-3
    for t in complete:  # the objective is the run's own held-out loss, from its metrics.json
        metrics = json.loads((Path(t.user_attrs["run_dir"]) / "metrics.json").read_text())
        assert metrics["status"] == "completed" and t.value == metrics["after"]["val_loss"]
        assert list(t.intermediate_values) == [2, 4]
        assert search.measure(metrics, "after.style_ratio") == metrics["after"]["style_ratio"]["mean"]


def test_study_ends_with_report_best_settings_and_figures(study):
    folder, loaded, _, stdout = study
    report = folder / "report"
    for name in ("summary.md", "loss.png", "search.md", "history.png", "importances.png"):
        assert (report / name).is_file(), name
    text = (report / "search.md").read_text()
    assert f"**Best**: trial {loaded.best_trial.number}" in text
    assert "python -m gptft.run debug=fast" in text and "optim.lr=0.003" in text
    assert "# Search:" in stdout and "# Report:" in stdout


def test_same_folder_with_other_settings_is_refused(study, capsys):
    folder = study[0]
    with pytest.raises(SystemExit) as exit_:
        search.main([*TRIAL, "--space", "optim.lr=log(1e-5,1e-2)", "--study-dir", str(folder)])
    assert exit_.value.code == 2
    assert "holds a study of other settings" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--space", "optim.lrr=log(1e-5,1e-2)"], "optim.lrr is no setting of this experiment"),
        (["--space", "optim.lr=log(1e-2,1e-5)"], "is an empty range"),
        (["--space", "optim.warmup_steps=int(5,5)"], "is an empty range"),
        (["--space", "optim.lr=log(0,1e-2)"], "a log range needs low > 0"),
        (["--space", "optim.lr=float(-1,1)"], "at optim.lr=-1.0: optim.lr=-1.0 must be > 0"),
        (["--space", "data.batch_size=choice()"], "offers no choice"),
        (["--space", "optim.lr=uniform(1,2)"], "unknown kind 'uniform'"),
        (["--space", "schedule=choice(constant,cosin)"], "Could not find 'schedule/cosin'"),
        (["experiment=nope", "--space", "optim.lr=log(1e-5,1e-2)"], "Could not find 'experiment/nope'"),
        (["hydra.run.dir=x", "--space", "optim.lr=log(1e-5,1e-2)"], "gives every trial its own folder"),
        ([], "no --space given"),
    ],
    ids=[
        "unknown",
        "reversed",
        "empty int",
        "log 0",
        "invalid end",
        "no choice",
        "kind",
        "group",
        "experiment",
        "folder",
        "no space",
    ],  # fmt: skip
)
def test_bad_search_fails_in_one_line_before_any_trial(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        search.main(["debug=fast", *args, "--trials", "2", "--study-dir", str(tmp_path / "s")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptft: error: ") and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "s").exists()  # nothing was created
