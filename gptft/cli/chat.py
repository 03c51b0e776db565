"""gptft-chat SOURCE: talk to an instruction-tuned run in its own prompt template."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from gptft.cli.common import (
    add_model_options,
    add_sampling_options,
    check_sampling,
    is_terminal,
    load_model,
    parser,
    resolve_source,
    run_command,
    sampling_kwargs,
    say,
)
from gptft.errors import ConfigError

PROG = "gptft-chat"
EPILOG = """\
examples:
  gptft-chat outputs/instruct/<time>
  printf 'What is 2 + 3?\\nAnd 4 + 4?\\n' | gptft-chat outputs/instruct/<time> --greedy

Each question is wrapped in the run's own template (its .hydra/config.yaml, data.prompt: e.g. "QUESTION: {q}
ANSWER:"); the answer ends at end-of-text or where the model starts the next question (e.g. "QUESTION:").
Earlier turns stay in the model's context, each as a training row (question part, answer part, end-of-text);
when they no longer fit beside the new question and --max-new-tokens, the oldest are dropped, and a note on
standard error says so. Turn k (from 0) samples with seed --seed + k. Standard input that is not a terminal is
read one question per line; on a terminal, an empty line or Ctrl-D ends the chat.
"""


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        PROG, "Chat with an instruction-tuned run, in the prompt template it was trained with.", EPILOG
    )
    p.add_argument(
        "--show-context",
        action="store_true",
        help="print what the model is given at each turn on standard error",
    )
    add_sampling_options(p, max_new_tokens=128)
    add_model_options(p)
    return p


def questions(prompt: str = "> ") -> Iterator[str]:
    """Questions from a terminal (until an empty line or end of input) or one per line from a pipe."""
    if not is_terminal(sys.stdin):
        for line in sys.stdin:
            if line.strip():
                yield line.strip()
        return
    while True:
        try:
            line = input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return
        if not line.strip():
            return
        yield line.strip()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_command(PROG, lambda: chat(args))


def chat(args: argparse.Namespace) -> int:
    check_sampling(args)
    source = resolve_source(args.source, args.checkpoint)
    template = source.template()
    if template is None:
        what = "a run without question/answer data" if source.run else "a model without a run's settings"
        raise ConfigError(
            f"{args.source} is {what}, so it has no prompt template to chat in: use gptft-generate "
            f'{args.source} "your text" to continue text'
        )

    import torch

    from gptft.callbacks.exact_match import end_markers, visible_text
    from gptft.cli.stream import TextStream
    from gptft.models import context_length, sample_tokens
    from gptft.text.tokenizer import EOT_ID, gpt2_encoding

    model = load_model(source, args.device, PROG)
    enc, context, markers = gpt2_encoding(), context_length(model.config), end_markers(template)
    live = is_terminal(sys.stdout)
    history: list[list[int]] = []  # earlier turns, each a whole training row
    for turn, question in enumerate(questions()):
        asked = enc.encode_ordinary(template.question(question))
        room = context - args.max_new_tokens - len(asked)
        if room < 0:
            say(PROG, f"question {turn + 1} skipped: {len(asked)} tokens plus --max-new-tokens "
                      f"{args.max_new_tokens} exceed the model's context of {context}")  # fmt: skip
            continue
        dropped = 0
        while history and sum(map(len, history)) > room:
            history.pop(0)
            dropped += 1
        if dropped:
            say(
                PROG,
                f"dropped the {dropped} oldest turn(s) to fit the {context}-token context ({len(history)} kept)",
            )
        ids = [i for row in history for i in row] + asked
        if args.show_context:
            say(PROG, f"context:\n{enc.decode(ids)}")
        stream = TextStream(sys.stdout, markers, lstrip=True) if live else None
        new = sample_tokens(
            model,
            torch.tensor([ids]),
            **sampling_kwargs(args, args.seed + turn),
            ban_eot=False,
            stop_strings=markers,
            streamer=stream,
        )[0].tolist()
        answer = visible_text(new, markers)
        if stream is None:
            sys.stdout.write(answer.lstrip())
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append(
            asked + enc.encode_ordinary(answer) + [EOT_ID]
        )  # as the training rows: answer, end-of-text
    return 0


if __name__ == "__main__":
    main()
