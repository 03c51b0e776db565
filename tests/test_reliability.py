"""Losing nothing: exact resume after a SIGKILL (which also shows: same seed, same curve), Ctrl-C/SIGTERM stops, a
diverging run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from lightning.pytorch.callbacks import Checkpoint
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptft.errors import Interrupted
from gptft.utils.checkpoint import AtomicCheckpointIO

from conftest import REPO

# The tiny model with its default dropout (0.1): exact resume must restore the dropout masks too; the
# weight-change tracker's rows must carry across the resume like every other record.
RUN = (
    "debug=fast",
    "optim.lr=1e-3",
    "trainer.max_steps=16",
    "callbacks=weight_delta",
    "callbacks.checkpoint.every_n_train_steps=4",
)


def train_losses(run_dir) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "hf_model" / "model.safetensors")


def start(gptft_env, *overrides: str, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gptft.run", *overrides], cwd=REPO, env=gptft_env, stdout=log, stderr=log
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the condition held"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(run_ok, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "whole"
    run_ok(*RUN, f"hydra.run.dir={out}")
    return out


def test_sigkill_then_resume_is_bitwise_identical(uninterrupted, run_ok, gptft_env, tmp_path):
    killed = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = start(gptft_env, *RUN, f"hydra.run.dir={killed}", log=log)
        wait_for((killed / "checkpoints" / "last.ckpt").is_file, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert 4 <= saved["global_step"] < 16 and metrics(killed)["status"] == "running"  # killed mid-run

    result = run_ok(f"resume={killed}")  # the shortcut: the run's own settings, in its own folder
    assert metrics(killed)["status"] == "completed" and metrics(killed)["steps"] == 16
    assert f"training batches {saved['global_step']} to 15" in result.stderr + result.stdout
    # Every step from the checkpoint on was logged again; the killed run's earlier points are whatever reached
    # the disk before the kill. All of them equal the uninterrupted run's, bit for bit.
    resumed_losses, whole_losses = train_losses(killed), train_losses(uninterrupted)
    assert set(range(saved["global_step"], 16)) <= set(resumed_losses)
    assert all(resumed_losses[step] == whole_losses[step] for step in resumed_losses)
    whole, resumed = final_weights(uninterrupted), final_weights(killed)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    # What the run measured carried across the kill: every step's weight change, the batches' fingerprint, the
    # tokens, the losses; a report of the two runs says the same of both (timings aside).
    assert (killed / "weight_delta.csv").read_text() == (uninterrupted / "weight_delta.csv").read_text()
    assert len((killed / "weight_delta.csv").read_text().splitlines()) == 1 + 16
    a, b = metrics(uninterrupted), metrics(killed)
    # "train" holds the losses from step 0, which the killed run computed before its kill: the same seed gives the
    # same curve, bit for bit (this test is also the same-seed test).
    for key in ("train", "steps", "tokens_trained", "data_fingerprint", "weight_delta"):
        assert b[key] == a[key], key
    # Every after-probe too, ref_kl included: the starting model's distributions travel in the checkpoint.
    assert b["after"] == a["after"] and a["after"]["ref_kl"] > 0
    assert a["tokens_trained"] == 16 * 4 * 64  # debug=fast: batch 4 × 64, every target labelled


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_ends_the_step_saves_and_says_how_to_resume(sig, gptft_env, tmp_path):
    out = tmp_path / "run"
    with open(tmp_path / "run.log", "w") as log:
        proc = start(
            gptft_env, "debug=fast", "trainer.max_steps=100000", "callbacks=weight_delta", f"hydra.run.dir={out}", log=log
        )
        wait_for(lambda: (out / "metrics.json").is_file() and metrics(out).get("before"), proc)
        proc.send_signal(sig)
        returncode = proc.wait(timeout=120)
    stderr = (tmp_path / "run.log").read_text()
    assert returncode == 130, stderr[-2000:]
    rows = (out / "weight_delta.csv").read_text().splitlines()  # a stopped run writes what it measured
    assert len(rows) == 1 + metrics(out)["steps"]
    assert f"gptft: resume with: python -m gptft.run resume={out}" in stderr
    assert "Traceback" not in stderr
    record = metrics(out)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert record["status"] == "interrupted" and record["steps"] == ckpt["global_step"] >= 1
    assert record["steps"] < 100000 and "before" in record and "after" not in record


def test_a_diverging_run_stops_and_keeps_the_checkpoint_before_it(run_gptft, tmp_path):
    out = tmp_path / "run"
    result = run_gptft(
        "debug=fast", "optim.lr=1e12", "callbacks.checkpoint.every_n_train_steps=1", f"hydra.run.dir={out}"
    )
    assert result.returncode == 3 and "Traceback" not in result.stderr
    line = next(x for x in result.stderr.splitlines() if x.startswith("gptft: diverged"))
    assert "train/loss is nan at step" in line and "(lr 1e+12)" in line and "lower optim.lr" in line
    record = metrics(out)
    assert record["status"] == "diverged" and record["steps"] < 10
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == record["steps"] - 1  # the step before the bad one, checkpointed every step
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


def test_a_failed_checkpoint_write_leaves_the_previous_one_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 (pickling a lambda fails half-way through the write)
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3), "bad": lambda: None}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    assert torch.load(path, weights_only=True)["global_step"] == 1


class _SigtermAfterSafeStop(Checkpoint):
    """Sends this process SIGTERM from the hook of a checkpoint callback, which Lightning runs after SafeStop's:
    the signal lands where a kill can land while `last.ckpt` is being written, after SafeStop looked for one."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            signal.raise_signal(signal.SIGTERM)


def test_a_completed_run_puts_the_signal_handlers_back(train_here):
    """A run in a process that goes on (a search's trials, a notebook) leaves the SIGINT and SIGTERM handlers as it
    found them. Lightning puts its originals back before the callbacks' teardown, and SafeStop then put back the
    Lightning handler it had replaced: the CI run of 2026-12-06 found it installed after an in-process run."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    metrics = train_here("debug=fast", "trainer.max_steps=2", "eval=off")
    assert metrics["status"] == "completed"
    assert {s: signal.getsignal(s) for s in before} == before


def test_sigterm_after_safestop_looked_still_stops_at_the_end_of_a_step(train_here, tmp_path):
    """The CI failure of 2026-12-06 (test_search's stopped trial): SIGTERM while the checkpoint of step 2 was being
    written reached Lightning's own check after the step, which stopped the run as "during validation"."""
    assert threading.current_thread() is threading.main_thread()  # else the signal would end the test process
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as stopped:
        train_here("debug=fast", "trainer.max_steps=8", "callbacks.checkpoint.every_n_train_steps=2", out=out,
                   callbacks=(_SigtermAfterSafeStop(at_step=2),))  # fmt: skip
    last = out / "checkpoints" / "last.ckpt"
    assert str(stopped.value) == f"SIGTERM: stopped after step 3, checkpoint {last}"
    ckpt = torch.load(last, weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == metrics(out)["steps"] == 3 and metrics(out)["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back after the run
