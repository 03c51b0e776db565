"""The composed config, checked in one place before any data, weights or model: a schema of every numeric
and choice setting, then the few checks that relate settings to each other.

Settings only the data or the model can judge (the corpus, split sizes, Q&A fields, the model's context, a
checkpoint's shapes) are checked by the data module's setup and by run.py, still before training starts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from gptft.errors import ConfigError
from gptft.text.tokenizer import VOCAB_SIZE

log = logging.getLogger(__name__)
_MISSING = object()

# The choices of the data settings; the data modules check against the same tuples when built from Python.
SPLITS = ("tail", "head", "interleaved")
SOURCES = ("book", "random_tokens")
LENGTH_POLICIES = ("truncate", "drop")
ON_BAD_LINE = ("stop", "skip")


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value} is unknown: use one of {', '.join(choices)}")


@dataclass(frozen=True)
class Setting:
    """One setting's type and range. `optional`: keys that only some configs have (e.g. only the
    question/answer data have data.max_length)."""

    key: str
    whole: bool = False  # a whole number (a count), else any real number
    low: float | None = None
    high: float | None = None
    open_low: bool = False  # the bound itself is not allowed
    open_high: bool = False
    example: str = ""
    optional: bool = False
    choices: tuple[str, ...] = ()

    def check(self, cfg: DictConfig) -> None:
        value = OmegaConf.select(cfg, self.key, default=_MISSING)
        if value is _MISSING or value is None:
            if self.optional:
                return
            raise ConfigError(f"{self.key} is not set: give e.g. {self.key}={self.example}")
        if self.choices:
            check_choice(self.key, value, self.choices)
            return
        hint = f": give e.g. {self.key}={self.example}" if self.example else ""
        if isinstance(value, bool) or not isinstance(value, Real):
            raise ConfigError(f"{self.key}={value!r} is not a number{hint}")
        if not math.isfinite(value):
            raise ConfigError(f"{self.key}={value} is not a finite number{hint}")
        too_low = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.open_high else value > self.high)
        if (self.whole and value != int(value)) or too_low or too_high:
            raise ConfigError(f"{self.key}={value} must be {self.range()}{hint}")

    def range(self) -> str:
        kind = "a whole number " if self.whole else ""
        lo, hi = _fmt(self.low), _fmt(self.high)
        if self.low is not None and self.high is not None:
            strictly = "strictly " if self.open_low and self.open_high else ""
            return f"{kind}{strictly}between {lo} and {hi}"
        if self.low is not None:
            return f"{kind}{'>' if self.open_low else '≥'} {lo}"
        return f"{kind}{'<' if self.open_high else '≤'} {hi}"


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:g}"


# Every numeric or choice setting a user may type. Read top to bottom, this is the contract of the config.
SCHEMA: tuple[Setting, ...] = (
    Setting("seed", whole=True, low=0, example="1337"),
    Setting("optim.lr", low=0, open_low=True, example="1e-4"),
    Setting("optim.weight_decay", low=0, example="0.01"),
    Setting("optim.warmup_steps", whole=True, low=0, example="100"),
    Setting("schedule.name", choices=("constant", "cosine")),
    Setting("schedule.min_lr_ratio", low=0, high=1, optional=True, example="0.1"),
    Setting("task.target.mass", low=0, high=1, open_low=True, optional=True, example="0.9"),
    Setting("data.batch_size", whole=True, low=1, example="8"),
    Setting("data.seq_len", whole=True, low=1, optional=True, example="256"),
    Setting("data.val_windows", whole=True, low=1, optional=True, example="32"),
    Setting("data.test_fraction", low=0, high=1, open_low=True, open_high=True, optional=True, example="0.1"),
    Setting("data.split", choices=SPLITS, optional=True),
    Setting("data.source", choices=SOURCES, optional=True),
    Setting("data.max_length", whole=True, low=1, optional=True, example="256"),
    Setting("data.val_pairs", whole=True, low=1, optional=True, example="32"),
    Setting("data.length_policy", choices=LENGTH_POLICIES, optional=True),
    Setting("data.on_bad_line", choices=ON_BAD_LINE, optional=True),
    Setting("task.loss_chunk", whole=True, low=0, example="512"),
    Setting("trainer.max_steps", whole=True, low=1, example="100"),
    Setting("trainer.accumulate_grad_batches", whole=True, low=1, example="4"),
    Setting("eval.max_new_tokens", whole=True, low=1, example="100"),
    Setting("eval.repeats", whole=True, low=0, example="3"),
    Setting("eval.style_tokens", whole=True, low=1, high=VOCAB_SIZE, example="100"),
    Setting("eval.copy_ngram", whole=True, low=1, example="8"),
    Setting("freeze.rank", whole=True, low=1, optional=True, example="8"),  # LoRA (freeze=lora)
    Setting("freeze.alpha", low=0, open_low=True, optional=True, example="16"),
    Setting("freeze.dropout", low=0, high=1, open_high=True, optional=True, example="0.05"),
    Setting("callbacks.reference.windows", whole=True, low=1, optional=True, example="32"),
    Setting("callbacks.reference.kl_tokens", whole=True, low=0, optional=True, example="512"),
)


# Settings renamed because their old names misled (eval.top_k beside eval.top_k_tokens, eval.seed beside
# eval.seeds, training settings under model.): the old name is refused with the new one, never silently mapped.
RENAMED = {
    "eval.seeds": "eval.repeats",
    "eval.top_k_tokens": "eval.style_tokens",
    "model.loss_chunk": "task.loss_chunk",
    "model.tf32": "trainer.tf32",
}


def check_renamed(overrides: Sequence[str]) -> None:
    """Refuse a command-line override of a renamed setting (before Hydra, which would only say the key is unknown)."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in RENAMED:
            raise ConfigError(f"{key} is now {RENAMED[key]}: write {override.replace(key, RENAMED[key], 1)}")


def migrate_renamed(cfg: DictConfig) -> list[str]:
    """Move a saved config's renamed settings (a run started before the rename) to their new names, in place;
    return the old names found."""
    found = []
    for old, new in RENAMED.items():
        value = OmegaConf.select(cfg, old, default=_MISSING)
        if value is _MISSING:
            continue
        parent, leaf = old.rsplit(".", 1)
        with open_dict(cfg):
            OmegaConf.update(cfg, new, value, force_add=True)
            del cfg[parent][leaf]
        found.append(old)
    return found


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad setting and its fix."""
    for old, new in RENAMED.items():  # e.g. a user's own experiment file written before the rename
        if OmegaConf.select(cfg, old, default=_MISSING) is not _MISSING:
            raise ConfigError(f"{old} is now {new}: rename it in your config (or on the command line)")
    for setting in SCHEMA:
        setting.check(cfg)
    if cfg.task.get("target") is not None:
        from gptft.tasks.targets import target_distribution

        target_distribution(**cfg.task.target)  # a bad pattern or α/β fails here, before any weights load
    strategy = OmegaConf.select(cfg, "trainer.strategy._target_", default=None) or ""
    parts = list(OmegaConf.select(cfg, "freeze.qkv_parts", default=None) or ["q", "k", "v"])
    if strategy.endswith("FSDP2Strategy") and sorted(parts) != ["k", "q", "v"]:
        raise ConfigError(
            f"freeze.qkv_parts={parts} masks gradients with hooks that FSDP's sharded parameters do not run: "
            "use trainer=ddp for a partial q/k/v freeze"
        )
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path} does not exist: give a run's checkpoints/last.ckpt, or resume=<run folder>"
        )


def data_length_key(cfg: DictConfig) -> str:
    """The setting that bounds a training row: data.max_length (question/answer pairs) or data.seq_len (windows)."""
    return "data.max_length" if "max_length" in cfg.data else "data.seq_len"


def check_context(seq_len: int, context: int, model_name: str, key: str = "data.seq_len") -> None:
    if seq_len > context:
        raise ConfigError(
            f"{key}={seq_len} is longer than the context of {model_name} ({context} tokens): "
            f"set {key} ≤ {context}"
        )


# What a resumed run may change: settings that only extend the run or observe it. Anything else (the seed, the
# data, the model, the task, freezing, the optimizer and schedule, precision, batch size, accumulation, the number
# of devices) would change which batches, weights or optimizer state the rest of the run uses.
RESUMABLE = (
    "trainer.max_steps",
    "trainer.val_check_interval",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "data.val_windows",
    "data.val_pairs",
    "data.pin_memory",
    "model.compile",
    "eval.",
    "callbacks.",
    "logger.",
)
# ... except the forgetting probe's text and windows: the starting distributions in the checkpoint belong to them.
FIXED_ON_RESUME = ("eval.reference", "callbacks.reference.")


def resumed_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The config a `resume=<run folder>` run continues with: the run's own, plus the command line's overrides
    of the settings in RESUMABLE (e.g. trainer.max_steps=1000). Anything that would make it another run (a
    group such as model=, the seed, data.seed, freeze.*) is refused."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # torch-free: a refusal is quick

    run = Path(cfg.resume)
    saved, last = run / ".hydra" / "config.yaml", run / "checkpoints" / "last.ckpt"
    if not saved.is_file():
        raise ConfigError(
            f"resume={cfg.resume} is not a run folder (no .hydra/config.yaml in it): give a folder under "
            "outputs/ that holds checkpoints/last.ckpt"
        )
    if not last.is_file():
        raise ConfigError(
            f"resume={cfg.resume} has no checkpoints/last.ckpt (it stopped before its first checkpoint): "
            "start it again as a new run"
        )
    resumed = OmegaConf.load(saved)
    for old in migrate_renamed(resumed):  # a run started before a setting was renamed resumes as it was
        log.info("resume: the saved %s is read as its new name", old)
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key in ("resume", "ckpt_path") or key.startswith("hydra."):
            continue
        if override.is_delete() or not key.startswith(RESUMABLE) or key.startswith(FIXED_ON_RESUME):
            raise ConfigError(
                f"resume= continues a run exactly, so {override.input_line} cannot apply (it would change the "
                "batches, weights or optimizer state; a resume may change only trainer.max_steps, validation, "
                "eval.*, callbacks.* and logger.*, but not the reference probe's text or windows): start a new run "
                "for it"
            )
        OmegaConf.update(resumed, key, override.value(), merge=False, force_add=override.is_add())
    resumed.resume, resumed.ckpt_path = str(run), str(last)
    return resumed
