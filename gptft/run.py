"""`python -m gptft.run experiment=NAME [overrides]`: compose, instantiate, fit, export.

Everything a run needs is chosen by Hydra from conf/; this file only wires the pieces together and
turns a ConfigError into one line on stderr and exit status 2.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from gptft.errors import ConfigError, Interrupted, StoppedEarly

log = logging.getLogger("gptft")


def _slug(text: str, limit: int = 100) -> str:
    """A folder-safe short form of a sweep job's overrides (paths contain '/')."""
    return re.sub(r"[^A-Za-z0-9=.,_+-]+", "_", text)[:limit].strip("_") or "job"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def job_name(overrides: Sequence[str], swept: Sequence[str], limit: int = 120) -> str:
    """A sweep job's folder name: the swept settings first, whole, then the others (sorted) as far as `limit`
    allows, so every job of a sweep reads apart in `ls` and TensorBoard however long the command line."""
    lead = [o for key in swept for o in overrides if _key(o) == key]
    rest = sorted(o for o in overrides if o not in lead)
    head = re.sub(r"[^A-Za-z0-9=.,_+-]+", "_", ",".join(lead)).strip("_")
    tail = _slug(",".join(rest), max(limit - len(head) - 1, 0)) if rest else ""
    return ",".join(part for part in (head, tail) if part) or "job"


def _swept_on_command_line(argv: Sequence[str]) -> list[str]:
    """The keys a `-m` command line sweeps (a,b / range() / choice() / glob()), in its order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, keys = OverridesParser.create(), []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # not an override (a flag's value): nothing to name a job by
            continue
        if override.is_sweep_override():
            keys.append(override.key_or_group)
    return keys


def _sweep_job_name(root: DictConfig) -> str:
    """`hydra.sweep.subdir`'s name part, from the job's overrides: the keys the experiment sweeps
    (hydra.sweeper.params) and those the command line sweeps lead. (A Slurm job resolves its folder in another
    process, whose command line is not the user's: there the experiment's keys lead, the others follow sorted.)"""
    hydra_cfg = root.hydra
    excluded = set(OmegaConf.select(hydra_cfg, "job.config.override_dirname.exclude_keys") or [])
    overrides = [
        o for o in hydra_cfg.overrides.task if _key(o) not in excluded and not _key(o).startswith("hydra.")
    ]
    swept = list(OmegaConf.select(hydra_cfg, "sweeper.params") or {})
    swept += [k for k in _swept_on_command_line(sys.argv[1:]) if k not in swept]
    return job_name(overrides, swept)


def _first(*values: Any) -> Any:
    """The first value that is set (the resumed run's folder, else a new timestamped one)."""
    return next((v for v in values if v is not None), None)


def _hydra_subdir(resume: str | None) -> str:
    """Where Hydra keeps this invocation's config: a resumed run's own .hydra/ stays as it was started."""
    from datetime import datetime

    return ".hydra" if resume is None else f".hydra/resumed_{datetime.now():%Y-%m-%d_%H-%M-%S.%f}"


OmegaConf.register_new_resolver("gptft_slug", _slug, replace=True)
OmegaConf.register_new_resolver("gptft_sweep_job", lambda _root_: _sweep_job_name(_root_), replace=True)
OmegaConf.register_new_resolver("gptft_first", _first, replace=True)
OmegaConf.register_new_resolver("gptft_hydra_subdir", _hydra_subdir, replace=True)
# conf/hydra/launcher/submitit_*.yaml extend the submitit plugin's configs of the same names on purpose: Hydra
# merges them onto the plugin's schema (which checks their keys), and warns that such matching is deprecated.
warnings.filterwarnings("ignore", r"(?s).*is validated against ConfigStore schema", UserWarning)


def _without(node: DictConfig, *keys: str) -> DictConfig:
    """A copy of a config node without `keys`: settings gptft reads itself beside a class's own arguments."""
    resolved = OmegaConf.to_container(node, resolve=True)  # interpolations point into the whole config
    return OmegaConf.create({k: v for k, v in resolved.items() if k not in keys})


def _val_check_in_batches(trainer_cfg: DictConfig) -> dict[str, Any]:
    """trainer.val_check_interval counts optimizer steps (as the README says); Lightning counts training batches,
    which under accumulation would validate inside an optimizer step: give Lightning steps × accumulation."""
    interval, accumulate = (
        trainer_cfg.get("val_check_interval"),
        trainer_cfg.get("accumulate_grad_batches", 1),
    )
    if isinstance(interval, int) and not isinstance(interval, bool) and accumulate > 1:
        return {"val_check_interval": interval * accumulate}
    return {}


def train(cfg: DictConfig, extra_callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run one experiment; return its metrics (what metrics.json holds). `extra_callbacks` join the config's
    (gptft.search adds a trial's pruning callback)."""
    from gptft.config import check_context, data_length_key, validate

    out = Path(cfg.paths.output_dir)
    if (out / "metrics.json").exists() and not cfg.ckpt_path:
        raise ConfigError(f"hydra.run.dir={out} already holds a run: choose a new folder (or leave it unset)")
    validate(cfg)  # before torch, Lightning and transformers load: a typo fails in a second

    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from gptft.callbacks import ReferenceProbe, RunRecord, SafeStop
    from gptft.callbacks.before_after import BeforeAfter
    from gptft.cluster import slurm_plugins
    from gptft.models import build_model, context_length, export_hf_model, model_config
    from gptft.models.precision import resolve_precision, set_tf32
    from gptft.models.sharding import full_weights, unsharded_copy
    from gptft.report.lengths import write_lengths_figure
    from gptft.tasks.freezing import apply_freeze, format_freeze_table
    from gptft.tasks.lora import apply_lora, is_lora, is_peft_model, save_adapter_and_merge
    from gptft.utils.checkpoint import AtomicCheckpointIO, check_resumable
    from gptft.utils.logs import quiet_lightning
    from gptft.utils.rich_tree import print_config_tree

    quiet_lightning()
    check_context(
        OmegaConf.select(cfg, data_length_key(cfg)),
        context_length(model_config(cfg.model.name_or_path, cfg.model.arch)),
        cfg.model.name_or_path or "model.arch",
        data_length_key(cfg),
    )

    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # corpus and split problems surface now, before weights load
    write_lengths_figure(out)  # question/answer data: the histogram of what the data module measured
    configured = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    probing = cfg.eval.get("enabled", True)
    if not probing:  # eval=off: no before/after probe of any kind
        configured = [c for c in configured if not isinstance(c, BeforeAfter)]
    # A missing reference text, or the training text itself, fails now, before the weights load.
    for callback in configured:
        if isinstance(callback, ReferenceProbe):
            callback.resolve(datamodule.text)
    model = build_model(**cfg.model)
    if is_lora(cfg.freeze):  # LoRA wraps the model (PEFT); the other strategies set requires_grad in place
        model, frozen = apply_lora(
            model, strategy=OmegaConf.select(cfg, "trainer.strategy._target_"), **cfg.freeze
        )
    else:
        frozen = apply_freeze(model, **cfg.freeze)
    log.info("freeze=%s: parameters per block\n%s", cfg.freeze.name, format_freeze_table(frozen))
    # _convert_="all": plain dicts and lists in hparams, so checkpoints load with weights_only=True.
    task = instantiate(
        cfg.task,
        model=model,
        optim=cfg.optim,
        schedule=cfg.schedule,
        seed=cfg.seed,
        no_decay=frozen.get("no_decay", []),
        _convert_="all",
    )
    check_resumable(cfg.ckpt_path, task)

    record = RunRecord(
        out / "metrics.json", OmegaConf.to_container(cfg, resolve=True), resume=bool(cfg.ckpt_path)
    )
    record.data.update(experiment=cfg.experiment_name, output_dir=str(out), seed=cfg.seed, freeze=frozen)
    callbacks = [
        record,
        # eval.reference is the ReferenceProbe's text
        *([instantiate(_without(cfg.eval, "reference", "enabled"))] if probing else []),
        *configured,
        *extra_callbacks,
        # Last (Lightning runs checkpoint callbacks after all others): a stop's checkpoint holds every record of
        # the step, and a nan step is judged before any checkpoint of it is written.
        SafeStop(),
    ]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    set_tf32(bool(cfg.trainer.get("tf32", False)))  # trainer=gpu turns it on; a no-op off CUDA
    trainer = instantiate(
        _without(cfg.trainer, "tf32"),  # gptft's setting beside Lightning's own
        **_val_check_in_batches(cfg.trainer),
        callbacks=callbacks,
        logger=loggers or False,
        precision=precision,
        plugins=[AtomicCheckpointIO(), *slurm_plugins()],  # Slurm: its ranks, and auto-requeue on SIGUSR1
    )

    print_config_tree(cfg)  # once every check has passed: a refused setting is one line, not after the tree
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except SIGTERMException:  # Lightning's own, raised when SIGTERM lands outside a training step
        raise Interrupted("SIGTERM: stopped during validation") from None
    weights = full_weights(task.model, trainer.strategy)  # trainer=fsdp: every rank joins the gather
    if trainer.is_global_zero:
        model = task.model if weights is None else unsharded_copy(task.model, weights)
        # LoRA: the adapter in PEFT's format beside hf_model/, which gets the merged weights.
        if is_peft_model(model):
            model = save_adapter_and_merge(model, out / "lora_adapter")
        export_hf_model(model, out / "hf_model")
        log.info("outputs: %s  (tensorboard --logdir %s)", out, out.parent)
    return record.data


def _remove_refused_run(cfg: DictConfig) -> None:
    """A new run refused before it trained leaves no folder behind: Hydra made it (its .hydra/ and an empty
    run.log) before gptft could check a thing. A resumed or requeued run's folder, or one holding metrics.json
    (a run that started), stays."""
    import shutil

    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("resume") is None and out.is_dir() and not (out / "metrics.json").exists():
        shutil.rmtree(out, ignore_errors=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        if cfg.resume:
            from hydra.core.hydra_config import HydraConfig

            from gptft.config import resumed_config

            cfg = resumed_config(cfg, list(HydraConfig.get().overrides.task))
        else:  # a job that Slurm requeued continues its own run folder (gptft/cluster.py)
            from gptft.cluster import continue_requeued

            cfg = continue_requeued(cfg)
        metrics = train(cfg)
    except ConfigError as e:
        _remove_refused_run(cfg)
        print(f"gptft: error: {e}", file=sys.stderr)
        sys.exit(2)
    except StoppedEarly as stopped:
        print(f"gptft: {stopped.status}: {stopped}", file=sys.stderr)
        if (
            isinstance(stopped, Interrupted)
            and Path(cfg.paths.output_dir, "checkpoints", "last.ckpt").is_file()
        ):
            print(f"gptft: resume with: python -m gptft.run resume={cfg.paths.output_dir}", file=sys.stderr)
        sys.exit(stopped.exit_code)
    return metrics.get("after", {}).get("val_loss")


if __name__ == "__main__":
    from gptft.config import check_renamed

    try:
        check_renamed(sys.argv[1:])
    except ConfigError as e:
        print(f"gptft: error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
