"""gptft-evaluate SOURCE: held-out loss and perplexity on any text, exact match on question/answer data."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from gptft.cli.common import (
    add_model_options,
    load_model,
    parser,
    progress,
    resolve_source,
    run_command,
    say,
)
from gptft.errors import ConfigError

PROG = "gptft-evaluate"
EPILOG = """\
examples:
  gptft-evaluate outputs/quickstart/<time> --book 2701                  # Moby Dick
  gptft-evaluate outputs/quickstart/<time>/hf_model --text notes.txt --window 128 --stride 64
  gptft-evaluate outputs/instruct/<time> --qa gsm8k_test.jsonl --questions 50

Perplexity: windows of --window tokens start every --stride tokens and cover the whole text; each window
scores only the tokens the previous one did not, with the rest of the window as their context (the Hugging
Face "perplexity of fixed-length models" method). With a stride below the window every token but the text's
first is scored exactly once; a text shorter than one window is refused.
Exact match: greedy answers to the first --questions pairs, each question in the run's template (a model
without a run's template: the course's "QUESTION: {q} ANSWER:"); right when the last number of the answer equals
the reference's number after '####' (GSM8K: '3-5' reads 5, '1,234' 1234, '1,2,3' 3); any other reference, with
numbers or not, when the texts are equal once normalised as SQuAD does (case, punctuation, articles, spaces).
"""


def build_parser() -> argparse.ArgumentParser:
    p = parser(PROG, "Score a model: perplexity on a text, exact match on question/answer pairs.", EPILOG)
    text = p.add_argument_group("perplexity (held-out loss)")
    which = text.add_mutually_exclusive_group()
    which.add_argument(
        "--book", type=int, metavar="ID", help="a Project Gutenberg book id (829 Gulliver, 2701 Moby Dick)"
    )
    which.add_argument("--text", metavar="FILE", help="any UTF-8 text file")
    text.add_argument(
        "--window", type=int, metavar="N", help="tokens per window (default: the model's context, ≤ 1024)"
    )
    text.add_argument(
        "--stride", type=int, metavar="S", help="tokens between window starts (default: half a window)"
    )
    text.add_argument(
        "--batch-size", type=int, default=4, metavar="B", help="windows per forward pass (default 4)"
    )
    qa = p.add_argument_group("exact match (question/answer data)")
    qa.add_argument(
        "--qa",
        metavar="FILE",
        help="JSON lines, JSON or CSV pairs (found as given, in data/, or ../shared/data/*/)",
    )
    qa.add_argument("--questions", type=int, default=100, metavar="N", help="the first N pairs (default 100)")
    qa.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="per answer (default 256)")
    qa.add_argument("--question-field", help="default: the run's data.question_field, else 'question'")
    qa.add_argument("--answer-field", help="default: the run's data.answer_field, else 'answer'")
    p.add_argument("--json", metavar="FILE", help="also write the numbers (and the answers) to FILE")
    add_model_options(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_command(PROG, lambda: evaluate(args))


def evaluate(args: argparse.Namespace) -> int:
    if args.book is None and args.text is None and args.qa is None:
        raise ConfigError(
            "nothing to evaluate: give --book ID or --text FILE (perplexity), --qa FILE (exact match), or both"
        )
    for name in ("window", "stride", "batch_size", "questions", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be ≥ 1")
    source = resolve_source(args.source, args.checkpoint)
    text = read_text_arg(args) if args.book is not None or args.text is not None else None
    pairs = read_pairs(args, source) if args.qa else None

    model = load_model(source, args.device, PROG)
    results: dict[str, Any] = {"source": source.where}
    if text is not None:
        results["perplexity"] = perplexity_of(model, text, args)
        r = results["perplexity"]
        print(
            f"{r['text']}: {r['tokens']} tokens, {r['windows']} windows of {r['window']} (stride {r['stride']}), "
            f"{r['scored']} scored: loss {r['loss']:.4f}, perplexity {r['ppl']:.2f}"
        )
    if pairs is not None:
        results["exact_match"] = exact_match_of(model, source, pairs, args)
        r = results["exact_match"]
        print(
            f"{r['data']}: exact match {r['correct']}/{r['questions']} = {r['exact_match']:.3f} "
            f"(greedy, ≤ {r['max_new_tokens']} new tokens)"
        )
    if args.json:
        from gptft.utils.io import atomic_write_json

        atomic_write_json(args.json, results)
    return 0


# ---------------------------------------------------------------- perplexity


def read_text_arg(args: argparse.Namespace) -> tuple[str, str]:
    """(a name for the text, the text)."""
    from gptft.text.corpus import load_book_text, read_text

    if args.text is not None:
        path = Path(args.text)
        if not path.is_file():
            raise ConfigError(f"--text {args.text}: no such file")
        text = read_text(path, "--text")
        if not text.strip():
            raise ConfigError(f"--text {args.text} is empty: give a file with text in it")
        return args.text, text
    data_dir = os.environ.get("GPTFT_DATA_DIR", "data")
    return f"book {args.book}", load_book_text(args.book, data_dir=data_dir)


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, tokens to score) of each window: the last `tokens to score` tokens of [begin, end) are those
    the previous window did not reach."""
    spans, previous_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        spans.append((begin, end, end - previous_end))
        previous_end = end
        if end == n_tokens:
            break
    return spans


def perplexity_of(model: Any, named_text: tuple[str, str], args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from gptft.models import context_length
    from gptft.text.tokenizer import gpt2_encoding

    name, text = named_text
    context = context_length(model.config)
    window = args.window or min(context, 1024)
    if window > context:
        raise ConfigError(f"--window {window} is longer than the model's context of {context} tokens")
    stride = args.stride or max(1, window // 2)
    if stride > window:
        raise ConfigError(
            f"--stride {stride} is longer than --window {window}: some tokens would never be scored"
        )
    ids = torch.tensor(gpt2_encoding().encode_ordinary(text))
    if len(ids) < window:
        raise ConfigError(
            f"{name} is {len(ids)} tokens long, shorter than one window of {window}: lower --window or give a longer text"
        )
    spans = windows(len(ids), window, stride)
    device = next(model.parameters()).device
    nll, scored = 0.0, 0
    # Windows of equal length go through the model together (only the last may be shorter).
    groups: list[list[tuple[int, int, int]]] = []
    for span in spans:
        if (
            groups
            and len(groups[-1]) < args.batch_size
            and groups[-1][0][1] - groups[-1][0][0] == span[1] - span[0]
        ):
            groups[-1].append(span)
        else:
            groups.append([span])
    with torch.no_grad():
        # A whole book is minutes on a CPU: a progress bar on a terminal (none in logs and pipes).
        for group in progress(groups, f"{PROG}: {name}", unit="batch"):
            x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none")
            losses = losses.view(len(group), -1)
            for row, (b, e, n) in zip(losses, group, strict=True):
                scored_here = min(n, e - b - 1)  # the text's first token has no context: never scored
                nll += row[-scored_here:].double().sum().item()
                scored += scored_here
    loss = nll / scored
    return {
        "text": name, "tokens": len(ids), "window": window, "stride": stride, "windows": len(spans),
        "scored": scored, "loss": loss, "ppl": math.exp(min(loss, 700.0)),
    }  # fmt: skip


# ---------------------------------------------------------------- exact match


def read_pairs(args: argparse.Namespace, source: Any) -> list[tuple[str, str]]:
    """The first --questions pairs of --qa, read as the data modules read them."""
    from gptft.data.qa.files import Fields, extract_pairs, read_records, resolve_qa_file

    data = source.config.get("data") or {}
    fields = Fields(
        question=args.question_field or data.get("question_field") or "question",
        answer=args.answer_field or data.get("answer_field") or "answer",
        text=data.get("text_field"),
        split_marker=data.get("split_marker"),
        question_marker=data.get("question_marker"),
    )
    data_dir = os.environ.get("GPTFT_DATA_DIR", "data")
    records, _ = read_records(resolve_qa_file(args.qa, "--qa", data_dir), "--qa")
    pairs, _ = extract_pairs(records[: args.questions], fields, "stop")
    return pairs


def exact_match_of(
    model: Any, source: Any, pairs: list[tuple[str, str]], args: argparse.Namespace
) -> dict[str, Any]:
    from gptft.callbacks.exact_match import answer_questions
    from gptft.data.qa.template import Template
    from gptft.metrics.qa import exact_match

    template = source.template()
    if template is None:
        template = Template()
        say(PROG, f"{args.source} has no run template: asking in the course's ({template.question('{q}')!r})")
    answers = answer_questions(model, template, [q for q, _ in pairs], args.max_new_tokens)
    hits = [exact_match(a, r) for a, (_, r) in zip(answers, pairs, strict=True)]
    return {
        "data": args.qa,
        "questions": len(pairs),
        "correct": sum(hits),
        "exact_match": sum(hits) / len(hits),
        "max_new_tokens": args.max_new_tokens,
        "answers": [
            {"question": q, "reference": r, "answer": a, "correct": h}
            for (q, r), a, h in zip(pairs, answers, hits, strict=True)
        ],
    }


if __name__ == "__main__":
    main()
