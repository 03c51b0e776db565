"""gptft-generate SOURCE [PROMPT ...]: continue prompts with a run's model, reproducibly."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptft.cli.common import (
    add_model_options,
    add_sampling_options,
    check_fits,
    check_sampling,
    is_terminal,
    load_model,
    parser,
    resolve_source,
    run_command,
    sampling_kwargs,
)
from gptft.errors import ConfigError

PROG = "gptft-generate"
EPILOG = """\
examples:
  gptft-generate outputs/quickstart/<time> "The king" --seed 3 --max-new-tokens 40
  gptft-generate outputs/quickstart/<time> "The king" "My master" --num-samples 3 --top-p 0.9
  gptft-generate outputs/quickstart/<time>/hf_model --file prompts.txt --greedy
  echo "The king" | gptft-generate outputs/quickstart/<time>

Sample k (from 0) of every prompt uses seed --seed + k, so the same seed gives the same text, whatever the
other prompts. With one prompt and one sample only the text is printed; otherwise each is headed
"=== 'PROMPT' (seed S)". On a terminal the tokens appear as they are generated.
"""


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        PROG, "Continue prompts with a model: a run's, an hf_model/ folder's or a cached hub model's.", EPILOG
    )
    p.add_argument(
        "prompts", nargs="*", metavar="PROMPT", help="text to continue (none: --file, else standard input)"
    )
    p.add_argument(
        "--file", metavar="FILE", help="one prompt per line (blank lines skipped; - for standard input)"
    )
    p.add_argument("--num-samples", type=int, default=1, metavar="N", help="samples per prompt (default 1)")
    p.add_argument(
        "--ban-eot",
        action="store_true",
        help="never end at end-of-text: always --max-new-tokens tokens (the probes)",
    )
    add_sampling_options(p, max_new_tokens=100)
    add_model_options(p)
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts from the arguments, the file, or standard input when it is not a terminal."""
    if args.prompts:
        prompts = list(args.prompts)
        where = "a PROMPT argument"
    elif args.file:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            from gptft.text.corpus import read_text

            if not Path(args.file).is_file():
                raise ConfigError(f"--file {args.file}: no such file")
            text = read_text(Path(args.file), "--file")
        prompts = [line for line in text.splitlines() if line.strip()]
        where = f"--file {args.file}"
    elif not is_terminal(sys.stdin):
        prompts = [line for line in sys.stdin.read().splitlines() if line.strip()]
        where = "standard input"
    else:
        raise ConfigError(f'give a prompt: {PROG} SOURCE "The king" (or --file FILE, or pipe prompts in)')
    if not prompts or any(not p.strip() for p in prompts):
        raise ConfigError(f'empty prompt in {where}: give text to continue, e.g. {PROG} SOURCE "The king"')
    return prompts


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_command(PROG, lambda: generate(args))


def generate(args: argparse.Namespace) -> int:
    check_sampling(args)
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples {args.num_samples} must be ≥ 1")
    source = resolve_source(args.source, args.checkpoint)
    prompts = read_prompts(args)

    import torch

    from gptft.cli.stream import TextStream
    from gptft.models import context_length, sample_tokens
    from gptft.text.tokenizer import gpt2_encoding

    model = load_model(source, args.device, PROG)
    enc, context = gpt2_encoding(), context_length(model.config)
    encoded = [enc.encode_ordinary(p) for p in prompts]
    for prompt, ids in zip(prompts, encoded, strict=True):
        check_fits(len(ids), args.max_new_tokens, context, f"the prompt {prompt[:40]!r}")
    out, live = sys.stdout, is_terminal(sys.stdout)
    headed = len(prompts) * args.num_samples > 1
    for prompt, ids in zip(prompts, encoded, strict=True):
        for k in range(args.num_samples):
            seed = args.seed + k
            if headed:
                out.write(f"=== {prompt!r} (seed {seed})\n")
            out.write(prompt)
            out.flush()
            stream = TextStream(out) if live else None
            new = sample_tokens(
                model,
                torch.tensor([ids]),
                **sampling_kwargs(args, seed),
                ban_eot=args.ban_eot,
                streamer=stream,
            )[0].tolist()
            if stream is None:
                from gptft.callbacks.exact_match import visible_text

                out.write(visible_text(new, []))
            out.write("\n\n" if headed else "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    main()
