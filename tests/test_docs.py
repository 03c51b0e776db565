"""Every command the README and docs/ show is one gptft accepts, and every relative link leads somewhere.

Nothing runs: `python -m gptft.run ...` lines are composed with Hydra's compose API (a sweep takes its first
value; `resume=` goes through gptft's own resume check on a stand-in run folder) and checked by gptft's
`validate`; `gptft-generate/chat/evaluate/export ...` lines are parsed by their own argparse parsers;
`python -m gptft.search ...` lines by the search's parser and its own definition check. A renamed setting or
option then cannot leave a stale page behind.
"""

from __future__ import annotations

import copy
import re
import shlex
from functools import cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
CLI = {
    "gptft-generate": "generate",
    "gptft-chat": "chat",
    "gptft-evaluate": "evaluate",
    "gptft-export": "export",
}
FENCE = re.compile(r"^```(\w*).*?^```", re.S | re.M)
# Fences whose lines are commands (in `text` ones, only the lines after a `$ ` prompt).
SHELL = {"bash", "sh", "shell", "console", "text"}
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PLACEHOLDER = re.compile(r"<[^<>\n]+>")  # <run>, <quickstart run>/hf_model, <time>


def _line_no(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _text(path: Path) -> str:
    """The page with blockquote markers dropped (a boxed recipe's code is code too); lines keep their numbers."""
    return re.sub(r"^> ?", "", path.read_text(), flags=re.M)


def _commands(path: Path) -> list[tuple[str, str]]:
    """(where, command) for every gptft command line of a page: in fenced blocks (continuation lines joined,
    a `$ ` prompt dropped) and in inline code spans outside them."""
    text = _text(path)
    found: list[tuple[int, str]] = []
    for block in FENCE.finditer(text):
        if block.group(1) not in SHELL:
            continue
        lines = block.group(0).splitlines()[1:-1]
        start = _line_no(text, block.start()) + 1
        joined, first = "", None
        for i, line in enumerate(lines):
            first = start + i if first is None else first
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            if block.group(1) != "text" or line.startswith("$ "):
                found.append((first, joined + line))
            joined, first = "", None
    outside = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    found += [(_line_no(outside, m.start()), m.group(1)) for m in INLINE.finditer(outside)]
    rel = path.relative_to(ROOT)
    return [(f"{rel}:{n}", line.strip().removeprefix("$ ")) for n, line in found if _kind(line)]


# A command line: optional `$ ` prompt and VAR=value assignments, then the command (srun/torchrun may launch it).
START = r"^\s*(\$ )?(\w+=\S*\s+)*"


def _kind(line: str) -> str | None:
    if re.match(START + r"((srun\s+)?python3?|torchrun\s.*?) -m gptft\.run(\s|$)", line):
        return "run"
    if re.match(START + r"python3? -m gptft\.search(\s|$)", line):
        return "search"
    if re.match(START + r"gptft-(generate|chat|evaluate|export)\s+\S", line):  # a bare name is a mention
        return "cli"
    return None


def _argv(line: str, after: str) -> list[str]:
    """The arguments after `after` (a module or a command), placeholders made concrete, the shell's own
    syntax (comments, `&`, `...` for "more of the same") dropped."""
    words = shlex.split(PLACEHOLDER.sub("PLACEHOLDER", line), comments=True)
    words = words[words.index(after) + 1 :]
    for stop in ("&", "&&", ";", "|"):
        if stop in words:
            words = words[: words.index(stop)]
    return [re.sub(r"\$\{?\w+\}?", "x", w) for w in words if w not in ("...", "-m", "--multirun")]


@cache
def _stand_in_run(tmp: Path) -> Path:
    """A run folder as resume= reads it: the quickstart's saved config and a (never loaded) last.ckpt."""
    run = tmp / "run"
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    saved = _compose(["experiment=quickstart"])
    with open_dict(saved):
        del saved["hydra"]  # as Hydra saves a job's config
    OmegaConf.save(saved, run / ".hydra" / "config.yaml")
    return run


TOP_LEVEL = {"seed", "resume", "ckpt_path", "experiment_name"}  # conf/config.yaml's own plain keys


@cache
def _compose_groups(groups: tuple[str, ...]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(groups), return_hydra_config=True)


def _compose(overrides: list[str]):
    """Hydra's composition of the overrides, in two steps as Hydra itself takes them: the config-group choices
    (experiment=, model=, hydra/launcher=, ~logger, ...) build the defaults tree, composed once per distinct set
    (the slow part), then Hydra's own code applies the key=value overrides to a copy of it."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    parsed = OverridesParser.create().parse_overrides(overrides)
    is_group = [o.key_or_group not in TOP_LEVEL and "." not in o.key_or_group for o in parsed]
    cfg = copy.deepcopy(
        _compose_groups(tuple(o.input_line for o, g in zip(parsed, is_group, strict=True) if g))
    )
    ConfigLoaderImpl._apply_overrides_to_config(
        [o for o, g in zip(parsed, is_group, strict=True) if not g], cfg
    )
    return cfg


def _one_job(overrides: list[str]) -> list[str]:
    """A multirun's overrides as its first job gets them (`optim.lr=1e-3,1e-4` → `optim.lr=1e-3`)."""
    job = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            job.append(f"{override.get_key_element()}={first}")
        else:
            job.append(override.input_line)
    return job


def check_run(argv: list[str], tmp: Path) -> None:
    """What `python -m gptft.run ARGV` does before it loads anything: the renamed-setting check, Hydra's
    composition, the resume check and gptft's validation. Raises on a command gptft would refuse."""
    import gptft.run  # noqa: F401  (registers gptft's resolvers)
    from gptft.config import check_renamed, resumed_config, validate

    run = str(_stand_in_run(tmp))  # <run> of resume=<run>, ckpt_path=<run>/checkpoints/last.ckpt
    argv = [a.replace("PLACEHOLDER", run) if a.startswith(("resume=", "ckpt_path=")) else a for a in argv]
    check_renamed(argv)
    overrides = _one_job(argv)
    cfg = _compose(overrides)  # hydra.* and hydra/launcher=... overrides are checked here too
    with open_dict(cfg):
        del cfg["hydra"]  # its interpolations need a running Hydra; the job's own config does not
    if cfg.resume:
        cfg = resumed_config(cfg, [o for o in overrides if not o.startswith("hydra")])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "job")  # what Hydra's runtime would give
    OmegaConf.resolve(cfg)  # every interpolation of the job's config
    validate(cfg)


def check_search(argv: list[str]) -> None:
    from gptft.search import check_definition, parse_args, parse_space

    args = parse_args(argv)
    check_definition(args.overrides, [parse_space(s) for s in args.space])


def check_cli(command: str, argv: list[str]) -> None:
    import importlib

    importlib.import_module(f"gptft.cli.{CLI[command]}").build_parser().parse_args(argv)


def check(line: str, tmp: Path) -> None:
    kind = _kind(line)
    if kind == "run":
        check_run(_argv(line, "gptft.run"), tmp)
    elif kind == "search":
        check_search(_argv(line, "gptft.search"))
    else:
        command = next(w for w in shlex.split(line, comments=True) if w in CLI)
        check_cli(command, _argv(line, command))


COMMANDS = [c for page in PAGES for c in _commands(page)]


@pytest.mark.parametrize(("where", "line"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_is_accepted(where, line, tmp_path_factory):
    try:
        check(line, tmp_path_factory.getbasetemp())
    except SystemExit as e:  # argparse's refusal
        pytest.fail(f"{where}: argparse refused `{line}` (exit {e.code})")


def test_the_pages_show_every_kind_of_command():
    kinds = {_kind(line) for _, line in COMMANDS}
    assert kinds == {"run", "search", "cli"}, kinds
    assert len(COMMANDS) > 30  # the README and docs/ are full of them: an extractor that finds none is broken


@pytest.mark.parametrize(
    "line",
    [
        "python -m gptft.run experiment=quickstart optim.lrr=1e-3",  # no such setting
        "python -m gptft.run experiment=nope",  # no such experiment
        "python -m gptft.run -m experiment=quickstart optim.lr=1e-3,-1",  # the first job is fine: not this check's
        "python -m gptft.run experiment=quickstart eval.seeds=2",  # renamed setting
        "python -m gptft.run resume=<run> optim.lr=1e-4",  # a resume may not change the optimizer
        "python -m gptft.search experiment=quickstart --space 'optim.lr=log(0,1)'",
        "gptft-generate RUN --no-such-option",
        "gptft-evaluate",  # no source
    ],
)
def test_a_stale_command_fails_the_check(line, tmp_path_factory):
    if "1e-3,-1" in line:  # a sweep is checked at its first value only: documented, so keep it true
        check(line, tmp_path_factory.getbasetemp())
        return
    with pytest.raises((Exception, SystemExit)):
        check(line, tmp_path_factory.getbasetemp())


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", _text(page)), re.M):
        text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(page: Path) -> list[tuple[str, str]]:
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), _text(page))
    rel = page.relative_to(ROOT)
    return [
        (f"{rel}:{_line_no(text, m.start())}", m.group(1))
        for m in LINK.finditer(text)
        if not re.match(r"[a-z]+:", m.group(1))  # http:, https:, mailto:
    ]


def broken(page: Path, target: str) -> str | None:
    """Why a relative link of `page` leads nowhere, or None."""
    file, _, anchor = target.partition("#")
    dest = (page.parent / file).resolve() if file else page
    if not dest.exists():
        return f"{file} does not exist"
    if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
        return f"{dest.relative_to(ROOT)} has no heading #{anchor}"
    return None


LINKS = [(page, where, target) for page in PAGES for where, target in _links(page)]


@pytest.mark.parametrize(("page", "where", "target"), LINKS, ids=[f"{w}:{t}" for _, w, t in LINKS])
def test_relative_link_resolves(page, where, target):
    assert broken(page, target) is None, f"{where}: ({target}) {broken(page, target)}"


def test_a_broken_link_is_found(tmp_path):
    page = ROOT / "README.md"
    assert broken(page, "docs/no_such_page.md")
    assert broken(page, "#no-such-heading")
    assert broken(page, "docs/design.md") is None
