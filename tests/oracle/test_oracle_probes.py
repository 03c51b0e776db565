"""Oracle for the free-generation probes and exact match.

Every number is computed again from what a run saved (samples/free_generation_<when>.json, metrics.json, run.log,
the team's data files, with plain Python and the `tokenizers` library (tests/oracle/independent.py): nothing of
gptft's own computation is imported. The measures' definitions are README's: the style ratio's set is the book's
100 most frequent ids (ties to the lower id), the copy rate indexes the training split (data.split=tail: the first
1 − data.test_fraction of the book's tokens), distinct-n counts n-grams within each generated row, the KL study's
target set is every id whose decoded string contains "x"; mean and sample standard deviation over the repeats
(none for one repeat). Exact match: GSM8K's number after "####" against the answer's last number (read by
lm-evaluation-harness's flexible-extract regex), any other reference as SQuAD-normalised text.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from independent import DATA, VOCAB, book_ids, decode, flexible_extract

BOOK = DATA / "gulliver" / "pg829.txt"
GSM8K_TEST = DATA / "qa" / "gsm8k_test.jsonl"
DOLLY = DATA / "qa" / "dolly_open_qa.jsonl"

# Tiny and fp32; generation (most of a run's time here) only what the measures need: no prompt samples, 16 new
# tokens per row; no forgetting probe (not measured here).
FAST = (
    "debug=fast",
    "trainer.precision=32-true",
    "trainer.max_steps=4",
    "eval.prompts=[]",
    "eval.max_new_tokens=16",
    "~callbacks.reference",
)
RUNS = {
    # A high lr collapses the tiny model onto the book's frequent ids within 4 steps: a style ratio far from 0,
    # and 2-grams it copies (8-grams a 4-step model never copies; the index is the same for any n).
    "book": (*FAST, "optim.lr=3e-2", "eval.repeats=2", "eval.copy_ngram=2"),
    # The KL study at tiny scale, with one repeat: no spread to report; the default 8-gram copy rate.
    "kl": (*FAST, "task=kl_target", "optim.lr=3e-2", "eval.repeats=1"),
}


@pytest.fixture(scope="module", params=list(RUNS))
def run(request, run_ok, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("oracle") / request.param
    run_ok(*RUNS[request.param], f"hydra.run.dir={out}")
    return out


def ngrams(rows: list[list[int]], n: int) -> list[tuple[int, ...]]:
    return [tuple(row[i : i + n]) for row in rows for i in range(len(row) - n + 1)]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_every_probe_recomputed_from_the_saved_generated_ids(run):
    metrics = json.loads((run / "metrics.json").read_text())
    cfg = metrics["config"]
    ids = book_ids(BOOK).tolist()
    logged = re.search(r"(\d+) tokens: train (\d+), test (\d+)", (run / "run.log").read_text())
    assert logged and int(logged[1]) == len(ids)  # the same text, tokenized alike
    counts = Counter(ids)
    style = sorted(counts, key=lambda i: (-counts[i], i))[: cfg["eval"]["style_tokens"]]
    style_set = set(style)
    n_train = len(ids) - round(len(ids) * cfg["data"]["test_fraction"])
    assert cfg["data"]["split"] == "tail" and int(logged[2]) == n_train
    n_copy = cfg["eval"]["copy_ngram"]
    train_grams = set(ngrams([ids[:n_train]], n_copy))

    x_ids = {i for i in range(VOCAB) if "x" in decode([i])}
    kl = cfg["task"]["_target_"].endswith("KLTarget")
    assert len(x_ids) == 897 or not kl

    for when in ("before", "after"):
        saved = json.loads((run / "samples" / f"free_generation_{when}.json").read_text())
        assert saved["style_ids"] == style
        assert saved["token_sets"] == ({"target_ratio": sorted(x_ids)} if kl else {})
        repeats = saved["repeats"]
        assert len(repeats) == cfg["eval"]["repeats"]
        per_repeat: dict[str, list[float]] = {}
        for r in repeats:
            prompts, rows = r["prompt_ids"], r["generated_ids"]
            assert [len(p) for p in prompts] == [1] * cfg["eval"]["free_prompts"]
            assert [len(row) for row in rows] == [cfg["eval"]["max_new_tokens"]] * len(prompts)
            tokens = [t for row in rows for t in row]
            found = {
                "style_ratio": 100 * sum(t in style_set for t in tokens) / len(tokens),
                "copy_rate": sum(g in train_grams for g in ngrams(rows, n_copy)) / len(ngrams(rows, n_copy)),
                "distinct_1": len(set(ngrams(rows, 1))) / len(ngrams(rows, 1)),
                "distinct_2": len(set(ngrams(rows, 2))) / len(ngrams(rows, 2)),
            }
            if kl:
                found["target_ratio"] = sum(t in x_ids for t in tokens) / len(tokens)
            for name, value in found.items():
                per_repeat.setdefault(name, []).append(value)
        reported = metrics[when]
        assert {k for k in reported if isinstance(reported[k], dict)} == set(per_repeat)
        for name, values in per_repeat.items():
            mean, std = mean_std(values)
            assert reported[name]["values"] == pytest.approx(values, rel=1e-12, abs=1e-15), (when, name)
            assert reported[name]["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-15), (when, name)
            if std is None:
                assert reported[name]["std"] is None
            else:
                assert reported[name]["std"] == pytest.approx(std, rel=1e-9, abs=1e-15), (when, name)
        # The text sample of the first repeat is these ids, decoded.
        text = (run / "samples" / f"{when}.txt").read_text()
        for p, row in zip(repeats[0]["prompt_ids"], repeats[0]["generated_ids"], strict=True):
            assert decode(p) + decode(row) in text

    before = metrics["before"]["style_ratio"]["mean"]
    after = metrics["after"]["style_ratio"]["mean"]
    if not kl:  # the numbers checked are not all zeros: the model learned the book's frequent ids, and copies
        assert before < 5 < after and metrics["after"]["copy_rate"]["mean"] > 0.05


# ---------------------------------------------------------------- exact match


PUNCTUATION = set(string.punctuation)


def squad_normalise(text: str) -> str:
    """SQuAD v1.1's normalize_answer: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def oracle_match(prediction: str, reference: str) -> bool:
    if "####" in reference:
        return flexible_extract(prediction) == Decimal(reference.split("####")[-1].strip().replace(",", ""))
    return squad_normalise(prediction) == squad_normalise(reference)


def gsm8k_predictions(answer: str) -> list[str]:
    """Answers a model might write for one GSM8K reference: its reasoning with the final number stated in
    several ways, and wrong by one."""
    reasoning, final = answer.split("####")
    value = Decimal(final.strip().replace(",", ""))
    whole = value == value.to_integral()
    return [
        reasoning,  # the reasoning alone: its last number is usually, not always, the answer
        f"{reasoning} The answer is {value}.",
        f"{reasoning} So she pays ${value:,}{'.00' if whole else ''} in total.",
        f"The answer is {value + 1}",
        "I cannot tell.",
    ]


def test_exact_match_agrees_with_the_oracle_on_every_gsm8k_test_answer():
    from gptft.metrics.qa import exact_match

    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()]
    assert len(rows) == 1319
    cases = [(p, row["answer"]) for row in rows for p in gsm8k_predictions(row["answer"])]
    verdicts = [oracle_match(p, r) for p, r in cases]
    assert 0.3 < sum(verdicts) / len(verdicts) < 0.8  # both outcomes, many times
    wrong = [(p[-80:], r[-20:]) for (p, r), v in zip(cases, verdicts, strict=True) if exact_match(p, r) != v]
    assert not wrong, wrong[:5]


def dolly_pairs() -> list[tuple[str, str]]:
    pairs = []
    for line in DOLLY.read_text().splitlines():
        question, answer = json.loads(line)["text"].split("### Assistant:", 1)
        pairs.append((question.removeprefix("### Human:").strip(), answer.strip()))
    return pairs


def test_exact_match_agrees_with_the_oracle_on_every_dolly_answer():
    from gptft.metrics.qa import exact_match

    pairs = dolly_pairs()
    with_number = [a for _, a in pairs if re.search(r"\d", a)]
    assert len(pairs) == 3742 and len(with_number) == 1196
    cases = []
    for _, answer in pairs:
        cases += [(answer, answer), (f"The {answer.upper()}!!", answer), (f"{answer} Or not.", answer)]
        number = re.search(r"\d+", answer)
        if number:  # a number of the answer alone is no answer (unless the answer is that number)
            cases.append((number[0], answer))
    verdicts = [oracle_match(p, r) for p, r in cases]
    assert sum(verdicts) >= 2 * len(pairs) and not all(verdicts)
    wrong = [(p[:60], r[:60]) for (p, r), v in zip(cases, verdicts, strict=True) if exact_match(p, r) != v]
    assert not wrong, wrong[:5]


@pytest.mark.parametrize(
    ("prediction", "reference", "right"),
    [
        ("I don't know, maybe 1865", "Lincoln was shot on April 14, 1865, at Ford's Theatre.", False),
        ("16", "The 16th president of the United States was Abraham Lincoln.", False),
        ("the Abraham Lincoln.", "Abraham Lincoln", True),
        # where lm-evaluation-harness's regex misreads, the rules README states hold:
        ("3-5 apples", "so 5 apples\n#### 5", True),  # a range, not minus five
        ("3-5 apples", "#### -5", False),
        ("1,2,3", "#### 3", True),  # commas group thousands in threes only
        ("1,2,3", "#### 123", False),
        ("it drops to \u221212 degrees", "#### -12", True),  # U+2212, the minus sign
        ("12,345,678 grains", "#### 12345678", True),
    ],
)
def test_exact_match_edge_cases(prediction, reference, right):
    from gptft.metrics.qa import exact_match

    assert exact_match(prediction, reference) is right
