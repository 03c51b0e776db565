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


# -- what the probes cost, and a resumed run's record


def _metrics(run) -> dict:
    import json

    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def resumed_run(gptft_env, tmp_path_factory):
    """A debug=fast run stopped by SIGTERM after its first checkpoint, resumed to the end with other probe
    settings (eval.repeats=2 where the before probes ran 1): (folder, the resume's stdout + stderr)."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    out = tmp_path_factory.mktemp("first_hour") / "run"
    run = [
        "debug=fast",
        "trainer.max_steps=400",
        "callbacks.checkpoint.every_n_train_steps=2",
        f"hydra.run.dir={out}",
    ]
    proc = subprocess.Popen([sys.executable, "-m", "gptft.run", *run], cwd=REPO, env=gptft_env)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "last.ckpt").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    assert "error" in _metrics(out)  # the stop's own record: "Interrupted: SIGTERM ..."
    resumed = subprocess.run(
        [sys.executable, "-m", "gptft.run", f"resume={out}", "trainer.max_steps=6", "eval.repeats=2"],
        cwd=REPO, env=gptft_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return out, resumed.stdout + resumed.stderr


def test_a_completed_resume_keeps_no_error_and_says_before_and_after_differ(resumed_run):
    out, log = resumed_run
    record = _metrics(out)
    assert record["status"] == "completed" and "error" not in record
    probes = record["probes"]["Probes"]
    assert probes["settings_before"]["eval.repeats"] == 1 and probes["settings_after"]["eval.repeats"] == 2
    assert probes["comparable"] is False
    warning = next(line for line in log.splitlines() if "not comparable" in line)
    assert "eval.repeats" in warning and "1" in warning and "2" in warning
    assert record["probes"]["ReferenceProbe"]["comparable"] is True  # its settings did not change


def test_metrics_and_log_give_the_probes_time_beside_the_training_time(resumed_run):
    out, log = resumed_run
    record = _metrics(out)
    time_ = record["time"]
    each = [s for probe in record["probes"].values() for s in (probe["before_s"], probe["after_s"])]
    # The before probes ran in the first segment; their time travelled in the checkpoint.
    assert all(s > 0 for s in each) and time_["probes_s"] == pytest.approx(sum(each), abs=2e-3)
    # Probes, training and validation are disjoint spans of the fit (each carried across the resume).
    assert time_["probes_s"] + time_["train_s"] + time_["val_s"] <= time_["fit_s"]
    line = next(line for line in log.splitlines() if "probes took" in line)
    assert f"{time_['probes_s']:.1f} s" in line and f"{time_['train_s']:.1f} s" in line


def test_a_refused_setting_is_one_line_first_and_leaves_no_folder(run_gptft, tmp_path):
    out = tmp_path / "run"
    # Refused after Hydra made the folder and after the config tree was printed: windows longer than the model's
    # context (checked once the model's config is read).
    result = run_gptft("debug=fast", "data.seq_len=4096", f"hydra.run.dir={out}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("gptft: error: data.seq_len=4096")
    assert "experiment_name" not in result.stdout  # no config tree before the error
    assert not out.exists()


def test_eval_presets(run_ok, tmp_path):
    from hydra import compose, initialize_config_dir

    from conftest import REPO

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        light = compose("config", ["experiment=quickstart", "eval=light"])
    assert (light.eval.repeats, light.eval.free_prompts, light.eval.max_new_tokens) == (1, 10, 30)
    assert light.data.val_windows == 8 and light.eval.style_tokens == 100  # the rest as eval=default
    out = tmp_path / "off"
    run_ok("debug=fast", "eval=off", "trainer.max_steps=2", f"hydra.run.dir={out}")
    record = _metrics(out)
    assert record["status"] == "completed" and "probes" not in record
    assert "before" not in record and "after" not in record and not (out / "samples").exists()


# -- the report: its TensorBoard entries and its figures


def _run_folder(folder, lr: float, style_after: float) -> None:
    """A training's folder as gptft leaves it (overrides, metrics.json, its curves), the before probe at 0%."""
    import json

    import yaml
    from torch.utils.tensorboard import SummaryWriter

    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra/overrides.yaml").write_text(yaml.safe_dump([f"optim.lr={lr}"]))
    probe = lambda value: {"mean": value, "std": None, "values": [value]}  # noqa: E731
    record = {
        "status": "completed",
        "config": {"optim": {"lr": lr}},
        "before": {"val_loss": 10.8, "style_ratio": probe(0.0)},
        "after": {"val_loss": 6.0, "val_ppl": 403.4, "style_ratio": probe(style_after)},
        "held_out_text": {"style_ratio": 55.2, "tokens": 1000},
        "train": {"loss_first": 10.9, "loss_last": 6.1},
        "steps": 5,
        "time": {"train_s": 10.0, "fit_s": 11.0, "probes_s": 0.5},
    }
    (folder / "metrics.json").write_text(json.dumps(record))
    with SummaryWriter(str(folder / "tensorboard")) as writer:
        for step in range(5):
            writer.add_scalar("train/loss", 10.9 - step, step)
        for step, loss in ((0, 10.8), (4, 6.0)):
            writer.add_scalar("val/loss", loss, step)
        writer.add_scalar("probe/style_ratio", style_after, 4)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from gptft.report.write import write_report

    sweep = tmp_path_factory.mktemp("sweep")
    for i, (lr, style) in enumerate(((1e-3, 61.0), (1e-4, 48.0))):
        _run_folder(sweep / f"{i}_optim.lr={lr}", lr, style)
    write_report(sweep)
    write_report(sweep)  # a second report replaces the first's entries
    return sweep


def test_report_tensorboard_holds_figures_and_text_and_the_trainings_hold_hparams(report):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    board = report / "report/tensorboard"
    assert not [p for p in board.iterdir() if p.is_dir()]  # one entry for the report, not one per run
    acc = EventAccumulator(str(board), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert acc.Tags()["scalars"] == []  # no one-point charts
    assert {"report/loss", "report/style_ratio"} <= set(acc.Tags()["images"])
    (summary,) = acc.Tensors("report/summary/text_summary")
    assert "held-out text" in summary.tensor_proto.string_val[0].decode()
    for run in sorted(report.glob("*_optim.lr=*")):
        sessions = list((run / "tensorboard").glob("*.gptft_report_hparams"))
        assert len(sessions) == 1  # the second report replaced the first's
        events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
        events.Reload()
        start = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
        info = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info
        assert info.hparams["optim.lr"].number_value == float(run.name.split("=")[1])
        experiment = events.SummaryMetadata("_hparams_/experiment").plugin_data.content
        metrics = plugin_data_pb2.HParamsPluginData.FromString(experiment).experiment.metric_infos
        # The HParams metrics are the training's own curves: their last points are the after values.
        assert {m.name.tag for m in metrics} == {"val/loss", "val/ppl", "probe/style_ratio"}


def test_style_ratio_table_gives_the_held_out_texts_own_ratio(report):
    text = (report / "report/summary.md").read_text()
    header, *rows = [line for line in text.splitlines() if line.startswith("| ")][:3]
    column = [c.strip() for c in header.split("|")].index("style ratio % of the held-out text")
    assert [[c.strip() for c in row.split("|")][column] for row in rows] == ["55.2", "55.2"]
    assert "the same share in the held-out text itself" in text


def test_held_out_texts_style_ratio_equals_an_independent_count(resumed_run):
    """The baseline recomputed from the book with the tokenizers library: the book's 100 most frequent ids (ties
    to the lower id) and the labels of the validation windows metrics.json names."""
    from collections import Counter

    from oracle.independent import DATA, book_ids

    out, _ = resumed_run
    record = _metrics(out)
    ids = book_ids(DATA / "gulliver" / "pg829.txt").tolist()
    counts = Counter(ids)
    style = set(sorted(counts, key=lambda i: (-counts[i], i))[:100])
    seq_len = record["data"]["seq_len"]
    labels = [t for s in record["data"]["val_starts"] for t in ids[s + 1 : s + seq_len + 1]]
    expected = 100 * sum(t in style for t in labels) / len(labels)
    assert record["held_out_text"] == {
        "style_ratio": pytest.approx(expected, abs=1e-12),
        "tokens": len(labels),
    }
    assert 40 < expected < 70  # real prose: about half its tokens are the book's 100 most frequent


def test_evaluate_shows_progress_on_a_terminal(tiny_model_dir, gptft_env, book_text, tmp_path):
    """gptft-evaluate on a terminal (a pseudo-terminal of 300 columns here) draws a progress bar on stderr."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    from conftest import REPO

    leader, follower = pty.openpty()
    fcntl.ioctl(
        follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 300, 0, 0)
    )  # tqdm draws nothing in 0 columns, and no bar where the description (a path under xdist's tmp) fills them
    env = {k: v for k, v in gptft_env.items() if k != "TQDM_DISABLE"}
    text = tmp_path / "part.txt"
    text.write_text(book_text[:20000])
    argv = [str(tiny_model_dir), "--text", str(text), "--window", "64", "--stride", "64", "--batch-size", "4"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptft.cli.evaluate", *argv],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=follower, text=True,
    )  # fmt: skip
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        shown += chunk
    stdout, _ = proc.communicate(timeout=300)
    os.close(leader)
    assert proc.returncode == 0 and "perplexity" in stdout
    assert f"gptft-evaluate: {text}".encode() in shown and b"%|" in shown  # a bar, cleared when done


def test_figures_show_the_held_out_curve_whole_steps_zero_bars_and_the_baseline(report):
    import matplotlib.pyplot as plt

    from gptft.report.collect import find_runs
    from gptft.report.figures import before_after_figure, loss_figure

    runs = find_runs(report)
    ax = loss_figure(runs).axes[0]
    held_out = [line for line in ax.get_lines() if line.get_label().endswith("held-out")]
    assert [list(line.get_xdata()) for line in held_out] == [[0, 4], [0, 4]]
    assert all(float(t).is_integer() for t in ax.get_xticks())
    ax = before_after_figure(runs, "style_ratio", "style ratio (%)").axes[0]
    assert [t.get_text() for t in ax.texts] == ["0", "0", "61", "48"]  # every bar says its value, 0 included
    assert ax.get_ylim()[0] < 0  # a bar of height 0 shows above the axis
    (baseline,) = [line for line in ax.get_lines() if line.get_label().startswith("held-out text itself")]
    assert list(baseline.get_ydata()) == [55.2, 55.2]
    plt.close("all")


def test_learn_forget_names_the_reference_by_title():
    from gptft.report.learn_forget import book_title

    assert book_title("pg2701") == "Moby Dick (Gutenberg 2701)"
    assert book_title("pg829+notes.txt") == "Gulliver's Travels (Gutenberg 829) + notes.txt"
