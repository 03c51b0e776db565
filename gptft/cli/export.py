"""gptft-export RUN: write hf_model/ from any checkpoint of a run (a killed, interrupted or diverged one too)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gptft.cli.common import is_run, model_from_checkpoint, parser, resolve_source, run_command, say
from gptft.errors import ConfigError

PROG = "gptft-export"
EPILOG = """\
examples:
  gptft-export outputs/quickstart/<time>                          # a killed run: writes its hf_model/
  gptft-export outputs/quickstart/<time> --checkpoint step2.ckpt --out /tmp/step2_model
  gptft-export outputs/quickstart/<time> --force                  # replace hf_model/ with last.ckpt's weights

The model is rebuilt from the run's own settings (.hydra/config.yaml: model.arch, or model.name_or_path's
config; a LoRA run's adapters are merged), the checkpoint's weights are loaded into it, and the folder is
written like a run's own hf_model/ (save_pretrained plus the GPT-2 tokenizer files), through a temporary
folder and a rename. An existing folder is never replaced silently: without --out the target is the run's
hf_model/, which must not exist yet unless --force is given; --out DIR must not exist unless --force.
"""


def build_parser() -> argparse.ArgumentParser:
    p = parser(
        PROG, "Write a run's checkpoint as a Hugging Face model folder (hf_model/).", EPILOG,
        source=("RUN", "a run folder (outputs/<experiment>/<time>)"),
    )  # fmt: skip
    p.add_argument(
        "--checkpoint",
        metavar="CKPT",
        help="which checkpoint: a file, or a name in RUN/checkpoints/ (default last.ckpt)",
    )
    p.add_argument("--out", metavar="DIR", help="where to write (default RUN/hf_model)")
    p.add_argument("--force", action="store_true", help="replace the target folder if it exists")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_command(PROG, lambda: export(args))


def export(args: argparse.Namespace) -> int:
    run = Path(args.source).expanduser()
    if not (run.is_dir() and is_run(run)):
        resolve_source(args.source)  # a missing folder or one that is neither kind: its own message
        raise ConfigError(
            f"{args.source} is a model, not a run: {PROG} writes a run's checkpoint as hf_model/; give the run "
            "folder (outputs/<experiment>/<time>)"
        )
    source = resolve_source(args.source, args.checkpoint, prefer_checkpoint=True)
    out = Path(args.out) if args.out else run / "hf_model"
    if out.exists() and not args.force:
        hint = (
            "give --out DIR for another folder, or --force to replace it"
            if not args.out
            else "give --force to replace it"
        )
        raise ConfigError(f"{out} exists: {hint}")

    from transformers.utils import logging as hf_logging

    from gptft.models import export_hf_model

    hf_logging.disable_progress_bar()
    model, step = model_from_checkpoint(run, source.checkpoint, source.config)
    export_hf_model(model, out)
    say(PROG, f"wrote {out} from {source.checkpoint} (step {step})")
    return 0


if __name__ == "__main__":
    main()
