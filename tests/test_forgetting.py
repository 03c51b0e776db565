"""The forgetting probe: reference loss, perplexity and KL(base ‖ tuned) before/after a run, checked against an
independent computation on the same windows; its defaults and its one-line errors; the report's section."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptft.callbacks import ReferenceProbe
from gptft.errors import ConfigError

KL_TOKENS = 100  # windows of 64 tokens: the KL covers window 0 and the first 36 positions of window 1


@pytest.fixture(scope="module")
def run(run_ok, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("forget") / "run"
    run_ok(
        "debug=fast",
        f"model.name_or_path={tiny_model_dir}",
        "trainer.precision=32-true",
        "optim.lr=1e-2",
        "eval.repeats=0",
        f"callbacks.reference.kl_tokens={KL_TOKENS}",
        f"hydra.run.dir={out}",
        timeout=600,
    )
    return out


def test_probe_matches_an_independent_computation(run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from gptft.text import load_book_text
    from gptft.text.tokenizer import gpt2_encoding

    record = json.loads((run / "metrics.json").read_text())
    info = record["reference"]
    assert info["texts"] == ["pg2701"]  # the default when training on Gulliver's Travels: Moby Dick
    assert info["windows"] == 8 and info["seq_len"] == 64 and info["kl_positions"] == KL_TOKENS
    ids = torch.tensor(gpt2_encoding().encode_ordinary(load_book_text(2701)))
    windows = torch.stack([ids[s : s + 65] for s in info["starts"]])
    x, y = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(x).logits.double()
        tuned = AutoModelForCausalLM.from_pretrained(run / "hf_model").eval()(x).logits.double()
    for when, logits in (("before", base), ("after", tuned)):
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
        assert record[when]["ref_loss"] == pytest.approx(loss, rel=1e-5)
        assert record[when]["ref_ppl"] == pytest.approx(math.exp(loss), rel=1e-4)
    # KL(base ‖ tuned) = Σ_v p_base (log p_base − log p_tuned), averaged over the first KL_TOKENS positions.
    log_p = base.log_softmax(-1).flatten(0, 1)[:KL_TOKENS]
    log_q = tuned.log_softmax(-1).flatten(0, 1)[:KL_TOKENS]
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    assert kl > 1e-4 and record["after"]["ref_kl"] == pytest.approx(kl, rel=1e-4)
    assert "ref_kl" not in record["before"]
    assert record["after"]["ref_loss"] != record["before"]["ref_loss"]


def test_curves_and_report(run):
    from gptft.report import write_report

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"ref/loss", "ref/ppl", "ref/kl"} <= set(tags)
    assert [e.step for e in acc.Scalars("ref/loss")] == [0, 9]  # before (at 0) and after the 10th step
    text = write_report(run)
    assert "## Learning versus forgetting" in text and "forgetting: reference loss rise" in text
    assert (run / "report" / "learn_forget.png").stat().st_size > 10_000


def test_default_reference_is_another_book(data_dir):
    from gptft.text import load_book_text

    gulliver, moby_dick = load_book_text(829), load_book_text(2701)
    assert ReferenceProbe(data_dir=data_dir).resolve(gulliver) == ["pg2701"]
    assert ReferenceProbe(data_dir=data_dir).resolve(moby_dick) == ["pg829"]
    assert ReferenceProbe(data_dir=data_dir).resolve(None) == ["pg2701"]  # question/answer data: a book
    assert ReferenceProbe(text=[829, 2701], data_dir=data_dir).resolve(None) == ["pg829", "pg2701"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": 829}, "eval.reference=829 is the training text itself"),
        ({"text": [2701, 829]}, "eval.reference=829 is the training text itself"),
        ({"text": "/no/such/book.txt"}, "eval.reference=/no/such/book.txt does not exist"),
        ({"text": 99999999, "download": False}, "eval.reference=99999999: no local copy of book"),
    ],
    ids=["training-text", "in-a-list", "missing-file", "missing-book-offline"],
)
def test_bad_reference_is_refused(kwargs, message, data_dir):
    from gptft.text import load_book_text

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as error:
        ReferenceProbe(data_dir=data_dir, **kwargs).resolve(train_text=load_book_text(829))
    assert "\n" not in str(error.value)


def test_the_run_stops_with_one_line_before_the_model_loads(run_gptft, tmp_path):
    result = run_gptft(
        "debug=fast", "eval.reference=829", f"hydra.run.dir={tmp_path / 'run'}", timeout=600
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("gptft: error: eval.reference=829 is the training text itself")
    assert "parameters per block" not in result.stderr + result.stdout  # refused before the model was built
