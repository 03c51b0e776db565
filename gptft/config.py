"""The composed config, checked in one place before any data, weights or model: a schema of every numeric
and choice setting, then the few checks that relate settings to each other.

Settings only the data or the model can judge (the corpus, split sizes, Q&A fields, the model's context, a
checkpoint's shapes) are checked by the data module's setup and by run.py, still before training starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gptft.errors import ConfigError
from gptft.text.tokenizer import VOCAB_SIZE

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
    Setting("model.loss_chunk", whole=True, low=0, example="512"),
    Setting("trainer.max_steps", whole=True, low=1, example="100"),
    Setting("trainer.accumulate_grad_batches", whole=True, low=1, example="4"),
    Setting("eval.max_new_tokens", whole=True, low=1, example="100"),
    Setting("eval.seeds", whole=True, low=0, example="3"),
    Setting("eval.top_k_tokens", whole=True, low=1, high=VOCAB_SIZE, example="100"),
    Setting("eval.copy_ngram", whole=True, low=1, example="8"),
    Setting("freeze.rank", whole=True, low=1, optional=True, example="8"),  # LoRA (freeze=lora)
    Setting("freeze.alpha", low=0, open_low=True, optional=True, example="16"),
    Setting("freeze.dropout", low=0, high=1, open_high=True, optional=True, example="0.05"),
    Setting("callbacks.reference.windows", whole=True, low=1, optional=True, example="32"),
    Setting("callbacks.reference.kl_tokens", whole=True, low=0, optional=True, example="512"),
)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad setting and its fix."""
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
