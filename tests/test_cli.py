"""gptft-generate, gptft-chat, gptft-evaluate and gptft-export on two tiny runs trained here: a book run SIGKILLed
after its first checkpoint (no hf_model/), and a question/answer run whose model learned to end its answers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptft.cli import chat, evaluate, export, generate
from gptft.cli.stream import TextStream
from gptft.data.qa.files import resolve_qa_file
from gptft.metrics.qa import exact_match, exact_match_rate, last_number, reference_number
from gptft.text.tokenizer import EOT_ID, gpt2_encoding

from conftest import REPO

BIN = Path(sys.executable).parent  # the venv's console scripts (pip install -e .)
QA_STEPS = 30


def cli(command: str, *args: str, env: dict, stdin: str | None = None) -> subprocess.CompletedProcess:
    script = BIN / f"gptft-{command}"
    assert script.is_file(), f"{script} is missing: run `pip install -e . --no-deps`"
    return subprocess.run(
        [str(script), *args], cwd=REPO, env=env, input=stdin, capture_output=True, text=True, timeout=600
    )


def in_process(main, *argv: str) -> int:
    """A command's exit status, run in this process (what it prints is left to capsys)."""
    with pytest.raises(SystemExit) as stop:
        main(list(argv))
    return stop.value.code


@pytest.fixture(scope="module")
def killed_run(gptft_env, tmp_path_factory) -> Path:
    """A book run SIGKILLed once its first checkpoint (step 2) is on disk: no hf_model/, a last.ckpt."""
    out = tmp_path_factory.mktemp("cli") / "killed"
    overrides = [
        "debug=fast",
        "trainer.max_steps=100000",
        "callbacks.checkpoint.every_n_train_steps=2",
        "eval.repeats=0",
    ]
    with open(out.parent / "killed.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gptft.run", *overrides, f"hydra.run.dir={out}"],
            cwd=REPO, env=gptft_env, stdout=log, stderr=log,
        )  # fmt: skip
        deadline = time.monotonic() + 600
        while not (out / "checkpoints" / "last.ckpt").is_file():
            assert proc.poll() is None, (out.parent / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "hf_model").exists()
    return out


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory) -> Path:
    """Real GSM8K training questions with their final answers alone ("72"), so that a few steps of a tiny model
    learn to end an answer at end-of-text."""
    rows = resolve_qa_file("gsm8k_train.jsonl", "test").read_text().splitlines()[:400]
    path = tmp_path_factory.mktemp("qa") / "gsm8k_short.jsonl"
    with path.open("w") as f:
        for row in map(json.loads, rows):
            answer = row["answer"].split("####")[1].strip()
            f.write(json.dumps({"question": row["question"], "answer": answer}) + "\n")
    return path


@pytest.fixture(scope="module")
def qa_run(run_ok, qa_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "qa"
    run_ok(
        "experiment=instruct", "debug=fast", f"data.train_file={qa_file}", f"data.test_file={qa_file}",
        "data.max_length=128", "data.batch_size=8", "optim.lr=3e-3", f"trainer.max_steps={QA_STEPS}", "trainer.precision=32-true", "eval.repeats=0",
        "callbacks.exact_match.questions=4", "callbacks.exact_match.max_new_tokens=16", f"hydra.run.dir={out}",
        timeout=900,
    )  # fmt: skip
    return out


def one_error_line(stderr: str, prog: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), stderr
    return lines[0]


# ---------------------------------------------------------------- the scorer


def test_exact_match_on_real_gsm8k_references():
    rows = [json.loads(line) for line in resolve_qa_file("gsm8k_test.jsonl", "test").read_text().splitlines()]
    # "... She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18"
    ducks = rows[0]["answer"]
    assert reference_number(ducks) == 18
    assert exact_match("She sells 9 eggs at $2, so she makes $18 a day.", ducks)
    assert exact_match("18.00", ducks) and exact_match("The answer is 18", ducks)
    assert not exact_match("18 eggs minus 9 leaves 9", ducks)  # the last number counts
    assert not exact_match("", ducks) and not exact_match("eighteen", ducks)
    # The worked solutions themselves: the text before '####' mostly ends on the answer, never on another mark.
    solutions = [(r["answer"].split("####")[0], r["answer"]) for r in rows[:200]]
    assert 0.9 < exact_match_rate(*zip(*solutions, strict=True)) < 1
    big = next(r["answer"] for r in rows if reference_number(r["answer"]) >= 1000)
    value = int(reference_number(big))
    assert exact_match(f"It costs ${value:,} in all.", big)  # thousands separators
    assert last_number("from -3 to 1,250.5 units") == reference_number("#### 1250.5")
    # References without a number (open questions) compare as normalised text.
    assert exact_match("The Eiffel Tower!", "eiffel tower") and not exact_match("Big Ben", "eiffel tower")


# ---------------------------------------------------------------- generate


def test_generate_same_seed_same_text(killed_run, gptft_env):
    exported = (killed_run / "hf_model").exists()  # once test_export has run
    both = cli("generate", str(killed_run), "The king", "--seed", "3", "--num-samples", "2",
               "--max-new-tokens", "12", env=gptft_env)  # fmt: skip
    assert both.returncode == 0, both.stderr[-2000:]
    # Until test_export writes hf_model/, the killed run's last checkpoint stands in, and the command says so.
    assert exported or "has no hf_model/" in both.stderr and "last.ckpt (step 2)" in both.stderr
    samples = both.stdout.split("=== 'The king' (seed ")[1:]
    assert [s[:2] for s in samples] == ["3)", "4)"]
    texts = [s.split(")\n", 1)[1].strip("\n") for s in samples]
    assert all(t.startswith("The king") and len(t) > len("The king") for t in texts) and texts[0] != texts[1]
    again = cli(
        "generate", str(killed_run), "The king", "--seed", "4", "--max-new-tokens", "12", env=gptft_env
    )
    assert again.returncode == 0 and again.stdout == texts[1] + "\n"  # another process, the same text


def test_stream_shows_the_final_text_as_it_comes(qa_run):
    """On a terminal tokens are written as they come; what is written is the answer, never an end marker."""
    from transformers import AutoModelForCausalLM

    from gptft.callbacks.exact_match import visible_text
    from gptft.models import sample_tokens

    class Screen:
        def __init__(self):
            self.pieces: list[str] = []

        def write(self, text):
            self.pieces.append(text)

        def flush(self):
            pass

    model = AutoModelForCausalLM.from_pretrained(qa_run / "hf_model")
    enc = gpt2_encoding()
    screen = Screen()
    stream = TextStream(screen)
    ids = torch.tensor([enc.encode_ordinary("The king said")])
    new = sample_tokens(model, ids, max_new_tokens=20, seed=5, ban_eot=True, streamer=stream)[0].tolist()
    assert len(screen.pieces) > 1 and "".join(screen.pieces) == visible_text(new, [])

    # Token by token: text that may start the marker waits; the marker and what follows never show.
    screen, marked = Screen(), enc.encode_ordinary(" 42 apples.\nQUESTION: And pears?") + [EOT_ID]
    stream = TextStream(screen, ["QUESTION:"])
    stream.put(torch.tensor([[1, 2]]))  # the prompt, as generate() hands it over first
    for token in marked:
        stream.put(torch.tensor([token]))
        assert not any("Q" in p for p in screen.pieces)
    stream.end()
    assert "".join(screen.pieces) == " 42 apples.\n"


# ---------------------------------------------------------------- chat


def test_chat_answers_piped_questions_in_the_run_template(qa_run, gptft_env):
    from transformers import AutoModelForCausalLM

    questions = [json.loads(line)["question"] for line in resolve_qa_file("gsm8k_test.jsonl", "t").open()][:2]
    result = cli("chat", str(qa_run), "--greedy", "--show-context", "--max-new-tokens", "24",
                 env=gptft_env, stdin="\n".join(questions) + "\n")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    answers = result.stdout.splitlines()
    assert len(answers) == 2

    # The same conversation, built here from the run's saved template and answered by transformers itself.
    prompt = yaml.safe_load((qa_run / ".hydra" / "config.yaml").read_text())["data"]["prompt"]
    model = AutoModelForCausalLM.from_pretrained(qa_run / "hf_model").eval()
    enc, context, expected, raw = gpt2_encoding(), [], [], []
    for question in questions:
        context += enc.encode_ordinary(prompt["question_prefix"] + question + prompt["question_suffix"])
        out = model.generate(
            torch.tensor([context]),
            do_sample=False,
            max_new_tokens=24,
            eos_token_id=EOT_ID,
            pad_token_id=EOT_ID,
        )[0, len(context) :].tolist()
        assert EOT_ID in out  # the model ends its answer before the token limit
        answer = enc.decode(out[: out.index(EOT_ID)])
        assert "QUESTION:" not in answer
        expected.append(answer.lstrip())
        raw.append(answer)
        context += enc.encode_ordinary(answer) + [EOT_ID]  # the turn kept as a training row
    assert answers == expected
    # Shown on stderr: each question in the template, the second after the first turn and its end-of-text.
    q1, q2 = (f"QUESTION: {q} ANSWER:" for q in questions)
    assert f"context:\n{q1}\n" in result.stderr
    assert f"context:\n{q1}{raw[0]}<|endoftext|>{q2}\n" in result.stderr


# ---------------------------------------------------------------- evaluate


def test_evaluate_perplexity_equals_transformers_and_exact_match_equals_the_run(
    qa_run, qa_file, gptft_env, tmp_path, book_text
):
    from transformers import AutoModelForCausalLM

    text_file = tmp_path / "gulliver.txt"
    text_file.write_text(book_text[20000:23000])  # ≈ 700 tokens of Gulliver the run never saw in this form
    report = tmp_path / "eval.json"
    result = cli("evaluate", str(qa_run / "hf_model"), "--text", str(text_file), "--window", "128", "--stride", "48",
                 "--qa", str(qa_file), "--questions", "4", "--max-new-tokens", "16", "--json", str(report),
                 env=gptft_env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads(report.read_text())
    ppl = numbers["perplexity"]
    assert f"perplexity {ppl['ppl']:.2f}" in result.stdout

    # The Hugging Face recipe, with transformers' own loss: each window scores the tokens the previous did not.
    model = AutoModelForCausalLM.from_pretrained(qa_run / "hf_model").eval()
    ids = torch.tensor([gpt2_encoding().encode_ordinary(text_file.read_text())])
    nll, count, previous_end, n_windows = 0.0, 0, 0, 0
    for begin in range(0, ids.size(1), 48):
        end = min(begin + 128, ids.size(1))
        x = ids[:, begin:end]
        labels = x.clone()
        labels[:, : -(end - previous_end)] = -100
        with torch.no_grad():
            loss = model(x, labels=labels).loss
        n = (labels[:, 1:] != -100).sum().item()
        nll, count, previous_end, n_windows = nll + loss.item() * n, count + n, end, n_windows + 1
        if end == ids.size(1):
            break
    assert (
        ppl["tokens"] == ids.size(1)
        and ppl["scored"] == count == ids.size(1) - 1
        and ppl["windows"] == n_windows
    )
    assert ppl["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert ppl["ppl"] == pytest.approx(torch.exp(torch.tensor(nll / count)).item(), rel=1e-4)

    # The same four held-out questions the run's exact-match probe answered after training, with the same answers.
    after = [
        json.loads(line) for line in (qa_run / "samples" / "exact_match_after.jsonl").read_text().splitlines()
    ]
    qa = numbers["exact_match"]
    assert [a["question"] for a in qa["answers"]] == [a["question"] for a in after]
    assert [a["answer"] for a in qa["answers"]] == [a["answer"] for a in after]
    assert qa["questions"] == 4 and f"exact match {qa['correct']}/4" in result.stdout


def test_instruction_run_reports_exact_match_before_and_after(qa_run):
    metrics = json.loads((qa_run / "metrics.json").read_text())
    before, after = metrics["before"]["exact_match"], metrics["after"]["exact_match"]
    assert 0 <= before <= 1 and 0 <= after <= 1
    for when in ("before", "after"):
        rows = [
            json.loads(x) for x in (qa_run / "samples" / f"exact_match_{when}.jsonl").read_text().splitlines()
        ]
        assert len(rows) == 4 and metrics[when]["exact_match"] == sum(r["correct"] for r in rows) / 4
    acc = EventAccumulator(str(qa_run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    points = {e.step: e.value for e in acc.Scalars("probe/exact_match")}
    assert points == pytest.approx({0: before, QA_STEPS - 1: after})


# ---------------------------------------------------------------- export


def test_export_a_killed_run_loads_with_transformers(killed_run, gptft_env, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    result = cli("export", str(killed_run), env=gptft_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "last.ckpt (step 2)" in result.stderr
    exported = AutoModelForCausalLM.from_pretrained(killed_run / "hf_model").eval()
    tokenizer = AutoTokenizer.from_pretrained(killed_run / "hf_model")
    assert tokenizer("The king")["input_ids"] == gpt2_encoding().encode_ordinary("The king")

    # The checkpoint's own weights in a model built here from the run's architecture.
    arch = yaml.safe_load((killed_run / ".hydra" / "config.yaml").read_text())["model"]["arch"]
    saved = torch.load(killed_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    reference = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in arch.items() if k != "model_type"})).eval()
    reference.load_state_dict({k.removeprefix("model."): v for k, v in saved["state_dict"].items()})
    ids = torch.tensor([gpt2_encoding().encode_ordinary("The emperor of Lilliput said to me")])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)

    # A second export would replace it: refused, with the two ways out.
    capsys.readouterr()  # (transformers' loading bars above)
    assert in_process(export.main, str(killed_run)) == 2
    line = one_error_line(capsys.readouterr().err, "gptft-export")
    assert "hf_model exists" in line and "--out" in line and "--force" in line


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_a_nonzero_exit(killed_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_checkpoint = tmp_path / "no_ckpt"
    (no_checkpoint / ".hydra").mkdir(parents=True)
    (no_checkpoint / ".hydra" / "config.yaml").write_text((killed_run / ".hydra" / "config.yaml").read_text())
    short = tmp_path / "short.txt"
    short.write_text("It was a dark and stormy night.")
    cases = [
        (generate.main, [str(empty), "The king"], "is neither a run folder"),
        (generate.main, [str(tmp_path / "nowhere" / "run"), "The king"], "no such folder"),
        (generate.main, [str(no_checkpoint), "The king"], "no checkpoints/last.ckpt"),
        (export.main, [str(no_checkpoint)], "no checkpoints/last.ckpt"),
        (chat.main, [str(killed_run)], "use gptft-generate"),
        (generate.main, [str(killed_run), " "], "empty prompt"),
        (
            evaluate.main,
            [str(killed_run), "--checkpoint", "last", "--text", str(short), "--window", "64"],
            "shorter than one window",
        ),
        (evaluate.main, [str(killed_run)], "nothing to evaluate"),
        (
            generate.main,
            [str(killed_run), "The king", "--checkpoint", "last", "--max-new-tokens", "300"],
            "exceeds the model's context",
        ),
    ]
    for main, argv, words in cases:
        assert in_process(main, *argv) == 2, argv
        line = one_error_line(capsys.readouterr().err, main.__module__.replace("gptft.cli.", "gptft-"))
        assert words in line, line
