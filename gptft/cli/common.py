"""What the four commands share: reading SOURCE (a run folder, an hf_model/ folder or a hub id), rebuilding a
model from a run's checkpoint, the sampling options, the token streamer and the one-line errors."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from gptft.errors import ConfigError

if TYPE_CHECKING:  # the commands import torch and transformers only once they run
    from transformers import PreTrainedModel

    from gptft.data.qa.template import Template

T = TypeVar("T")
SOURCE_HELP = (
    "a run folder (outputs/<experiment>/<time>: its hf_model/, else its checkpoints/last.ckpt), an hf_model/ "
    "folder, or a Hugging Face model id in the local cache (e.g. gpt2)"
)


# ---------------------------------------------------------------- where the model comes from


@dataclass
class Source:
    """What SOURCE names: the run it belongs to (if any) and where the weights are read from."""

    given: str
    run: Path | None = None
    model_dir: Path | None = None  # a save_pretrained folder
    checkpoint: Path | None = None  # a Lightning checkpoint of `run`
    hub_id: str | None = None
    stand_in: bool = False  # a run without hf_model/ (killed, diverged): its last checkpoint stands in
    config: dict[str, Any] = field(default_factory=dict)  # the run's .hydra/config.yaml (unresolved)

    @property
    def where(self) -> str:
        return str(self.checkpoint or self.model_dir or self.hub_id)

    def template(self) -> Template | None:
        """The run's question/answer template (data.prompt), or None for book runs and bare models."""
        prompt = (self.config.get("data") or {}).get("prompt")
        if not isinstance(prompt, dict) or "question_prefix" not in prompt:
            return None
        from gptft.data.qa.template import Template

        return Template(**{k: str(v) for k, v in prompt.items()})


def is_run(folder: Path) -> bool:
    return (folder / ".hydra" / "config.yaml").is_file()


def run_config(run: Path) -> dict[str, Any]:
    """The settings the run was started with. Not resolved: its ${hydra:...} values need Hydra's runtime, and
    what the commands read (the model, the template) is written out plainly."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml"), resolve=False)


def checkpoint_file(run: Path, name: str | None) -> Path:
    """`--checkpoint`: a file path, or a name in <run>/checkpoints/ (.ckpt optional); default last.ckpt."""
    if name is None:
        path = run / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise ConfigError(
                f"{run} has no hf_model/ and no checkpoints/last.ckpt: it stopped before its first checkpoint, "
                "so there are no weights to load (start it again, with callbacks.checkpoint.every_n_train_steps=N)"
            )
        return path
    candidates = [Path(name), run / "checkpoints" / name, run / "checkpoints" / f"{name}.ckpt"]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        have = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) or ["none"]
        raise ConfigError(f"--checkpoint {name}: no such checkpoint of {run} (it has: {', '.join(have)})")
    return found


def resolve_source(given: str, checkpoint: str | None = None, prefer_checkpoint: bool = False) -> Source:
    """Which weights SOURCE names, checked before torch loads (a bad folder fails in a second).

    A run gives its hf_model/ unless a checkpoint is asked for (`checkpoint`, `prefer_checkpoint`) or the run
    has none (killed, diverged): then checkpoints/last.ckpt. An hf_model/ inside a run brings the run's
    settings (its template) along.
    """
    path = Path(given).expanduser()
    if path.is_dir():
        if is_run(path):
            source = Source(given, run=path, config=run_config(path))
            model_dir = path / "hf_model"
            exported = (model_dir / "config.json").is_file()
            if checkpoint or prefer_checkpoint or not exported:
                source.checkpoint = checkpoint_file(path, checkpoint)
                source.stand_in = not (checkpoint or prefer_checkpoint)
            else:
                source.model_dir = model_dir
            return source
        if (path / "config.json").is_file():
            if checkpoint:
                raise ConfigError(f"--checkpoint needs a run folder; {given} is a model folder")
            run = path.parent if is_run(path.parent) else None
            return Source(given, run=run, model_dir=path, config=run_config(run) if run else {})
        raise ConfigError(
            f"{given} is neither a run folder (no .hydra/config.yaml) nor a model folder (no config.json): give "
            "outputs/<experiment>/<time>, its hf_model/, or a Hugging Face model id"
        )
    if path.exists():
        raise ConfigError(
            f"{given} is a file: give a run folder, an hf_model/ folder or a Hugging Face model id"
        )
    if path.is_absolute() or given.startswith((".", "~")) or given.count("/") > 1 or not given.strip():
        raise ConfigError(
            f"{given}: no such folder: give a run folder (outputs/<experiment>/<time>) or its hf_model/"
        )
    if checkpoint:
        raise ConfigError(f"--checkpoint needs a run folder; {given} is a model id")
    return Source(given, hub_id=given)


def load_model(source: Source, device: str = "auto", prog: str = "gptft") -> PreTrainedModel:
    """The model SOURCE names, in eval mode on `device` (auto: CUDA when there is one)."""
    import torch
    from transformers.utils import logging as hf_logging

    from gptft.models import build_model

    hf_logging.disable_progress_bar()  # "Loading weights" bars: the commands print only their own text
    if source.checkpoint is not None:
        model, step = model_from_checkpoint(source.run, source.checkpoint, source.config)
        if source.stand_in:
            say(
                prog,
                f"{source.run} has no hf_model/ (still running, or it did not end normally): using {source.checkpoint} (step {step})",
            )
    else:
        model = build_model(name_or_path=str(source.model_dir or source.hub_id))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()


def model_from_checkpoint(run: Path, checkpoint: Path, config: dict[str, Any]) -> tuple[PreTrainedModel, int]:
    """(the Hugging Face model holding a run's checkpoint weights, the checkpoint's step).

    The architecture comes from the run's own hf_model/config.json when there is one, else from the run's
    model settings (model.arch, or the config of model.name_or_path: a pretrained base needs its config in the
    Hugging Face cache). A LoRA run (freeze=lora) is wrapped the same way, loaded, and merged.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from gptft.models import model_config

    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        state, step = saved["state_dict"], saved.get("global_step")
    except Exception as e:  # a truncated or foreign file: one line, not a pickle traceback
        raise ConfigError(
            f"{checkpoint} is not a Lightning checkpoint ({type(e).__name__}): give a run's .ckpt file"
        ) from None
    state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model_cfg = config.get("model") or {}
    if (run / "hf_model" / "config.json").is_file():
        arch = AutoConfig.from_pretrained(run / "hf_model")
    else:
        arch = model_config(model_cfg.get("name_or_path"), model_cfg.get("arch"))
    model = AutoModelForCausalLM.from_config(
        arch, attn_implementation=model_cfg.get("attn_implementation", "sdpa")
    )
    model = model.to(torch.float32)
    freeze = config.get("freeze") or {}
    lora = freeze.get("rank") is not None
    if lora:
        from gptft.tasks.lora import apply_lora

        model, _ = apply_lora(model, **freeze)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        odd = (missing or unexpected)[0]
        raise ConfigError(
            f"{checkpoint} does not fit the model of {run}/.hydra/config.yaml ({odd} is only "
            f"{'in the model' if missing else 'in the checkpoint'}, {len(missing) + len(unexpected) - 1} more): "
            "was the run's config changed after it started?"
        )
    if lora:
        model = model.merge_and_unload()
    return model, step


# ---------------------------------------------------------------- options every command shares


class _Parser(argparse.ArgumentParser):
    """Options anywhere: `gptft-generate RUN --seed 3 "The king"` as well as after the prompts (plain parse_args
    ends a positional with nargs="*" at the first option, and calls the words after it unrecognized)."""

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 (argparse's own signature)
        return self.parse_intermixed_args(args, namespace)


def parser(
    prog: str, description: str, epilog: str = "", source: tuple[str, str] = ("SOURCE", SOURCE_HELP)
) -> argparse.ArgumentParser:
    """A command's parser; its first argument is SOURCE (`source`: another name and help for it)."""
    p = _Parser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar=source[0], help=source[1])
    return p


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        metavar="CKPT",
        help="read a run's checkpoint instead of its hf_model/: a file, or a name in <run>/checkpoints/ (last)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, cuda:1, ...")


def add_sampling_options(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The probes' sampling recipe as defaults: top-k 50, temperature 1."""
    g = p.add_argument_group("sampling (defaults: the probes' top-k 50, temperature 1)")
    g.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, metavar="N", help=f"default {max_new_tokens}"
    )
    g.add_argument(
        "--top-k", type=int, default=50, metavar="K", help="sample among the K likeliest tokens (0: all)"
    )
    g.add_argument(
        "--top-p",
        type=float,
        default=None,
        metavar="P",
        help="nucleus sampling: the likeliest tokens holding mass P",
    )
    g.add_argument("--temperature", type=float, default=1.0, metavar="T")
    g.add_argument(
        "--greedy", action="store_true", help="always the likeliest token (ignores top-k, top-p, temperature)"
    )
    g.add_argument("--seed", type=int, default=0, help="the same seed gives the same text (default 0)")


def check_sampling(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be ≥ 1")
    if args.top_k < 0:
        raise ConfigError(f"--top-k {args.top_k} must be ≥ 0 (0: no top-k cut)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p} must be in (0, 1]")
    if not args.temperature > 0:
        raise ConfigError(
            f"--temperature {args.temperature} must be > 0 (use --greedy for the likeliest token)"
        )


def sampling_kwargs(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """sample_tokens' keyword arguments from the options."""
    return dict(
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        greedy=args.greedy,
        seed=seed,
    )


def check_fits(n_prompt: int, max_new_tokens: int, context: int, what: str = "the prompt") -> None:
    if n_prompt + max_new_tokens > context:
        raise ConfigError(
            f"{what} ({n_prompt} tokens) plus --max-new-tokens {max_new_tokens} exceeds the model's context of "
            f"{context} tokens: shorten it or lower --max-new-tokens"
        )


# ---------------------------------------------------------------- streaming


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------- running a command


def quiet_libraries() -> None:
    """The commands print text, not library chatter: transformers' and Lightning's logs only at errors."""
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "lightning", "lightning.pytorch", "gptft"):
        logging.getLogger(name).setLevel(logging.ERROR)


def progress(items: Sequence[T], desc: str, unit: str = "it") -> Iterator[T]:
    """`items` with a tqdm progress bar on stderr when it is a terminal (TQDM_DISABLE=1 turns it off)."""
    from tqdm.auto import tqdm

    disable = not is_terminal(sys.stderr) or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    yield from tqdm(items, desc=desc, unit=unit, file=sys.stderr, disable=disable, leave=False)


def say(prog: str, message: str) -> None:
    """A note on stderr (stdout carries only the text a command produces)."""
    print(f"{prog}: {message}", file=sys.stderr, flush=True)


def run_command(prog: str, body: Callable[[], int | None]) -> None:
    """Run `body`; a ConfigError is one line on stderr and exit status 2, Ctrl-C exit status 130."""
    quiet_libraries()
    try:
        code = body()
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `gptft-generate ... | head`
        sys.stderr.close()
        sys.exit(0)
    sys.exit(code or 0)
