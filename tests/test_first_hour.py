"""What a newcomer meets in the first hour (issue 26): outputs others can read, options in any order, sweep
folders named by what they sweep, probes that say what they cost, a refused setting that leaves nothing behind."""

from __future__ import annotations

import os
import stat

import pytest

from gptft.utils.io import atomic_write_text


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_are_readable_as_the_umask_says(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "metrics.json", "{}\n")
        plain = tmp_path / "plain.txt"
        plain.write_text("{}\n")  # what open() gives: 0o666 less the umask
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize(
    ("module", "argv", "expected"),
    [
        (
            "generate",
            ["RUN", "--seed", "3", "--max-new-tokens", "12", "The king", "--num-samples", "2"],
            {"source": "RUN", "prompts": ["The king"], "seed": 3, "max_new_tokens": 12, "num_samples": 2},
        ),
        (
            "evaluate",
            ["--book", "2701", "RUN", "--batch-size", "2"],
            {"source": "RUN", "book": 2701, "batch_size": 2},
        ),
        ("export", ["--checkpoint", "last", "RUN"], {"source": "RUN", "checkpoint": "last"}),
        ("chat", ["--max-new-tokens", "5", "RUN"], {"source": "RUN", "max_new_tokens": 5}),
    ],
)
def test_command_options_go_before_or_after_the_positionals(module, argv, expected):
    import importlib

    args = importlib.import_module(f"gptft.cli.{module}").build_parser().parse_args(argv)
    assert {k: getattr(args, k) for k in expected} == expected


def test_make_tensorboard_never_reinstalls(tmp_path):
    import shutil
    import subprocess
    import time

    from conftest import REPO

    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / ".installed").touch()
    (tmp_path / ".venv" / "bin" / "tensorboard").touch(mode=0o755)
    time.sleep(0.01)
    (tmp_path / "pyproject.toml").touch()  # changed since the environment was installed
    # -n prints what make would run (and runs the lines that call make again, which the test would see).
    planned = subprocess.run(
        ["make", "-n", "tensorboard"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert "install" not in planned.stdout and "tensorboard --logdir outputs" in planned.stdout


def _job_folder(*overrides: str) -> str:
    """The sweep job's folder name Hydra makes from the composed config (what a multirun's launcher resolves)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import gptft.run  # noqa: F401 (registers the resolvers the config names)

    from conftest import REPO

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", [*overrides, "hydra.job.num=3"], return_hydra_config=True)
    return OmegaConf.select(cfg, "hydra.sweep.subdir")


def test_sweep_folders_start_with_the_swept_keys_and_never_cut_their_values():
    # learn_forget sweeps freeze= by itself (hydra.sweeper.params); a long command line came first before, cut the
    # swept value off at 100 characters, and left four jobs that TensorBoard could not tell apart.
    settings = [
        "data.batch_size=8", "data.book=2701", "data.seq_len=128", "eval.max_new_tokens=30", "eval.repeats=2",
        "eval.free_prompts=5", "data.val_windows=8", "trainer.max_steps=30", "optim.lr=0.001",
    ]  # fmt: skip
    name = _job_folder("experiment=learn_forget", *settings, "freeze=late_attention")
    assert name.startswith("3_freeze=late_attention,"), name
    assert len(name) <= len("3_") + 120 and "experiment" not in name
    # A sweep on the command line: its key leads too (gptft.run reads which keys the command line sweeps).
    from gptft.run import _swept_on_command_line, job_name

    argv = [
        "-m",
        "experiment=lr_sweep",
        "seed=range(1,3)",
        "optim.lr=1e-4,1e-5",
        "data.book=[829]",
        "--cfg",
        "job",
    ]
    assert _swept_on_command_line(argv) == ["seed", "optim.lr"]

    job = ["data.batch_size=8", "optim.lr=1e-05", "seed=2"]
    assert job_name(job, swept=["seed", "optim.lr"]) == "seed=2,optim.lr=1e-05,data.batch_size=8"
    assert (
        job_name(["model.name_or_path=outputs/q/hf_model"], swept=[])
        == "model.name_or_path=outputs_q_hf_model"
    )
