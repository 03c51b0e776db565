"""Beyond one machine, what can run without Slurm: a 2-job sweep through the submitit launcher (jobs run at once,
the report when the last ends), Lightning's Slurm environment from Slurm's variables, the requeue path
(SIGUSR1 → checkpoint + `scontrol requeue` → SIGTERM → last.ckpt → the requeued job continues its run exactly),
and the launcher's settings checked before anything is submitted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

# Tiny runs: 12 steps (time for a signal to land mid-training), one generation seed, no reference probe.
TINY = [
    "debug=fast", "eval.repeats=1", "eval.free_prompts=2", "eval.max_new_tokens=8", "~callbacks.reference",
    "data.val_windows=4", "trainer.max_steps=12", "trainer.val_check_interval=6",
]  # fmt: skip
SLURM = {  # one task of a one-node job, as srun would set them
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "gptft", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}  # fmt: skip


@pytest.fixture(scope="module")
def sweep(run_ok, tmp_path_factory) -> Path:
    """`-m hydra/launcher=submitit_local` over two learning rates."""
    folder = tmp_path_factory.mktemp("submitit") / "sweep"
    run_ok("-m", "hydra/launcher=submitit_local", *TINY, "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={folder}",
           timeout=900)  # fmt: skip
    return folder


def test_submitit_local_sweep_writes_runs_and_report(sweep):
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert [p.name.split("_")[0] for p in jobs] == [
        "0",
        "1",
    ]  # hydra.sweep.subdir, as under the basic launcher
    metrics = [json.loads((p / "metrics.json").read_text()) for p in jobs]
    assert [m["status"] for m in metrics] == ["completed", "completed"]
    assert [m["config"]["optim"]["lr"] for m in metrics] == [1e-3, 3e-3]
    assert all((p / "checkpoints" / "last.ckpt").is_file() and (p / "hf_model").is_dir() for p in jobs)
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) >= 2  # each job ran as a submitit job
    summary = (sweep / "report" / "summary.md").read_text()  # SweepReport ran after both jobs ended
    assert "optim.lr=0.001" in summary and "optim.lr=0.003" in summary
    assert (sweep / "report" / "loss.png").is_file()


def test_slurm_variables_give_lightning_slurm_environment(monkeypatch):
    import lightning as L
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from gptft.cluster import REQUEUE_SIGNAL, slurm_plugins

    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    assert slurm_plugins() == []  # not under Slurm: Lightning spawns or reads torchrun itself
    # rank 9 of a 2-node × 8-GPU job: the second task on the second node
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no srun here, as on a compute node's task
    for key, value in {
        "SLURM_JOB_ID": "123456", "SLURM_JOB_NAME": "gptft", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_NNODES": "2", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
        "SLURM_NODELIST": "gpu[03-04]",
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    (env,) = slurm_plugins()
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal == REQUEUE_SIGNAL
    assert REQUEUE_SIGNAL == signal.SIGUSR1
    trainer = L.Trainer(
        accelerator="cpu", devices=8, num_nodes=2, strategy="ddp", plugins=[env], logger=False,
        enable_checkpointing=False, enable_progress_bar=False,
    )  # fmt: skip
    assert trainer._accelerator_connector.cluster_environment is env
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (16, 9, 1, 1)
    assert env.creates_processes_externally  # Slurm started the ranks: Lightning spawns none
    assert (env.main_address, env.main_port) == ("gpu03", 15000 + 3456)
    env.validate_settings(num_devices=8, num_nodes=2)  # what Lightning checks when the strategy sets up
    with pytest.raises(ValueError, match="devices=8"):  # devices must equal the tasks per node
        env.validate_settings(num_devices=4, num_nodes=2)
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # `srun --pty bash`: Lightning's rule, not a job step
    assert slurm_plugins() == []


def _wait_for_training(metrics: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until RunRecord says training began (it writes metrics.json at the first step, after the "before" probe)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            data = json.loads(metrics.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            data = {}
        if data.get("status") == "running" and "before" in data:
            return
        time.sleep(0.2)
    raise AssertionError(f"training never began (exit {proc.poll()})")


def test_requeue_signal_checkpoints_and_requeued_job_continues_exactly(sweep, gptft_env, tmp_path):
    """Slurm's part is played by the test: its variables, a stand-in `scontrol` (records the requeue and, like
    Slurm requeueing a running job, sends it SIGTERM), and the second start with SLURM_RESTART_COUNT=1."""
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {log}\nkill -TERM $PPID\n')
    scontrol.chmod(0o755)
    run = tmp_path / "run"
    env = {**gptft_env, **SLURM, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    command = [sys.executable, "-m", "gptft.run", *TINY, "optim.lr=3e-3", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for_training(run / "metrics.json", proc)
        proc.send_signal(signal.SIGUSR1)  # Slurm: --signal=USR1@120, the time limit is near
        _, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert log.read_text().split() == ["requeue", "4242"]  # Lightning requeued this job
    assert list(run.glob("hpc_ckpt_*.ckpt"))  # Lightning's checkpoint at the signal
    stopped = json.loads((run / "metrics.json").read_text())
    assert stopped["status"] == "interrupted" and 0 < stopped["steps"] < 12
    assert (run / "checkpoints" / "last.ckpt").is_file()  # gptft's, at the end of the step, after SIGTERM

    # The requeued job: the same command line, Slurm counting the restart. It continues the run in place.
    again = subprocess.run(command, cwd=REPO, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Slurm requeue 1: continuing {run} from {run}/checkpoints/last.ckpt" in again.stderr
    done = json.loads((run / "metrics.json").read_text())
    assert done["status"] == "completed" and done["steps"] == 12
    # ... exactly: the same numbers as the uninterrupted sweep job with the same settings
    (reference,) = [p for p in sweep.iterdir() if p.name.startswith("1_")]
    straight = json.loads((reference / "metrics.json").read_text())
    assert straight["config"]["optim"]["lr"] == 3e-3
    # Exact, to the bit: the held-out loss, every train loss, and what the run recorded across the stop.
    for key in ("after", "train", "steps", "tokens_trained", "data_fingerprint"):
        assert done[key] == straight[key], key


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], "hydra.launcher.partition is not set"),
        (["hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4"], "trainer.devices=1 differs"),
        (["hydra.launcher.partition=gpu", "hydra.launcher.nodes=2"], "trainer.num_nodes=1 differs"),
        (["hydra.launcher.partition=gpu"], "needs Slurm's sbatch"),
    ],
    ids=["no partition", "tasks vs devices", "nodes", "no sbatch"],
)
def test_slurm_launcher_settings_fail_before_submitting(run_gptft, tmp_path, overrides, message):
    folder = tmp_path / "sweep"
    result = run_gptft("-m", "hydra/launcher=submitit_slurm", *overrides, "debug=fast", "optim.lr=1e-3,1e-4",
                       f"hydra.sweep.dir={folder}", env={"PATH": "/usr/bin:/bin"}, timeout=120)  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("gptft: error: ") and message in lines[-1], result.stderr[-2000:]
    assert not any("Traceback" in line for line in lines)
    assert not folder.exists()  # nothing submitted, nothing written


def test_sbatch_script_is_valid_bash_and_asks_for_signal_and_requeue():
    script = REPO / "scripts" / "slurm_ddp.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    directives = [line.split()[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "--signal=USR1@120" in directives and "--requeue" in directives
    assert "--ntasks-per-node=8" in directives and "--gpus-per-node=8" in directives  # one task per GPU
