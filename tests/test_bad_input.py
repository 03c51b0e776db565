"""Bad input from the command line: one line that names the setting and the fix, exit status ≠ 0,
no traceback, and nothing of an earlier run touched."""

import json

import pytest
import torch

FAST = ("debug=fast",)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    # A checkpoint of another model shape (its embedding is 10 × 8, the tiny model's 50257 × 64).
    torch.save({"state_dict": {"model.transformer.wte.weight": torch.zeros(10, 8)}}, d / "other.ckpt")
    return d


CASES = {
    "unknown experiment": (["experiment=nope"], "Could not find 'experiment/nope'"),
    "unknown group option": (["model=gpt5"], "Could not find 'model/gpt5'"),
    "lr zero": (["optim.lr=0"], "optim.lr=0 must be > 0"),
    "lr not a number": (["optim.lr=fast"], "optim.lr='fast' is not a number"),
    "batch size zero": (["data.batch_size=0"], "data.batch_size=0 must be a whole number ≥ 1"),
    "window longer than context": (["data.seq_len=512"], "data.seq_len=512 is longer than the context"),
    "unknown compile backend": (["model.compile=fastest"], "model.compile=fastest is no torch.compile backend"),
    "unknown split": (
        ["data.split=middle"],
        "data.split=middle is unknown: use one of tail, head, interleaved",
    ),
    "window longer than the test split": (["data.test_fraction=0.0001"], "does not fit in the test split"),
    "corpus path missing": (["data.path=/no/such/book.txt"], "data.path=/no/such/book.txt does not exist"),
    "empty corpus": (["data.path={bad}/empty.txt"], "is empty"),
    "binary corpus": (["data.path={bad}/image.png"], "is a binary file"),
    "top-k tokens zero": (
        ["eval.style_tokens=0"],
        "eval.style_tokens=0 must be a whole number between 1 and 50257",
    ),
    "top-k tokens past the vocabulary": (
        ["eval.style_tokens=60000"],
        "eval.style_tokens=60000 must be a whole number between 1 and 50257",
    ),
    "renamed: generation repeats": (["eval.seeds=2"], "eval.seeds is now eval.repeats: write eval.repeats=2"),
    "renamed: style set": (["eval.top_k_tokens=50"], "eval.top_k_tokens is now eval.style_tokens"),
    "renamed: chunked loss": (
        ["model.loss_chunk=0"],
        "model.loss_chunk is now task.loss_chunk: write task.loss_chunk=0",
    ),
    "renamed: tf32": (["+model.tf32=true"], "model.tf32 is now trainer.tf32: write +trainer.tf32=true"),
    "KL pattern matching nothing": (["task=kl_target", "task.target.pattern=zzzzzzzzzz"], "matches no token"),
    "KL pattern not a regex": (
        ["task=kl_target", "task.target.pattern='x('"],
        "is not a valid regular expression",
    ),
    "KL alpha not above beta": (
        ["task=kl_target", "task.target.mass=null", "task.target.alpha=1.0", "task.target.beta=2.0"],
        "need alpha > beta ≥ 0",
    ),
    "KL mass above 1": (["task=kl_target", "task.target.mass=1.5"], "task.target.mass=1.5 must be"),
    "lr not finite": (["optim.lr=nan"], "optim.lr=nan is not a finite number"),
    "corpus missing offline": (
        ["data.book=99999999", "data.download=false"],
        "data.book=99999999: no local copy",
    ),
    "freeze pattern matching nothing": (
        ["freeze=upper_qkv", "freeze.trainable=[*.no_such_layer.*]"],
        "matches no parameter of this model",
    ),
    "freeze leaving nothing trainable": (["freeze.frozen=[*]"], "freeze=none leaves nothing trainable"),
    "checkpoint missing": (["ckpt_path=/no/such/last.ckpt"], "ckpt_path=/no/such/last.ckpt does not exist"),
    "checkpoint of another model": (
        ["ckpt_path={bad}/other.ckpt"],
        "holds another model shape (model.transformer.wte.weight is [10, 8] there, [50257, 64] here)",
    ),
    "resume a folder that is no run": (["resume={bad}"], "is not a run folder (no .hydra/config.yaml in it)"),
    "weights missing offline": (
        ["model=gpt2"],
        "model.name_or_path=gpt2: weights are not in the Hugging Face cache",
    ),
    "qa file missing": (
        ["experiment=instruct", "data.train_file=/no/such/pairs.jsonl"],
        "data.train_file=/no/such/pairs.jsonl does not exist",
    ),
    "qa line not json": (
        ["experiment=instruct", "data.train_file=Makefile"],
        "Makefile: line 1 is not valid JSON",
    ),
    "qa field missing": (
        ["experiment=instruct", "data=dolly_open_qa", "data.text_field=null"],
        "dolly_open_qa.jsonl line 1 has no field 'question', 'answer' (data.question_field / data.answer_field): "
        "its fields are 'text'",
    ),
    "qa every pair too long": (
        ["experiment=instruct", "data.max_length=8"],
        "every train pair is longer than data.max_length=8",
    ),
    "qa max_length over the context": (
        ["experiment=instruct", "data.max_length=2048"],
        "data.max_length=2048 is longer than the context of model.arch (256 tokens)",
    ),
    "qa hugging face dataset offline": (
        ["experiment=instruct", "data=webglm_qa"],
        "data.hf_dataset=THUDM/webglm-qa: ",
    ),
    "qa unknown length policy": (
        ["experiment=instruct", "data.length_policy=cut"],
        "data.length_policy=cut is unknown: use one of truncate, drop",
    ),
}


# From the command line, in a subprocess: the exit status and the one line on stderr, for a setting refused by the
# checks before Hydra (renamed), by the schema, by the data, by resume=, and by the model loader (its HF_HOME).
COMMAND_LINE = (
    "renamed: generation repeats",
    "renamed: tf32",
    "lr zero",
    "corpus missing offline",
    "resume a folder that is no run",
    "weights missing offline",
)


@pytest.mark.parametrize("case", COMMAND_LINE)
def test_bad_input_gives_one_clear_line(case, run_gptft, bad_files, tmp_path):
    overrides, message = CASES[case]
    overrides = [o.format(bad=bad_files) for o in overrides]
    result = run_gptft(*FAST, *overrides, f"hydra.run.dir={tmp_path / 'run'}", env={"HF_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("gptft: error: "), result.stderr[-2000:]
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()  # it stopped before any training


@pytest.mark.parametrize("case", [c for c in CASES if c not in COMMAND_LINE and not c.startswith("renamed")])
def test_bad_input_is_one_line_naming_the_setting(case, bad_files, train_here, tmp_path):
    """The same contract in this process: the ConfigError that gptft.run prints as its one line, raised before
    any training."""
    from gptft.errors import ConfigError

    overrides, message = CASES[case]
    with pytest.raises(ConfigError) as error:
        train_here(*FAST, *(o.format(bad=bad_files) for o in overrides))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_an_earlier_run_is_never_overwritten(run_gptft, tmp_path):
    run = tmp_path / "run"
    assert run_gptft(*FAST, f"hydra.run.dir={run}").returncode == 0
    before = (run / "metrics.json").read_bytes()
    result = run_gptft(*FAST, f"hydra.run.dir={run}")
    assert result.returncode != 0 and f"hydra.run.dir={run} already holds a run" in result.stderr
    assert (run / "metrics.json").read_bytes() == before
    assert json.loads(before)["status"] == "completed"
