"""`python -m gptft.search`: an Optuna study of tiny gptft runs that prunes a bad trial at a validation point,
is killed mid-trial, and continues from its SQLite file to its budget without rerunning finished trials; four
workers started at once on a new study, one stopped by SIGTERM and started again; a study continued with the same
seed and reopened with its definition reordered; the study served by optuna-dashboard; and bad search definitions
that fail in a line before any trial runs."""

from __future__ import annotations

import json
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import matplotlib.text
import optuna
import pytest
import torch
from omegaconf import OmegaConf

from gptft import search

from conftest import REPO

# 4 steps, validation (and so a pruning point) every 2; one generation seed; no reference probe.
TRIAL = [
    "debug=fast", "eval.repeats=1", "eval.free_prompts=2", "eval.max_new_tokens=8", "~callbacks.reference",
    "data.val_windows=4", "trainer.max_steps=4", "trainer.val_check_interval=2",
]  # fmt: skip
# About a second a trial: fp32 (full speed on every CPU), no free generation, short windows, 4 steps validated
# once, at the end.
QUICK = [
    "debug=fast", "trainer.precision=32-true", "eval.repeats=0", "eval.max_new_tokens=4", "~callbacks.reference",
    "data.val_windows=2", "data.seq_len=32", "data.batch_size=2", "trainer.max_steps=4",
    "trainer.val_check_interval=4",
]  # fmt: skip
# null is None (no clipping), not the string "None"
QUICK_SPACE = ["--space", "optim.lr=log(1e-4,1e-2)", "--space", "trainer.gradient_clip_val=choice(1.0,null)"]
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
    # Killed after its training wrote last.ckpt (in its last probes or its export), the trial continues from it.
    checkpointed = any(folder.glob("002_*/checkpoints/last.ckpt"))
    again = subprocess.run(command, cwd=REPO, env=gptft_env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    loaded = optuna.load_study(study_name="gptft", storage=f"sqlite:///{folder / 'study.db'}")
    return folder, loaded, before, again.stdout, checkpointed


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_study_continues_to_its_budget_after_a_kill(study):
    folder, loaded, before, _, checkpointed = study
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
    # the retry took the killed trial's folder if it had a checkpoint to continue from, else started its own
    assert (_run_dir(retried[0]) == _run_dir(killed)) == checkpointed
    folders = sorted(p.name for p in folder.iterdir() if (p / ".hydra").is_dir())
    assert len(folders) == 5 - checkpointed and folders[0].startswith("000_optim.lr=")


def test_bad_trials_are_pruned_at_a_validation_point(study):
    _, loaded, _, _, _ = study
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
    folder, loaded, _, stdout, _ = study
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


def _run_dir(trial: optuna.trial.FrozenTrial) -> Path:
    return Path(trial.user_attrs["run_dir"])


def _start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _load(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name="gptft", storage=f"sqlite:///{folder / 'study.db'}")


@pytest.fixture(scope="module")
def workers(gptft_env, tmp_path_factory):
    """Four workers started at once on a new study folder, all with the same seed."""
    folder = tmp_path_factory.mktemp("workers") / "study"
    command = [sys.executable, "-m", "gptft.search", *QUICK, *QUICK_SPACE, "--trials", "12", "--seed", "0",
               "--prune-on", "none", "--study-dir", str(folder)]  # fmt: skip
    logs = [folder.parent / f"worker{i}.log" for i in range(4)]
    # one thread each: four processes on a machine of two cores or more
    procs = [_start(command, {**gptft_env, "OMP_NUM_THREADS": "1"}, log) for log in logs]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0, 0, 0], "\n----\n".join(t[-2000:] for t in texts)
    return folder, _load(folder), texts


@pytest.fixture(scope="module")
def stopped(gptft_env, tmp_path_factory):
    """A one-trial study stopped by SIGTERM during its trial's training, then the same command again."""
    folder = tmp_path_factory.mktemp("stopped") / "study"
    # 8 steps, a checkpoint every 2 (the test needs to see how far training is)
    command = [sys.executable, "-m", "gptft.search", *QUICK, "trainer.max_steps=8", "trainer.val_check_interval=8",
               "callbacks.checkpoint.every_n_train_steps=2", "--space", QUICK_SPACE[1], "--trials", "1",
               "--prune-on", "none", "--study-dir", str(folder)]  # fmt: skip
    logs = [folder.parent / "first.log", folder.parent / "again.log"]
    first = _start(command, gptft_env, logs[0])
    try:
        step, end = None, time.monotonic() + 600
        while step is None and first.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
            (last,) = list(folder.glob("000_*/checkpoints/last.ckpt")) or [None]
            if last is not None:
                # Frozen while we look: the signal must land with steps of the trial still to train.
                first.send_signal(signal.SIGSTOP)
                saved = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
                if saved <= 4:
                    first.send_signal(signal.SIGTERM)
                    step = saved
                first.send_signal(signal.SIGCONT)
        assert step is not None, logs[0].read_text()[-3000:]
        assert first.wait(timeout=120) == 130, logs[0].read_text()[-3000:]
    finally:
        first.kill()
    (run,) = folder.glob("000_*")
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"]
    at_stop = json.loads((run / "metrics.json").read_text())
    again = _start(command, gptft_env, logs[1])
    assert again.wait(timeout=600) == 0, logs[1].read_text()[-3000:]
    return _load(folder), step, at_stop, [log.read_text() for log in logs]


def test_four_workers_started_together_share_one_study(workers):
    folder, study, logs = workers
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == len(study.trials) == 12  # the budget exactly: no worker starts a trial past it
    # The same --seed in every worker, and still 12 settings drawn apart (a float range never repeats).
    assert len({t.params["optim.lr"] for t in complete}) == 12
    assert len({t.user_attrs["process"] for t in study.trials}) >= 2  # the workers shared the trials
    for text in logs:
        assert "Traceback" not in text and "OperationalError" not in text and "IntegrityError" not in text
    for t in complete:  # each value is its run's own held-out loss
        metrics = json.loads((_run_dir(t) / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["steps"] == 4
        assert t.value == metrics["after"]["val_loss"]
    # The last worker to finish wrote the report of the whole study; the others said why they did not.
    text = (folder / "report" / "search.md").read_text()
    assert "\n12 complete\n" in text and "python -m gptft.run " in text
    best = study.best_trial.params["trainer.gradient_clip_val"]
    assert f"trainer.gradient_clip_val={'null' if best is None else best}" in text
    assert any("# Search:" in t for t in logs)
    # a worker that ends while others still run trials leaves the report to them
    for t in logs:
        assert ("# Search:" in t) != ("running in other processes: the last to end writes the report" in t)


def test_null_choice_means_none(workers):
    _, study, _ = workers
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert {t.params["trainer.gradient_clip_val"] for t in complete} == {1.0, None}
    for t in complete:
        saved = OmegaConf.load(_run_dir(t) / ".hydra" / "config.yaml")
        assert saved.trainer.gradient_clip_val == t.params["trainer.gradient_clip_val"]


def test_a_stopped_trial_is_retried_with_its_settings_from_its_checkpoint(stopped):
    study, step, at_stop, logs = stopped
    assert at_stop["status"] == "interrupted" and 1 <= step == at_stop["steps"] < 8
    assert "run the same command again to continue the study" in logs[0] and "Traceback" not in logs[0]
    assert f"SIGTERM: stopped after step {step}" in logs[0]  # by SafeStop, at the end of the step
    (failed,) = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(study.trials) == 2
    (retry,) = [t for t in study.trials
                if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == failed.number]  # fmt: skip
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == failed.params
    # the same folder, continued from the step it stopped at, to the end
    assert _run_dir(retry) == _run_dir(failed)
    metrics = json.loads((_run_dir(retry) / "metrics.json").read_text())
    assert (
        metrics["status"] == "completed"
        and metrics["steps"] == 8
        and retry.value == metrics["after"]["val_loss"]
    )
    assert f"training batches {step} to 7" in (_run_dir(retry) / "run.log").read_text()


def test_search_figures_name_the_measure_and_keep_their_labels_inside(workers):
    from gptft.report.search import search_figures

    _, study, _ = workers
    figures = search_figures(study, "after.val_loss")
    assert set(figures) == {"history", "importances"}
    assert figures["history"].axes[0].get_ylabel() == "after.val_loss"
    for name, fig in figures.items():
        fig.canvas.draw()  # what is drawn (tick labels outside the axes' range are not) lies inside the figure
        drawn, whole = fig.get_tightbbox(fig.canvas.get_renderer()), fig.bbox_inches
        assert whole.x0 <= drawn.x0 and drawn.x1 <= whole.x1 + 1e-6, (name, drawn, whole)
        assert whole.y0 <= drawn.y0 and drawn.y1 <= whole.y1 + 1e-6, (name, drawn, whole)
        assert "Objective Value" not in {t.get_text() for t in fig.findobj(matplotlib.text.Text)}


def test_dashboard_lists_the_study_trials(workers):
    folder, study, _ = workers
    with socket.socket() as s:  # a free port on the loopback interface
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the command `make dashboard` runs (make -n prints it without running it)
    dry = subprocess.run(["make", "--no-print-directory", "-n", "dashboard", f"STUDY={folder}", f"PORT={port}"], cwd=REPO,
                         capture_output=True, text=True, check=True)  # fmt: skip
    command = shlex.split(dry.stdout.strip().splitlines()[-1])
    assert command[0].endswith("optuna-dashboard") and f"sqlite:///{folder}/study.db" in command
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    studies = json.load(r)["study_summaries"]
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < end, "the dashboard did not start"
                time.sleep(0.2)
        (summary,) = studies
        assert summary["study_name"] == "gptft" and summary["directions"] == ["minimize"]
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=30
        ) as r:
            detail = json.load(r)
    finally:
        server.terminate()
        server.wait(timeout=30)
    listed = [(t["number"], t["state"].upper(), t["values"], {p["name"]: p["param_internal_value"] for p in t["params"]})
              for t in detail["trials"]]  # fmt: skip
    ours = [(t.number, t.state.name, t.values, {k: t.distributions[k].to_internal_repr(v) for k, v in t.params.items()})
            for t in study.trials]  # fmt: skip
    assert listed == ours and len(ours) == 12
    assert [t["number"] for t in detail["best_trials"]] == [study.best_trial.number]


@pytest.fixture(scope="module")
def continued(data_dir, tmp_path_factory):
    """A study of 2 trials in this process, continued with the same seed to 4."""
    folder = tmp_path_factory.mktemp("continued") / "study"
    args = [*QUICK, *QUICK_SPACE, "--seed", "0", "--prune-on", "none", "--study-dir", str(folder)]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GPTFT_DATA_DIR", str(data_dir))
        search.search(search.parse_args([*args, "--trials", "2"]))
        first = [t.params for t in _load(folder).trials]
        study, _ = search.search(search.parse_args([*args, "--trials", "4"]))
    return folder, first, study


def test_a_continued_study_never_repeats_a_trial(continued):
    _, first, study = continued
    assert [t.params for t in study.trials[:2]] == first
    assert len(study.trials) == 4 and len({t.params["optim.lr"] for t in study.trials}) == 4


def test_a_reordered_definition_is_the_same_study(continued):
    folder, _, _ = continued
    spaces = ["--space", QUICK_SPACE[3], "--space", QUICK_SPACE[1]]
    args = [*reversed(QUICK), *spaces, "--seed", "0", "--prune-on", "none", "--trials", "4"]
    study, found = search.search(search.parse_args([*args, "--study-dir", str(folder)]))
    assert len(study.trials) == 4  # nothing new to run, and no "other settings" refusal
    # the default folder too: the same definition in another order names the same one
    normal = search.parse_args([*QUICK, *QUICK_SPACE])
    reordered = search.parse_args([*reversed(QUICK), *spaces])
    assert search.study_folder(
        normal.overrides, [search.parse_space(s) for s in normal.space], "m", "minimize"
    ) == (
        search.study_folder(
            reordered.overrides, [search.parse_space(s) for s in reordered.space], "m", "minimize"
        )
    )


def test_sigterm_outside_training_stops_the_search_as_ctrl_c_would():
    """Between trials (or in a trial's loading, probes or export) SIGTERM raises Interrupted, which queues the trial
    again; in a fit's set-up Lightning's handler runs first and calls this one, which must then leave the stop to
    SafeStop (the end of the first step, with a checkpoint)."""
    from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose

    from gptft.errors import Interrupted

    previous = signal.signal(signal.SIGTERM, search._stop_outside_training)
    try:
        with pytest.raises(Interrupted, match="SIGTERM: stopped outside a training step"):
            signal.raise_signal(signal.SIGTERM)
        noted = []
        # what Lightning's fit installs: its own handler, then the one it found
        signal.signal(
            signal.SIGTERM, _HandlersCompose([lambda *_: noted.append(1), search._stop_outside_training])
        )
        signal.raise_signal(signal.SIGTERM)
        assert noted == [1]
    finally:
        signal.signal(signal.SIGTERM, previous)
