"""Checks of the composed config that need no data and no weights: they run before any long work.

Settings only the data can judge (split names and sizes, the corpus) are checked by BookWindows.setup, which
run.py calls before any weights load.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

from omegaconf import DictConfig

from gptft.errors import ConfigError
from gptft.tasks.targets import target_distribution
from gptft.text.tokenizer import VOCAB_SIZE


def _number(cfg: DictConfig, key: str) -> Any:
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(f"{key}={value!r} is not a number: give e.g. {key}=1e-4")
    return value


def _positive_int(cfg: DictConfig, key: str) -> int:
    value = _number(cfg, key)
    if value != int(value) or value < 1:
        raise ConfigError(f"{key}={value} must be a whole number ≥ 1")
    return int(value)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad setting and its fix."""
    lr = _number(cfg, "optim.lr")
    if lr <= 0:
        raise ConfigError(f"optim.lr={lr} must be > 0: give e.g. optim.lr=1e-4")
    if _number(cfg, "optim.weight_decay") < 0:
        raise ConfigError(f"optim.weight_decay={cfg.optim.weight_decay} must be ≥ 0")
    if _number(cfg, "optim.warmup_steps") < 0:
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} must be ≥ 0")
    _positive_int(cfg, "data.batch_size")
    _positive_int(cfg, "data.seq_len")
    _positive_int(cfg, "data.val_windows")
    _positive_int(cfg, "trainer.max_steps")
    if cfg.task.get("target") is not None:
        target_distribution(**cfg.task.target)  # a bad pattern or α/β fails here, before any weights load
    top = _positive_int(cfg, "eval.top_k_tokens")
    if top > VOCAB_SIZE:
        raise ConfigError(f"eval.top_k_tokens={top} exceeds the vocabulary size {VOCAB_SIZE}: use e.g. 100")
    if _number(cfg, "eval.seeds") < 0:
        raise ConfigError(f"eval.seeds={cfg.eval.seeds} must be ≥ 0 (0 turns the free-generation probe off)")
    _positive_int(cfg, "eval.copy_ngram")
    fraction = _number(cfg, "data.test_fraction")
    if not 0 < fraction < 1:
        raise ConfigError(f"data.test_fraction={fraction} must lie strictly between 0 and 1, e.g. 0.1")


def check_context(seq_len: int, context: int, model_name: str) -> None:
    if seq_len > context:
        raise ConfigError(
            f"data.seq_len={seq_len} is longer than the context of {model_name} ({context} tokens): "
            f"set data.seq_len ≤ {context}"
        )
