"""Instruction tuning: the loss mask, the length policy, the length statistics, the data sources, gradient
checkpointing, and 10-step runs through Hydra on the real GSM8K and Dolly copies."""

import csv
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptft.data import InstructPairs
from gptft.data.instruct import PairBatches
from gptft.data.qa.lengths import length_stats
from gptft.data.qa.rows import encode_pairs, pad_batch
from gptft.data.qa.template import Template
from gptft.errors import ConfigError
from gptft.report import write_report
from gptft.report.lengths import write_lengths_figure
from gptft.text import EOT_ID, gpt2_encoding

COURSE = Template()  # "QUESTION: {q} ANSWER: {a}."
PAIR = ("Why is the sky blue?", "Rayleigh scattering")
SHORT = ("Is it?", "Yes")


def test_rows_tokenise_as_the_whole_text_would():
    """Question and answer parts are tokenised apart, yet the row is the tokens of the whole string."""
    enc = gpt2_encoding()
    row = encode_pairs([PAIR], COURSE, 256).rows[0]
    text = "QUESTION: Why is the sky blue? ANSWER: Rayleigh scattering."
    assert row.ids.tolist() == enc.encode_ordinary(text) + [EOT_ID]
    assert row.n_prompt == len(enc.encode_ordinary("QUESTION: Why is the sky blue? ANSWER:"))


def test_only_the_answer_period_and_end_of_text_carry_labels():
    enc = gpt2_encoding()
    rows = encode_pairs([PAIR, SHORT], COURSE, 256).rows
    x, y = pad_batch(rows, mask_prompt=True)
    n_prompt, n = rows[0].n_prompt, len(rows[0].ids)
    assert x.shape == y.shape == (2, n - 1)  # padded to the longest row, not to max_length
    assert x[0].tolist() == rows[0].ids[:-1].tolist()
    labelled = (y[0] != -100).nonzero().flatten().tolist()
    assert labelled == list(range(n_prompt - 1, n - 1))  # contiguous: from the first answer token to the end
    assert enc.decode(y[0, labelled].tolist()) == " Rayleigh scattering.<|endoftext|>"
    # the short row: its answer labelled, its padding x = end-of-text and y = -100
    m = len(rows[1].ids) - 1
    assert enc.decode(y[1][y[1] != -100].tolist()) == " Yes.<|endoftext|>"
    assert (x[1, m:] == EOT_ID).all() and (y[1, m:] == -100).all()


def test_unmasked_rows_count_the_question_but_never_the_padding():
    rows = encode_pairs([PAIR, SHORT], COURSE, 256).rows
    x, y = pad_batch(rows, mask_prompt=False)
    assert y[0].tolist() == rows[0].ids[1:].tolist()  # every next token, the question's included
    m = len(rows[1].ids) - 1
    assert y[1, :m].tolist() == rows[1].ids[1:].tolist() and (y[1, m:] == -100).all()


def test_alpaca_template_masks_its_instruction():
    alpaca = Template(
        question_prefix="### Instruction:\n",
        question_suffix="\n\n### Response:",
        answer_prefix="\n",
        answer_suffix="",
    )
    row = encode_pairs([PAIR], alpaca, 256).rows[0]
    _, y = pad_batch([row])
    assert gpt2_encoding().decode(y[0][y[0] != -100].tolist()) == "\nRayleigh scattering<|endoftext|>"


def test_truncation_keeps_the_question_and_counts_what_it_cut():
    long_pair = ("What is the answer?", " ".join(["word"] * 50))
    n_question = len(encode_pairs([long_pair], COURSE, 256).rows[0].ids) - 50 - 2  # minus answer, '.', EOT
    limit = n_question + 5
    cut = encode_pairs([long_pair, SHORT], COURSE, limit)
    assert (cut.truncated, cut.dropped) == (1, 0)
    row = cut.rows[0]
    assert len(row.ids) == limit and row.n_prompt == n_question  # the whole question, 5 answer tokens
    assert row.ids[-1] != EOT_ID  # a cut answer does not teach the model to stop there
    dropped = encode_pairs([long_pair, SHORT], COURSE, limit, policy="drop")
    assert (dropped.truncated, dropped.dropped, len(dropped.rows)) == (0, 1, 1)


def test_a_question_longer_than_the_limit_is_dropped_under_both_policies():
    long_question = (" ".join(["why"] * 40) + "?", "Because.")
    for policy in ("truncate", "drop"):
        out = encode_pairs([long_question, SHORT], COURSE, 20, policy)
        assert (out.dropped, out.question_too_long, len(out.rows)) == (1, 1, 1)


def _write_pairs(folder, name, pairs):
    """The same pairs as a .jsonl, .json or .csv file."""
    path = folder / name
    records = [{"question": q, "answer": a} for q, a in pairs]
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif name.endswith(".json"):
        path.write_text(json.dumps(records))
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, ["question", "answer"])
            writer.writeheader()
            writer.writerows(records)
    return path


# "cat cat cat" is 3 tokens (cat, ␣cat, ␣cat): questions of 1, 2, 3, 4, 10 tokens, answers of 5 each
HAND_MADE = [(" ".join(["cat"] * k), " ".join(["dog"] * 5)) for k in (1, 2, 3, 4, 10)]


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv"])
def test_length_statistics_of_a_hand_made_file(suffix, tmp_path):
    train = _write_pairs(tmp_path, f"train.{suffix}", HAND_MADE)
    test = _write_pairs(tmp_path, f"test.{suffix}", [SHORT])
    dm = InstructPairs(
        train_file=str(train), test_file=str(test), max_length=15, out_dir=str(tmp_path / "run")
    )
    dm.setup()
    s = dm.metrics()["lengths"]
    assert s["question"] == {"count": 5, "mean": 4.0, "median": 3.0, "p90": 7.6, "p99": 9.76, "max": 10}
    assert s["answer"] == {"count": 5, "mean": 5.0, "median": 5.0, "p90": 5.0, "p99": 5.0, "max": 5}
    # rows: "QUESTION:" (3) + q + " ANSWER:" (4) + 5 + "." + EOT = q + 14 tokens; ≤ 15 fits q = 1 only,
    # q = 2..4 lose answer tokens, q = 10 leaves no room for an answer at all (its question part is 17)
    assert s["truncated"] == {"train": 3, "test": 0} and s["dropped"] == {"train": 1, "test": 0}
    assert s["question_too_long"]["train"] == 1 and s["pairs"] == {"train": 4, "test": 1, "val": 1}
    written = json.loads((tmp_path / "run" / "lengths.json").read_text())
    assert written.pop("tokens") == {"question": [1, 2, 3, 4, 10], "answer": [5] * 5} and written == s
    # The report, not the data module, draws the histogram from what the data wrote.
    assert write_lengths_figure(tmp_path / "run").read_bytes()[:4] == b"\x89PNG"


def test_length_stats_of_nothing_and_of_one():
    assert length_stats([]) == {"count": 0}
    assert length_stats([7]) == {"count": 1, "mean": 7.0, "median": 7.0, "p90": 7.0, "p99": 7.0, "max": 7}


def test_gsm8k_copy_holds_out_its_test_file():
    dm = InstructPairs(train_file="gsm8k_train.jsonl", test_file="gsm8k_test.jsonl", val_pairs=16)
    dm.setup()
    s = dm.lengths
    assert s["question"]["count"] == 7473 and s["pairs"]["test"] + s["dropped"]["test"] == 1319
    assert s["pairs"]["val"] == 16 and len(dm.val_dataloader().dataset) == 16
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == y.shape and x.size(1) <= 255 and (y == -100).any() and (y != -100).any()
    assert dm.train_token_ids().numel() == sum(len(r.ids) for r in dm.train_rows)


def test_dolly_copy_splits_at_the_marker_and_holds_out_a_fraction():
    dm = InstructPairs(
        train_file="dolly_open_qa.jsonl",
        text_field="text",
        split_marker="### Assistant:",
        question_marker="### Human:",
        test_fraction=0.1,
    )
    dm.setup()
    s = dm.lengths
    assert s["pairs"]["train"] + s["dropped"]["train"] + s["pairs"]["test"] + s["dropped"]["test"] == 3742
    assert abs(s["pairs"]["test"] + s["dropped"]["test"] - 374) <= 1
    text = gpt2_encoding().decode(dm.train_rows[0].ids.tolist())
    assert text.startswith("QUESTION: ") and " ANSWER: " in text and "###" not in text


def test_training_batches_are_a_function_of_seed_and_step():
    rows = encode_pairs([(f"Question {i}?", f"Answer {i}") for i in range(10)], COURSE, 64).rows
    a, b = PairBatches(rows, 4, seed=1), PairBatches(rows, 4, seed=1)
    assert all(torch.equal(a.batch(k)[0], b.batch(k)[0]) for k in (7, 0, 3))  # any order, same batches
    assert not torch.equal(a.batch(0)[0], PairBatches(rows, 4, seed=2).batch(0)[0])
    first_epoch = [i for k in range(5) for i in a.indices(k)][:10]
    assert sorted(first_epoch) == list(range(10))  # every pair once per epoch


def test_bad_json_line_names_the_file_and_line_or_is_skipped(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps({"question": "Q?", "answer": "A"})
    path.write_text(f"{good}\n{good}\n{{not json\n{good}\n")
    with pytest.raises(ConfigError, match=r"pairs.jsonl: line 3 is not valid JSON .*data.on_bad_line=skip"):
        InstructPairs(train_file=str(path), test_file=str(path)).setup()
    dm = InstructPairs(train_file=str(path), test_file=str(path), on_bad_line="skip")
    dm.setup()
    assert dm.lengths["pairs"]["train"] == 3 and dm.lengths["skipped_records"] == 2  # one per file read


def test_missing_fields_are_named_with_the_fields_there_are(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Q?", "response": "A"}) + "\n")
    with pytest.raises(
        ConfigError, match=r"line 1 has no field 'question', 'answer' .*fields are 'prompt', 'response'"
    ):
        InstructPairs(train_file=str(path), test_fraction=0.5).setup()
    dm = InstructPairs(
        train_file=str(path), test_file=str(path), question_field="prompt", answer_field="response"
    )
    dm.setup()
    assert dm.lengths["pairs"]["train"] == 1


def test_every_pair_dropped_is_an_error():
    with pytest.raises(ConfigError, match=r"every train pair is longer than data.max_length=8"):
        InstructPairs(train_file="gsm8k_train.jsonl", test_file="gsm8k_test.jsonl", max_length=8).setup()


def test_a_hugging_face_dataset_offline_names_the_offline_copies(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no `datasets` here; where it is installed, no hub either
    with pytest.raises(
        ConfigError, match=r"data.hf_dataset=THUDM/webglm-qa: .*use data=gsm8k or data=dolly_open_qa"
    ):
        InstructPairs(hf_dataset="THUDM/webglm-qa").setup()


def test_gradient_checkpointing_recomputes_blocks_and_keeps_the_gradients():
    """Same weights, same batch, chunked loss (model.base_model): equal gradients; a block's layers run
    twice (forward, then recomputed in backward)."""
    from gptft.models import build_model
    from gptft.tasks import CausalLM

    arch = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64}
    arch |= {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    rows = encode_pairs([PAIR, SHORT], COURSE, 64).rows
    batch = pad_batch(rows)
    grads, calls = {}, {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(arch=arch, gradient_checkpointing=checkpointing)
        on = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        assert on is checkpointing
        task = CausalLM(model, optim={"lr": 1e-3, "weight_decay": 0.0}, schedule={}, loss_chunk=8)
        calls[checkpointing] = 0
        mlp = model.transformer.h[0].mlp  # inside the checkpointed block (hooks do not fire on recompute)

        def counted(*args, key=checkpointing, forward=mlp.forward, **kwargs):
            calls[key] += 1
            return forward(*args, **kwargs)

        mlp.forward = counted
        loss, _ = task.compute_loss(batch)
        loss.backward()
        grads[checkpointing] = model.transformer.h[0].attn.c_attn.weight.grad.clone()
    assert calls == {False: 1, True: 2}
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- end to end through Hydra

RUN = (
    "experiment=instruct",
    "model=tiny",
    "trainer=smoke",
    "trainer.max_steps=10",
    "trainer.val_check_interval=5",
    "data.max_length=128",
    "data.batch_size=4",
    "data.val_pairs=8",
    "optim.lr=1e-3",
    "eval.max_new_tokens=20",
    "eval.repeats=1",
    "callbacks.exact_match.questions=2",
    "callbacks.exact_match.max_new_tokens=8",
)


@pytest.mark.parametrize(
    ("data", "pairs"), [("gsm8k", 7473), ("dolly_open_qa", 3742)], ids=["gsm8k", "dolly_open_qa"]
)
def test_ten_step_instruct_run(data, pairs, run_ok, tmp_path):
    out = tmp_path / data
    run_ok(*RUN, f"data={data}", f"hydra.run.dir={out}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 10
    s = metrics["lengths"]
    assert s["max_length"] == 128 and s["mask_prompt"] is True and s["source"].startswith(data.split("_")[0])
    held_out = s["pairs"]["test"] + s["dropped"]["test"]
    assert s["pairs"]["train"] + s["dropped"]["train"] + (0 if data == "gsm8k" else held_out) == pairs
    assert s["question"]["count"] == s["answer"]["count"] == s["pairs"]["train"] + s["dropped"]["train"]
    for what in ("question", "answer"):
        m = s[what]
        assert 1 <= m["median"] <= m["p90"] <= m["p99"] <= m["max"] and m["mean"] > 1
    assert s["row"]["max"] <= 128 and s["truncated"]["train"] > 0
    assert metrics["after"]["val_loss"] < metrics["before"]["val_loss"] - 0.1
    written = json.loads((out / "lengths.json").read_text())
    assert (out / "lengths.png").is_file() and {k: v for k, v in written.items() if k != "tokens"} == s
    after = (out / "samples" / "after.txt").read_text()
    assert 'QUESTION: Where does the word "butterfly" come from? ANSWER:' in after
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/loss")][:3] == [0, 4, 9]  # before, every 5 steps
    report = write_report(out)
    q = s["question"]
    assert "## Lengths" in report and f"| {data} | questions | {q['count']} | {q['mean']:.4g} |" in report
