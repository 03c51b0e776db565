"""`python -m gptft.search [overrides] --space KEY=SPEC ... --trials N`: an Optuna study over any settings of any
experiment.

Each trial is a normal gptft run (the config composed with Hydra's compose API, `gptft.run.train` called in this
process) in its own folder under the study's folder; the study itself is the SQLite file `study.db` there, so the
same command continues it after a crash (finished trials are never rerun; a trial that was stopped or died while
running is retried with the same settings, from its checkpoint), and any number of processes started at once
(one per GPU) share it. Trials are pruned at validation points by Optuna's median pruner on `val/loss`. At the
end: the sweep report over the trials (`gptft.report.write_report`) plus the study's best settings, its history
and the settings' importances. `make dashboard STUDY=<study folder>` serves the study in optuna-dashboard.

Search spaces (one `--space` per setting; any config key or group, as on gptft.run's command line):
    optim.lr=log(1e-5,1e-2)          log-uniform float        optim.weight_decay=float(0,0.1)   uniform float
    optim.warmup_steps=int(0,100)    integer, both ends in    data.batch_size=choice(4,8,16)    categorical
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import optuna
from filelock import FileLock
from optuna_integration import PyTorchLightningPruningCallback

from gptft.errors import ConfigError, Diverged, Interrupted, StoppedEarly

log = logging.getLogger("gptft.search")

CONF = Path(__file__).resolve().parents[1] / "conf"
KINDS = ("log", "float", "int", "choice")
State = optuna.trial.TrialState
FINISHED = (State.COMPLETE, State.PRUNED)


@dataclass(frozen=True)
class Space:
    """One searched setting: `key=kind(args)`."""

    key: str
    kind: str
    args: tuple[Any, ...]

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.args))
        if self.kind == "int":
            return trial.suggest_int(self.key, *self.args)
        return trial.suggest_float(self.key, *self.args, log=self.kind == "log")

    def ends(self) -> list[Any]:
        """Values that bound the space (every choice; both ends of a range): checked before any trial runs."""
        return list(self.args)

    def override(self, value: Any) -> str:
        return override(self.key, value)

    def __str__(self) -> str:
        return f"{self.key}={self.kind}({','.join(map(_text, self.args))})"


def _text(value: Any) -> str:
    """A value as gptft.run's command line reads it back: None is Hydra's null (its "None" is a string)."""
    return "null" if value is None else repr(value) if isinstance(value, float) else str(value)


def override(key: str, value: Any) -> str:
    """The command-line override that gives a trial (or gptft.run) `value`."""
    return f"{key}={_text(value)}"


def _value(text: str) -> Any:
    """A choice or a bound as gptft.run would read it: int, float, bool, null, else the string."""
    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(text.lower(), text)


def parse_space(spec: str) -> Space:
    """`optim.lr=log(1e-5,1e-2)` → Space; ConfigError (one line) for anything else."""
    match = re.fullmatch(r"\s*([\w.\-/@]+)\s*=\s*(\w+)\((.*)\)\s*", spec)
    usage = "write KEY=log(lo,hi), float(lo,hi), int(lo,hi) or choice(a,b,...)"
    if not match:
        raise ConfigError(f"--space {spec!r} is not a search space: {usage}")
    key, kind, body = match.groups()
    if kind not in KINDS:
        raise ConfigError(f"--space {spec!r}: unknown kind {kind!r}: {usage}")
    args = tuple(_value(a) for a in body.split(",")) if body.strip() else ()
    if kind == "choice":
        if not args or any(a == "" for a in args):
            raise ConfigError(f"--space {spec!r} offers no choice: list the values, e.g. {key}=choice(4,8)")
        return Space(key, kind, args)
    if len(args) != 2 or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"--space {spec!r} needs two numbers, low and high: e.g. {key}={kind}(1,10)")
    low, high = args
    if kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"--space {spec!r}: int() takes whole numbers, e.g. {key}=int(0,100)")
    if not low < high:
        raise ConfigError(
            f"--space {spec!r} is an empty range: give low < high, e.g. {key}={kind}({high},{low})"
            if low > high
            else f"--space {spec!r} is an empty range: give low < high"
        )
    if kind == "log" and low <= 0:
        raise ConfigError(f"--space {spec!r}: a log range needs low > 0, e.g. {key}=log(1e-6,{high})")
    return Space(key, kind, (float(low), float(high)) if kind != "int" else (low, high))


def compose(overrides: Sequence[str], output_dir: Path | None = None) -> Any:
    """The config gptft.run would compose from these overrides (one line for a bad one). `output_dir` stands
    for the folder Hydra would give the run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    import gptft.run  # noqa: F401  (registers gptft's resolvers)

    # quoted: trial folders are named by their settings, and "=" would end an unquoted override
    extra = [f"paths.output_dir='{output_dir or 'unset'}'"]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="search"):
            return hydra_compose(config_name="config", overrides=[*overrides, *extra])
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{' '.join(overrides)}: {first}") from None


def check_definition(overrides: Sequence[str], spaces: Sequence[Space]) -> None:
    """Before any trial: the base settings, every searched key and every end of every range compose and pass
    gptft's checks (gptft.config.validate), so a typo fails in seconds with one line."""
    from omegaconf import OmegaConf

    from gptft.config import check_renamed, validate

    check_renamed([*overrides, *(f"{space.key}=" for space in spaces)])
    for override in overrides:
        if override.split("=", 1)[0].lstrip("+~").startswith(("hydra.", "resume", "ckpt_path", "paths.")):
            raise ConfigError(f"{override}: the search gives every trial its own folder; leave it out")
    base = compose(overrides)
    validate(base)
    missing = object()
    keys = [s.key for s in spaces]
    for space in spaces:
        if keys.count(space.key) > 1:
            raise ConfigError(f"--space {space.key} is given twice: keep one")
        if OmegaConf.select(base, space.key, default=missing) is missing:
            raise ConfigError(
                f"--space {space}: {space.key} is no setting of this experiment (see python -m gptft.run "
                f"{' '.join(overrides)} --cfg job)"
            )
        for value in space.ends():
            try:
                cfg = compose([*overrides, space.override(value)])
                validate(cfg)
            except ConfigError as e:
                raise ConfigError(f"--space {space}: at {space.key}={value}: {e}") from None
            # The trial must get the value the study records (a group choice selects a whole node instead).
            got = OmegaConf.select(cfg, space.key)
            if not OmegaConf.is_config(got) and got != value:
                raise ConfigError(
                    f"--space {space}: {space.override(value)} sets {space.key} to {got!r}, not {value!r}: "
                    "write the value as gptft.run's command line reads it (null for None)"
                )


def measure(metrics: dict[str, Any], name: str) -> float:
    """The objective: a dotted path into metrics.json (`after.val_loss`, `after.style_ratio` → its mean)."""
    value: Any = metrics
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, dict):
        value = value.get("mean")
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        after = sorted(f"after.{k}" for k in metrics.get("after", {}))
        raise ConfigError(
            f"--metric {name} is not a number in the trial's metrics.json: choose one of {after}"
        )
    return float(value)


class StepPruning(PyTorchLightningPruningCallback):
    """optuna-integration's Lightning pruning callback, reporting at the global step.

    The library reports `monitor` at `pl_module.current_epoch`; gptft trains by steps within one epoch and
    validates every `trainer.val_check_interval` steps, so every report would land on step 0 and Optuna would
    keep only the first (the untrained model, the same in every trial). One process per trial: under DDP
    the library's own callback applies.
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        score = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or step == 0 or score is None:
            return
        self._trial.report(float(score), step=step)
        if self._trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {self.monitor}={float(score):.4g}")


def _mark_pruned(folder: Path, why: str) -> None:
    """metrics.json says "pruned" (RunRecord wrote "failed" for the exception that stopped the trial)."""
    from gptft.utils.io import atomic_write_json

    file = folder / "metrics.json"
    if file.is_file():
        data = json.loads(file.read_text())
        data.update(status="pruned", pruned=why)
        atomic_write_json(file, data)


def _retry(trial: optuna.Trial) -> None:
    """Queue `trial` to run again with its settings and its folder (user attrs), as Optuna's heartbeat retries
    a trial whose process died: the same system attrs, so `retried_trial_number` finds the trial it repeats."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    optuna.storages.RetryHeartbeatStaleTrialCallback()(trial.study, frozen)


class Objective:
    """One trial: compose the trial's config (or, for a retried trial with a checkpoint, take its folder's), train
    it in this process, return its measure. `lock`, the study's, is held by the caller when the trial starts and
    let go once the trial's settings are drawn; it is taken again to queue a stopped trial's retry."""

    def __init__(
        self,
        overrides: Sequence[str],
        spaces: Sequence[Space],
        folder: Path,
        metric: str,
        prune_on: str | None,
        lock: FileLock,
    ) -> None:
        self.overrides, self.spaces, self.folder = list(overrides), list(spaces), folder
        self.metric, self.prune_on, self.lock = metric, prune_on, lock

    def _config(self, trial: optuna.Trial, params: list[str]) -> tuple[Any, Path]:
        """A retry of a trial that left a checkpoint continues that trial's run; any other trial starts one."""
        from omegaconf import OmegaConf

        from gptft.config import resumed_config
        from gptft.run import _slug
        from gptft.utils.io import atomic_write_text

        earlier = trial.user_attrs.get("run_dir")  # set only on a retry: the folder of the trial it repeats
        if earlier and (Path(earlier) / "checkpoints" / "last.ckpt").is_file():
            log.info("trial %d: continuing %s from its checkpoint", trial.number, earlier)
            return resumed_config(OmegaConf.create({"resume": earlier}), []), Path(earlier)
        run = self.folder / f"{trial.number:03d}_{_slug(','.join(params), 80)}"
        trial.set_user_attr("run_dir", str(run))
        cfg = compose([*self.overrides, *params], output_dir=run)
        # What Hydra's run_job would leave, so the report labels trials and `gptft.run resume=<trial>` works.
        atomic_write_text(run / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
        atomic_write_text(run / ".hydra" / "overrides.yaml", OmegaConf.to_yaml([*self.overrides, *params]))
        return cfg, run

    def __call__(self, trial: optuna.Trial) -> float:
        from gptft.run import train

        params = [s.override(s.suggest(trial)) for s in self.spaces]
        trial.set_user_attr("process", f"{socket.gethostname()}:{os.getpid()}")
        self.lock.release()
        cfg, run = self._config(trial, params)
        log.info("trial %d: %s → %s", trial.number, " ".join(params), run)
        handler = logging.FileHandler(run / "run.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
        pruning = [StepPruning(trial, self.prune_on)] if self.prune_on else []
        try:
            metrics = train(cfg, pruning)
        except (Interrupted, KeyboardInterrupt):
            # Stopped from outside (SIGTERM, Ctrl-C), not the trial's fault: it runs again with its settings,
            # from the checkpoint it just wrote, in whichever process takes the next trial.
            with self.lock:
                _retry(trial)
            log.info("trial %d stopped: queued to continue from its checkpoint", trial.number)
            raise
        except optuna.TrialPruned as pruned:
            _mark_pruned(run, str(pruned))
            log.info("trial %d %s", trial.number, pruned)
            raise
        except Diverged as e:  # a bad corner of the space, not a broken search: counted, and no value
            log.info("trial %d diverged: %s", trial.number, e)
            raise optuna.TrialPruned(f"diverged: {e}") from None
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
        return measure(metrics, self.metric)


def definition(
    overrides: Sequence[str], spaces: Sequence[str], metric: str, direction: str
) -> dict[str, Any]:
    """What makes a study this study, in one order whatever the command line's (Hydra reads overrides of
    different keys in any order, and refuses two of one key): the folder's hash is of this, and a continuing
    process's definition is compared with the saved one (kept in the order given, for the report) as this."""
    return {
        "overrides": sorted(overrides),
        "spaces": sorted(spaces),
        "metric": metric,
        "direction": direction,
    }


def study_folder(overrides: Sequence[str], spaces: Sequence[Space], metric: str, direction: str) -> Path:
    """outputs/<experiment>/search_<hash of the definition>: the same command finds the same study."""
    what = definition(overrides, [str(s) for s in spaces], metric, direction)
    text = json.dumps([what["overrides"], what["spaces"], metric, direction])
    name = compose(overrides).experiment_name
    return Path("outputs") / str(name) / f"search_{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def study_lock(folder: Path) -> FileLock:
    """The lock that processes sharing a study take to create its database and to claim each trial (an flock,
    released by the system if its holder dies)."""
    return FileLock(folder / "study.lock")


def open_study(
    folder: Path, given: dict[str, Any], startup: int, heartbeat: int, lock: FileLock | None = None
) -> optuna.Study:
    """The study in `folder/study.db`, created or continued. Its first process creates the database's tables
    while the others wait on the lock (SQLite cannot create one schema from two processes at once: Optuna's
    known limit); a trial whose process died is noticed by its stale heartbeat, failed, and retried."""
    folder.mkdir(parents=True, exist_ok=True)
    with lock or study_lock(folder):
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{folder.resolve() / 'study.db'}",
            engine_kwargs={"connect_args": {"timeout": 60}},
            heartbeat_interval=heartbeat,
            grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
        )
        study = optuna.create_study(
            storage=storage,
            study_name="gptft",
            direction=given["direction"],
            load_if_exists=True,
            pruner=optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0),
        )
        saved = study.user_attrs.get("definition")
        if saved is None:
            study.set_user_attr("definition", given)
        elif definition(**saved) != definition(**given):
            raise ConfigError(
                f"--study-dir {folder} holds a study of other settings ({saved}): give a new --study-dir"
            )
    return study


def trial_sampler(seed: int | None, trials: int) -> optuna.samplers.BaseSampler:
    """The sampler that draws the study's next trial (its `trials`-th). Seeded from (seed, trials), not from the
    seed alone: a process that continues the study, or a second process given the same seed, would otherwise
    repeat the first trials' draws (TPE samples at random, from its own seeded generator, until it has enough
    trials); TPE reads the rest from the study's history."""
    if seed is None:
        return optuna.samplers.TPESampler()
    mixed = int(hashlib.sha256(f"{seed}:{trials}".encode()).hexdigest()[:8], 16)
    return optuna.samplers.TPESampler(seed=mixed)


def _due(study: optuna.Study, budget: int) -> bool:
    """Whether another trial is due: a retry waits, or fewer than `budget` trials are finished or running.
    Called under the study's lock, so no two processes claim the last trial of the budget."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a dead process's trial holds no place in the budget
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, State.RUNNING, State.WAITING))
    waiting = sum(t.state == State.WAITING for t in trials)
    return waiting > 0 or len(trials) < budget


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gptft.search",
        description="An Optuna study over gptft settings; every trial is a gptft run.",
        epilog=__doc__.split("Search spaces", 1)[1].join(["Search spaces", ""]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "overrides", nargs="*", help="gptft.run overrides for every trial, e.g. experiment=quickstart"
    )
    parser.add_argument("--space", action="append", default=[], metavar="KEY=SPEC", help="a searched setting")
    parser.add_argument(
        "--trials", type=int, default=20, help="trial budget of the study (finished or pruned)"
    )
    parser.add_argument(
        "--metric",
        default="after.val_loss",
        help="what to optimise: a path into metrics.json, e.g. after.val_loss, after.style_ratio",
    )
    parser.add_argument("--direction", choices=("minimize", "maximize"), default="minimize")
    parser.add_argument(
        "--study-dir",
        type=Path,
        default=None,
        help="the study's folder (default outputs/<experiment>/search_<hash of the definition>)",
    )
    parser.add_argument(
        "--prune-on",
        default="val/loss",
        help="logged metric the median pruner watches (needs --metric after.val_loss); 'none': off",
    )
    parser.add_argument(
        "--startup-trials", type=int, default=5, help="trials that finish before pruning starts"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="the sampler's seed; each trial's draw is seeded from it and the trial's number, so every process "
        "may get the same one",
    )
    parser.add_argument(
        "--heartbeat",
        type=int,
        default=60,
        help="seconds between a running trial's heartbeats; a trial silent for twice that is retried",
    )
    return parser.parse_args(argv)


def search(args: argparse.Namespace) -> tuple[optuna.Study, Path]:
    """Run (or continue) the study to its budget, in step with any other process on it; return the study and its
    folder."""
    if args.trials < 1:
        raise ConfigError(f"--trials {args.trials}: the budget must be at least 1 trial")
    if args.heartbeat < 1:
        raise ConfigError(f"--heartbeat {args.heartbeat}: give at least 1 second")
    if not args.space:
        raise ConfigError(
            "no --space given: name at least one setting, e.g. --space 'optim.lr=log(1e-5,1e-2)'"
        )
    spaces = [parse_space(s) for s in args.space]
    check_definition(args.overrides, spaces)
    # The median pruner compares one logged curve across trials: meaningful when that curve is the objective.
    prune_on = None if args.prune_on == "none" or args.metric != "after.val_loss" else args.prune_on
    if prune_on is None and args.prune_on != "none":
        log.info("pruning off: --metric %s is measured only after training", args.metric)
    folder = args.study_dir or study_folder(args.overrides, spaces, args.metric, args.direction)
    given = {
        "overrides": list(args.overrides),
        "spaces": [str(s) for s in spaces],
        "metric": args.metric,
        "direction": args.direction,
    }
    lock = study_lock(folder)
    study = open_study(folder, given, args.startup_trials, args.heartbeat, lock)
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    log.info("study %s: %d of %d trials finished", folder / "study.db", done, args.trials)
    # The lock is held from the budget's count until the new trial's settings are drawn (the objective lets go):
    # processes take trials one at a time, so the budget is never overrun and each draw sees the ones before it.
    objective = Objective(args.overrides, spaces, folder, args.metric, prune_on, lock)
    while True:
        lock.acquire()
        try:
            if not _due(study, args.trials):
                break
            study.sampler = trial_sampler(args.seed, len(study.get_trials(deepcopy=False)))
            study.optimize(objective, n_trials=1, gc_after_trial=True)
        finally:
            if lock.is_locked:  # the trial never reached its draw, or the budget was spent
                lock.release()
    return study, folder


def busy(study: optuna.Study, folder: Path) -> int:
    """Trials that other processes are running or will run: the study's report waits for the last of them."""
    with study_lock(folder):
        return len(study.get_trials(deepcopy=False, states=(State.RUNNING, State.WAITING)))


def _stop_outside_training(signum: int, frame: FrameType | None) -> None:
    """SIGTERM between trials, or in a trial before or after its training, stops the search as Ctrl-C would.
    During training gptft.run's SafeStop takes the signal (it ends the step and writes the checkpoint); in the
    fit's set-up, before SafeStop's turn, Lightning's handler runs first and calls this one, which then leaves
    the stop to SafeStop (Lightning's note of the signal is read at the first step)."""
    if signal.getsignal(signal.SIGTERM) is _stop_outside_training:
        raise Interrupted("SIGTERM: stopped outside a training step")


def main(argv: Sequence[str] | None = None) -> None:
    from gptft.report import write_report
    from gptft.report.search import write_search_report

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # gptft logs each trial; a failure ends the search
    # heartbeats and the matplotlib figures are "experimental" in Optuna's words, stable since 2.8 and 2.2
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    previous = signal.signal(signal.SIGTERM, _stop_outside_training)
    try:
        study, folder = search(args)
        others = busy(study, folder)
        if others:
            print(
                f"gptft: {others} trials of the study are running in other processes: the last to end writes the report"
            )
        else:
            print(write_report(folder))
            print(write_search_report(study, folder))
    except ConfigError as e:
        print(f"gptft: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (StoppedEarly, KeyboardInterrupt) as stopped:
        status = stopped.status if isinstance(stopped, StoppedEarly) else "interrupted"
        print(f"gptft: {status}: {stopped or 'Ctrl-C'}", file=sys.stderr)
        print("gptft: run the same command again to continue the study", file=sys.stderr)
        sys.exit(stopped.exit_code if isinstance(stopped, StoppedEarly) else Interrupted.exit_code)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
