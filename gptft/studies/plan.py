"""The studies' settings (conf/studies/<scale>.yaml), their runs, and training them in this process.

Every run is a normal gptft run (the config composed as gptft.search composes a trial's, `gptft.run.train` called
here) in a folder fixed by its settings: `<out>/<study>/<n>_<swept settings>,seed=<s>`. So the same command on the
same folder finds what is done: a run whose metrics.json says it ended is kept, a stopped one continues from its
checkpoint (`resume=`'s logic), one that stopped before its first checkpoint starts again; nothing trains twice.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gptft.errors import ConfigError

log = logging.getLogger("gptft.studies")

CONF = Path(__file__).resolve().parents[2] / "conf" / "studies"
STUDIES = ("lr_sweep", "scratch", "kl_x", "freezing", "instruct", "learn_forget")
# A run that ended: it is not trained again (a diverged run diverges the same way again; a failed one is retried).
ENDED = ("completed", "diverged", "pruned")
SAVED = "studies.yaml"  # the settings a studies folder started with


def load_scale(name: str) -> DictConfig:
    """conf/studies/<name>.yaml with the files its `defaults` list names merged below it."""
    file = CONF / f"{name}.yaml"
    if not file.is_file():
        known = ", ".join(sorted(p.stem for p in CONF.glob("*.yaml")))
        raise ConfigError(f"scale={name} is not a scale: use one of {known} (conf/studies/)")
    own = OmegaConf.load(file)
    parents = list(own.pop("defaults", []))
    if "_self_" not in parents:
        parents.append("_self_")
    merged = OmegaConf.create()
    for parent in parents:
        merged = OmegaConf.merge(merged, own if parent == "_self_" else load_scale(parent))
    return merged


def settings(argv: list[str]) -> tuple[DictConfig, Path, list[str]]:
    """The studies' settings from `key=value` arguments (scale=, base=, seeds=, out=, only=, any key of the scale's
    file) and the folder they write. A folder that holds studies already continues with its own settings."""
    pairs = []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"{arg!r}: write key=value, e.g. scale=smoke (python -m gptft.studies --help)")
        pairs.append(arg.split("=", 1))
    given = dict(pairs)
    # How this call trains (in-process, or submitit jobs), not what it trains: free to differ when continuing.
    how = {k: given.pop(k) for k in list(given) if k == "launcher" or k.startswith("submitit.")}
    out = Path(given.pop("out", None) or Path("outputs") / "studies" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}")
    only = given.pop("only", None)
    saved = out / SAVED
    if saved.is_file():
        cfg = OmegaConf.load(saved)
        asked = OmegaConf.from_dotlist([f"{k}={v}" for k, v in given.items()])
        differ = [f"{k}={v}" for k, v in given.items() if _plain(asked, k) != _plain(cfg, k)]
        if differ:
            raise ConfigError(
                f"out={out} holds studies started with other settings ({' '.join(differ)} differ from its "
                f"{SAVED}): continue it without them, or give a new out="
            )
    else:
        cfg = load_scale(given.pop("scale", "cpu"))
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in given.items()]))
        OmegaConf.resolve(cfg)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in how.items()]))
    if cfg.get("launcher") not in (None, "local", "slurm"):
        raise ConfigError(
            f"launcher={cfg.launcher}: use local or slurm (submitit), or leave it unset (in-process)"
        )
    wanted = [s.strip() for s in (only or "").split(",") if s.strip()] or list(cfg.studies)
    unknown = [s for s in wanted if s not in cfg.studies]
    if unknown:
        raise ConfigError(f"only={only}: {unknown} are no studies: name some of {list(cfg.studies)}")
    return cfg, out, wanted


def _plain(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


@dataclass
class Job:
    """One training run of a study: its folder and every override it composes from."""

    study: str
    folder: Path
    overrides: list[str]
    swept: dict[str, str] = field(default_factory=dict)
    seed: int = 0

    @property
    def status(self) -> str | None:
        file = self.folder / "metrics.json"
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text()).get("status")
        except (OSError, ValueError):
            return None

    @property
    def ended(self) -> bool:
        return self.status in ENDED


def _value(v: Any) -> str:
    return "null" if v is None else repr(v) if isinstance(v, float) else str(v)


def study_jobs(cfg: DictConfig, name: str, out: Path, base: str | None) -> list[Job]:
    """The runs of one study: every combination of its swept settings × its seeds, in a fixed order."""
    from gptft.run import job_name

    study = cfg.studies[name]
    sweep = OmegaConf.to_container(study.sweep) or {}
    seeds = list(range(1, int(study.seeds) + 1))
    common = [f"experiment={study.experiment}", *cfg.common, *study.overrides]
    if study.get("from_base", True):
        common.append(f"model.name_or_path={base}")
    keys = list(sweep)
    jobs = []
    combos = list(itertools.product(*(sweep[k] for k in keys))) or [()]
    for number, (combo, seed) in enumerate(itertools.product(combos, seeds)):
        swept = {k: _value(v) for k, v in zip(keys, combo, strict=True)}
        varying = [f"{k}={v}" for k, v in swept.items()] + [f"seed={seed}"]
        folder = out / name / f"{number}_{job_name(varying, [*keys, 'seed'])}"
        jobs.append(Job(name, folder, [*common, *cfg.get("extra", []), *varying], swept, seed))
    return jobs


def train_job(job: Job) -> None:
    """Train one run in this process, or continue it from its checkpoint; a run that ended is left alone."""
    from gptft.config import resumed_config
    from gptft.run import train
    from gptft.search import compose
    from gptft.utils.io import atomic_write_text

    if job.ended:
        return
    checkpoint = job.folder / "checkpoints" / "last.ckpt"
    if job.folder.is_dir() and checkpoint.is_file():
        log.info("%s: continuing %s from its checkpoint", job.study, job.folder)
        cfg = resumed_config(OmegaConf.create({"resume": str(job.folder)}), [])
        cfg.ckpt_path = str(checkpoint)
    else:
        if job.folder.exists():  # stopped before its first checkpoint: nothing to keep
            shutil.rmtree(job.folder)
        cfg = compose(job.overrides, output_dir=job.folder)
        # What Hydra's run_job would leave: the report groups runs by these overrides, and resume= reads the config.
        atomic_write_text(job.folder / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
        atomic_write_text(job.folder / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(job.overrides))
        log.info("%s: training %s", job.study, job.folder)
    handler = logging.FileHandler(job.folder / "run.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        train(cfg)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def find_base(cfg: DictConfig, out: Path) -> str:
    """The hf_model folder the studies fine-tune: `base=`, else the newest completed outputs/base/* (reuse_base),
    else the one trained here into <out>/base (continued like any run)."""
    if cfg.get("base"):
        folder = Path(str(cfg.base))
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"base={cfg.base} is no hf_model folder (no config.json in it): give <run>/hf_model"
            )
        return str(folder)
    own = Job("base", out / "base", list(cfg.base_training))
    if own.status == "completed" and (own.folder / "hf_model").is_dir():
        return str(own.folder / "hf_model")
    if cfg.get("reuse_base", True) and not own.folder.exists():
        found = [
            Path(p).parent
            for p in glob.glob("outputs/base/*/hf_model")
            if Job("base", Path(p).parent, []).status == "completed"
        ]
        if found:
            return str(max(found, key=lambda p: p.name) / "hf_model")
    log.info("no base model found: training one (%s) into %s", " ".join(own.overrides), own.folder)
    train_job(own)
    return str(own.folder / "hf_model")


def save_settings(cfg: DictConfig, out: Path) -> None:
    """<out>/studies.yaml: what a continuing call reads (the base's folder once it is known)."""
    from gptft.utils.io import atomic_write_text

    atomic_write_text(out / SAVED, OmegaConf.to_yaml(cfg))


def submit(cfg: DictConfig, out: Path, jobs: list[Job]) -> list[str]:
    """Train `jobs` as submitit jobs (launcher=local: processes on this machine; slurm: a Slurm job array), at most
    `submitit.parallel` at once; wait for them; return what failed. A job that dies is continued by the next call
    like any stopped run."""
    import submitit

    params = {k: v for k, v in OmegaConf.to_container(cfg.submitit).items() if v is not None}
    parallel = int(params.pop("parallel", 1))
    if cfg.launcher == "slurm":
        if not params.get("slurm_partition"):
            raise ConfigError("launcher=slurm needs submitit.slurm_partition=<your cluster's partition>")
        params["slurm_array_parallelism"] = parallel
    else:
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    executor = submitit.AutoExecutor(folder=out / ".submitit" / "%j", cluster=cfg.launcher)
    executor.update_parameters(name="gptft-studies", **params)
    if cfg.launcher == "slurm":
        with executor.batch():
            handles = [executor.submit(train_job, job) for job in jobs]
        waves = [list(zip(jobs, handles, strict=True))]
    else:  # the local executor has no parallelism limit of its own: waves of `parallel` jobs
        waves = [jobs[i : i + parallel] for i in range(0, len(jobs), parallel)]
    failed = []
    for wave in waves:
        pairs = wave if cfg.launcher == "slurm" else [(job, executor.submit(train_job, job)) for job in wave]
        for job, handle in pairs:
            log.info("%s: job %s trains %s", job.study, handle.job_id, job.folder)
        for job, handle in pairs:
            try:
                handle.result()
            except Exception as e:  # the job's own traceback is in out/.submitit/<id>/
                failed.append(
                    f"{job.folder}: submitit job {handle.job_id}: {str(e).strip().splitlines()[-1]}"
                )
    return failed
