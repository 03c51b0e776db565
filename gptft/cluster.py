"""Slurm: the cluster environment a run trains under, the requeue that continues it, and the checks of the
submitit launcher's settings that run before any job is submitted.

The engines are Lightning's (`SLURMEnvironment`: ranks from Slurm's variables, and on the requeue signal a
checkpoint plus `scontrol requeue`) and submitit's (through hydra-submitit-launcher). What gptft adds is the
run folder: a requeued job finds the run it started and continues it through `resume=` (exact resume).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gptft.errors import ConfigError

# Slurm sends it `--signal=USR1@<seconds>` before the time limit (scripts/slurm_ddp.sbatch, and the submitit
# launcher's additional_parameters): Lightning then saves a checkpoint and requeues the job.
REQUEUE_SIGNAL = signal.SIGUSR1


def on_slurm() -> bool:
    """True inside a Slurm job step (srun, sbatch), as Lightning judges it: SLURM_NTASKS is set and the job is
    not an interactive shell (job name `bash` or `interactive`)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


def slurm_plugins() -> list[Any]:
    """The Trainer plugins for the cluster this process runs on: under Slurm, Lightning's SLURMEnvironment with
    auto-requeue on SIGUSR1 (ranks, world size and the main node come from Slurm's variables; no process is
    spawned: Slurm starts one task per GPU). Elsewhere none: Lightning detects torchrun or spawns itself."""
    if not on_slurm():
        return []
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=True, requeue_signal=REQUEUE_SIGNAL)]


def restart_count() -> int:
    """How many times Slurm has requeued this job (SLURM_RESTART_COUNT; 0 for its first start)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def newest_checkpoint(run: Path) -> Path | None:
    """The run's newest checkpoint: `checkpoints/last*.ckpt` (written at the end of a step by SafeStop on
    SIGTERM, and periodically) or Lightning's `hpc_ckpt_<n>.ckpt` (written when the requeue signal came),
    whichever was written last, so a job killed before its step ended loses as little as possible."""
    # last-v1.ckpt: Lightning's ModelCheckpoint versions `last` when last.ckpt was written by someone else (SafeStop)
    found = [*(run / "checkpoints").glob("last*.ckpt"), *run.glob("hpc_ckpt_*.ckpt")]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def continue_requeued(cfg: DictConfig) -> DictConfig:
    """A job that Slurm requeued starts again with its first command line, so it finds its own run folder
    holding a run: continue that run exactly (the `resume=` logic) instead of refusing the folder.
    Unchanged outside a requeued Slurm job, for an explicit `resume=`/`ckpt_path=`, or when the folder is new."""
    if restart_count() < 1 or cfg.get("resume") or cfg.get("ckpt_path"):
        return cfg
    run = Path(cfg.paths.output_dir)
    if not (run / "metrics.json").is_file():
        return cfg  # requeued before the run began: start it
    from gptft.config import resumed_config

    start = cfg.copy()
    start.resume = str(run)
    resumed = resumed_config(start, [])
    newest = newest_checkpoint(run)
    if newest is not None:
        resumed.ckpt_path = str(newest)
    print(
        f"gptft: Slurm requeue {restart_count()}: continuing {run} from {resumed.ckpt_path}", file=sys.stderr
    )
    return resumed


def check_slurm_launcher(params: dict[str, Any], config: DictConfig) -> None:
    """Raise ConfigError for settings of hydra/launcher=submitit_slurm that would only fail on the cluster."""
    where = "in conf/hydra/launcher/submitit_slurm.yaml or on the command line"
    if not params.get("partition"):
        raise ConfigError(
            f"hydra.launcher.partition is not set: name your cluster's partition {where}, "
            "e.g. hydra.launcher.partition=gpu"
        )
    for key in ("timeout_min", "nodes", "tasks_per_node"):
        value = params.get(key)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"hydra.launcher.{key}={value} must be a whole number ≥ 1: set it {where}")
    gpus = params.get("gpus_per_node")
    if gpus is not None and gpus != params["tasks_per_node"]:
        raise ConfigError(
            f"hydra.launcher.tasks_per_node={params['tasks_per_node']} differs from gpus_per_node={gpus}: "
            "Lightning trains one Slurm task per GPU, so set both to the GPUs per node"
        )
    devices = OmegaConf.select(config, "trainer.devices", default=None)
    if isinstance(devices, int) and devices != params["tasks_per_node"]:
        raise ConfigError(
            f"trainer.devices={devices} differs from hydra.launcher.tasks_per_node={params['tasks_per_node']}: "
            "each Slurm task drives one device, so set trainer.devices to the tasks per node (or auto)"
        )
    num_nodes = OmegaConf.select(config, "trainer.num_nodes", default=1)
    if num_nodes != params["nodes"]:
        raise ConfigError(
            f"trainer.num_nodes={num_nodes} differs from hydra.launcher.nodes={params['nodes']}: set both to "
            "the nodes each job trains on"
        )
    if shutil.which("sbatch") is None:
        raise ConfigError(
            "hydra/launcher=submitit_slurm needs Slurm's sbatch, which is not on this machine's PATH: submit from "
            "a login node, or use hydra/launcher=submitit_local here"
        )


class SlurmLauncherCheck(Callback):
    """Hydra callback (hydra/launcher=submitit_slurm adds it): checks gptft's cluster settings when the multirun
    starts, before any job is submitted. Hydra only loads launchers from its `hydra_plugins` package, so the
    check cannot live in a launcher subclass; without it submitit would submit, and each job would fail on
    the cluster."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not str(config.hydra.launcher.get("_target_", "")).endswith(".SlurmLauncher"):
            return
        params = OmegaConf.to_container(config.hydra.launcher, resolve=True)
        try:
            check_slurm_launcher(params, config)
        except ConfigError as e:
            print(f"gptft: error: {e}", file=sys.stderr)
            sys.exit(2)
