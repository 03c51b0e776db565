"""Target distributions over the vocabulary, built from a predicate on each token's decoded string."""

from __future__ import annotations

import logging
import re
from functools import lru_cache

import torch

from gptft.errors import ConfigError
from gptft.text.tokenizer import gpt2_encoding

log = logging.getLogger(__name__)


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
    pattern: str = "x",
    ignore_case: bool = False,
    mass: float | None = 1.0,
    alpha: float | None = None,
    beta: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_target over the vocabulary, the matching ids).

    `mass`: the matching ids share this total probability evenly, the others share the rest (1.0, the default,
    is the course's target: uniform over the matches, zero elsewhere). The write-up's per-token form is the
    alternative: `alpha` and `beta` (with mass unset) weigh each matching and each other token, so the matches'
    total is n·α / (n·α + (V − n)·β): with α 0.9 and β 0.1 the 897 x tokens get about 14%, not 90%.
    """
    per_token = alpha is not None or beta is not None
    if per_token and mass is not None:
        raise ConfigError(
            f"task.target.mass={mass} and task.target.alpha/beta={alpha}/{beta} are two ways to say the same: "
            "give task.target.mass (the matches' total probability), or task.target.mass=null with alpha and beta"
        )
    if not per_token and not (mass is not None and 0 < mass <= 1):
        raise ConfigError(f"task.target.mass={mass} must be in (0, 1]: the matches' total probability, e.g. 0.9")
    if per_token and not (alpha or 0) > (beta or 0) >= 0:
        raise ConfigError(
            f"task.target.alpha={alpha}, task.target.beta={beta}: need alpha > beta ≥ 0 (beta=0 puts all mass on matches)"
        )
    ids = matching_ids(pattern, ignore_case)
    vocab = len(token_strings())
    if per_token:
        weights = torch.full((vocab,), float(beta or 0), dtype=torch.float64)
        weights[ids] = float(alpha)
        p = weights / weights.sum()
    else:
        p = torch.full((vocab,), (1 - mass) / (vocab - len(ids)), dtype=torch.float64)
        p[ids] = mass / len(ids)
    log.info(
        "KL target: %d tokens match %r and get %.1f%% of the probability (%.3g each); the other %d get %.3g each",
        len(ids), pattern, 100 * p[ids].sum().item(), p[ids[0]].item(), vocab - len(ids),
        (1 - p[ids].sum().item()) / (vocab - len(ids)),
    )  # fmt: skip
    return p.float(), ids
