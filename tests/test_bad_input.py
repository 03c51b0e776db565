"""Bad input from the command line: one line that names the setting and the fix, exit status ≠ 0,
no traceback, and nothing of an earlier run touched."""

import json

import pytest

FAST = ("debug=fast",)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    return d


CASES = {
    "unknown experiment": (["experiment=nope"], "Could not find 'experiment/nope'"),
    "unknown group option": (["model=gpt5"], "Could not find 'model/gpt5'"),
    "lr zero": (["optim.lr=0"], "optim.lr=0 must be > 0"),
    "lr not a number": (["optim.lr=fast"], "optim.lr='fast' is not a number"),
    "batch size zero": (["data.batch_size=0"], "data.batch_size=0 must be a whole number ≥ 1"),
    "window longer than context": (["data.seq_len=512"], "data.seq_len=512 is longer than the context"),
    "unknown split": (
        ["data.split=middle"],
        "data.split=middle is unknown: use one of tail, head, interleaved",
    ),
    "window longer than the test split": (["data.test_fraction=0.0001"], "does not fit in the test split"),
    "corpus path missing": (["data.path=/no/such/book.txt"], "data.path=/no/such/book.txt does not exist"),
    "empty corpus": (["data.path={bad}/empty.txt"], "is empty"),
    "binary corpus": (["data.path={bad}/image.png"], "is a binary file"),
    "top-k tokens zero": (["eval.top_k_tokens=0"], "eval.top_k_tokens=0 must be a whole number ≥ 1"),
    "top-k tokens past the vocabulary": (
        ["eval.top_k_tokens=60000"],
        "eval.top_k_tokens=60000 exceeds the vocabulary",
    ),
    "KL pattern matching nothing": (["task=kl_target", "task.target.pattern=zzzzzzzzzz"], "matches no token"),
    "KL pattern not a regex": (
        ["task=kl_target", "task.target.pattern='x('"],
        "is not a valid regular expression",
    ),
    "KL alpha not above beta": (["task=kl_target", "task.target.beta=2.0"], "need alpha > beta ≥ 0"),
    "weights missing offline": (
        ["model=gpt2"],
        "model.name_or_path=gpt2: weights are not in the Hugging Face cache",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_line(case, run_gptft, bad_files, tmp_path):
    overrides, message = CASES[case]
    overrides = [o.format(bad=bad_files) for o in overrides]
    result = run_gptft(*FAST, *overrides, f"hydra.run.dir={tmp_path / 'run'}", env={"HF_HOME": str(tmp_path)})
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()  # it stopped before any training


def test_an_earlier_run_is_never_overwritten(run_gptft, tmp_path):
    run = tmp_path / "run"
    assert run_gptft(*FAST, f"hydra.run.dir={run}").returncode == 0
    before = (run / "metrics.json").read_bytes()
    result = run_gptft(*FAST, f"hydra.run.dir={run}")
    assert result.returncode != 0 and f"hydra.run.dir={run} already holds a run" in result.stderr
    assert (run / "metrics.json").read_bytes() == before
    assert json.loads(before)["status"] == "completed"
