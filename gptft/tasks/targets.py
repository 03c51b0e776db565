"""Target distributions over the vocabulary, built from a predicate on each token's decoded string."""

from __future__ import annotations

import re
from functools import lru_cache

import torch

from gptft.errors import ConfigError
from gptft.text.tokenizer import gpt2_encoding


@lru_cache(maxsize=1)
def token_strings() -> tuple[str, ...]:
    """Every GPT-2 id decoded on its own (`<|endoftext|>` included, as `tokenizer.decode([i])` gives it)."""
    enc = gpt2_encoding()
    return tuple(enc.decode([i]) for i in range(enc.n_vocab))


def matching_ids(pattern: str, ignore_case: bool = False) -> torch.Tensor:
    """Ids whose decoded string matches the regular expression `pattern` somewhere."""
    try:
        regex = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    except re.error as e:
        raise ConfigError(
            f"task.target.pattern={pattern!r} is not a valid regular expression ({e}): fix it, e.g. 'x'"
        ) from None
    strings = token_strings()
    ids = torch.tensor([i for i, s in enumerate(strings) if regex.search(s)], dtype=torch.long)
    if len(ids) == 0:
        raise ConfigError(
            f"task.target.pattern={pattern!r} matches no token: loosen it (e.g. task.target.ignore_case=true)"
        )
    if len(ids) == len(strings):
        raise ConfigError(
            f"task.target.pattern={pattern!r} matches every token, so the target is uniform: narrow it"
        )
    return ids


def target_distribution(
    pattern: str = "x", ignore_case: bool = False, alpha: float = 1.0, beta: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_target over the vocabulary, the matching ids): mass ∝ alpha on matches, ∝ beta elsewhere.

    beta = 0 is the course's target, uniform over the matching ids and zero elsewhere.
    """
    if not alpha > beta >= 0:
        raise ConfigError(
            f"task.target.alpha={alpha}, task.target.beta={beta}: need alpha > beta ≥ 0 (beta=0 puts all mass on matches)"
        )
    ids = matching_ids(pattern, ignore_case)
    weights = torch.full((len(token_strings()),), float(beta), dtype=torch.float64)
    weights[ids] = float(alpha)
    return (weights / weights.sum()).float(), ids
