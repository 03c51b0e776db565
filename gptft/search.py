"""`python -m gptft.search [overrides] --space KEY=SPEC ... --trials N`: an Optuna study over any settings of any
experiment.

Each trial is a normal gptft run (the config composed with Hydra's compose API, `gptft.run.train` called in this
process) in its own folder under the study's folder; the study itself is the SQLite file `study.db` there, so the
same command continues it after a crash (finished trials are never rerun; a trial that died while running is
retried with the same settings), and several processes (one per GPU) can share it. Trials are pruned at
validation points by Optuna's median pruner on `val/loss`. At the end: the sweep report over the trials
(`gptft.report.write_report`) plus the study's best settings, its history and the settings' importances.

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
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import optuna
from optuna_integration import PyTorchLightningPruningCallback

from gptft.errors import ConfigError, Diverged, StoppedEarly

log = logging.getLogger("gptft.search")

CONF = Path(__file__).resolve().parents[1] / "conf"
KINDS = ("log", "float", "int", "choice")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


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

    def __str__(self) -> str:
        return f"{self.key}={self.kind}({','.join(map(str, self.args))})"


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


def _override(key: str, value: Any) -> str:
    return f"{key}={'null' if value is None else value!r}" if isinstance(value, float) else f"{key}={value}"


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
                validate(compose([*overrides, _override(space.key, value)]))
            except ConfigError as e:
                raise ConfigError(f"--space {space}: at {space.key}={value}: {e}") from None


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


class Objective:
    """One trial: compose the trial's config, train it in this process, return its measure."""

    def __init__(
        self,
        overrides: Sequence[str],
        spaces: Sequence[Space],
        folder: Path,
        metric: str,
        prune_on: str | None,
    ) -> None:
        self.overrides, self.spaces, self.folder = list(overrides), list(spaces), folder
        self.metric, self.prune_on = metric, prune_on

    def __call__(self, trial: optuna.Trial) -> float:
        from omegaconf import OmegaConf

        from gptft.run import _slug, train
        from gptft.utils.io import atomic_write_text

        params = [_override(s.key, s.suggest(trial)) for s in self.spaces]
        run = self.folder / f"{trial.number:03d}_{_slug(','.join(params), 80)}"
        trial.set_user_attr("run_dir", str(run))
        cfg = compose([*self.overrides, *params], output_dir=run)
        # What Hydra's run_job would leave, so the report labels trials and `gptft.run resume=<trial>` works.
        atomic_write_text(run / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
        atomic_write_text(run / ".hydra" / "overrides.yaml", OmegaConf.to_yaml([*self.overrides, *params]))
        log.info("trial %d: %s → %s", trial.number, " ".join(params), run)
        handler = logging.FileHandler(run / "run.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
        pruning = [StepPruning(trial, self.prune_on)] if self.prune_on else []
        try:
            metrics = train(cfg, pruning)
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


def study_folder(overrides: Sequence[str], spaces: Sequence[Space], metric: str, direction: str) -> Path:
    """outputs/<experiment>/search_<hash of the definition>: the same command finds the same study."""
    definition = json.dumps([sorted(overrides), sorted(map(str, spaces)), metric, direction])
    name = compose(overrides).experiment_name
    return Path("outputs") / str(name) / f"search_{hashlib.sha256(definition.encode()).hexdigest()[:10]}"


def open_study(
    folder: Path, definition: dict[str, Any], direction: str, seed: int | None, startup: int, heartbeat: int
) -> optuna.Study:
    """The study in `folder/study.db`, created or continued. SQLite with a busy timeout lets a few processes
    (one per GPU) share it; a trial whose process died is noticed by its stale heartbeat, failed, and retried."""
    folder.mkdir(parents=True, exist_ok=True)
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
        direction=direction,
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0),
    )
    saved = study.user_attrs.get("definition")
    if saved is None:
        study.set_user_attr("definition", definition)
    elif saved != definition:
        raise ConfigError(
            f"--study-dir {folder} holds a study of other settings ({saved}): give a new --study-dir"
        )
    return study


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
    parser.add_argument("--seed", type=int, default=None, help="the sampler's seed (one per process)")
    parser.add_argument(
        "--heartbeat",
        type=int,
        default=60,
        help="seconds between a running trial's heartbeats; a trial silent for twice that is retried",
    )
    return parser.parse_args(argv)


def search(args: argparse.Namespace) -> tuple[optuna.Study, Path]:
    """Run (or continue) the study to its budget; return it and its folder."""
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
    definition = {
        "overrides": list(args.overrides),
        "spaces": [str(s) for s in spaces],
        "metric": args.metric,
        "direction": args.direction,
    }
    study = open_study(folder, definition, args.direction, args.seed, args.startup_trials, args.heartbeat)
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    log.info("study %s: %d of %d trials finished", folder / "study.db", done, args.trials)
    if done < args.trials:
        study.optimize(
            Objective(args.overrides, spaces, folder, args.metric, prune_on),
            n_trials=args.trials - done,
            # the budget is the study's, shared by every process that works on it
            callbacks=[optuna.study.MaxTrialsCallback(args.trials, states=FINISHED)],
            gc_after_trial=True,
        )
    return study, folder


def main(argv: Sequence[str] | None = None) -> None:
    from gptft.report import write_report
    from gptft.report.search import write_search_report

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # gptft logs each trial; a failure ends the search
    # heartbeats and the matplotlib figures are "experimental" in Optuna's words, stable since 2.8 and 2.2
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        study, folder = search(args)
        print(write_report(folder))
        print(write_search_report(study, folder))
    except ConfigError as e:
        print(f"gptft: error: {e}", file=sys.stderr)
        sys.exit(2)
    except StoppedEarly as stopped:
        print(f"gptft: {stopped.status}: {stopped}", file=sys.stderr)
        print("gptft: run the same command again to continue the study", file=sys.stderr)
        sys.exit(stopped.exit_code)


if __name__ == "__main__":
    main()
