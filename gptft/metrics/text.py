"""What loss hides: how a model's free text relates to the book (style, copying) and to itself (variety).

Every function takes generated token ids as a (sequences × tokens) tensor, prompt tokens excluded.
"""

from __future__ import annotations

import torch

from gptft.errors import ConfigError
from gptft.text.tokenizer import VOCAB_SIZE


def top_token_ids(tokens: torch.Tensor, k: int = 100, vocab_size: int = VOCAB_SIZE) -> torch.Tensor:
    """The k most frequent ids in `tokens` (ties go to the lower id, so the set is reproducible)."""
    if not 0 < k <= vocab_size:
        raise ConfigError(f"eval.top_k_tokens={k} must be between 1 and the vocabulary size {vocab_size}")
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size)
    order = torch.sort(counts, descending=True, stable=True).indices
    return order[:k]


def share_in(generated: torch.Tensor, ids: torch.Tensor) -> float:
    """Fraction of generated tokens whose id is in `ids` (the style ratio with the book's top-100 ids)."""
    if generated.numel() == 0:
        return float("nan")
    return torch.isin(generated, ids.to(generated.device)).float().mean().item()


def _ngrams(sequences: torch.Tensor, n: int) -> list[tuple[int, ...]]:
    if sequences.dim() == 1:
        sequences = sequences[None]
    if sequences.size(1) < n:
        return []
    return [tuple(g) for g in sequences.unfold(1, n, 1).reshape(-1, n).tolist()]


def distinct_n(generated: torch.Tensor, n: int) -> float:
    """Unique n-grams over all n-grams (n-grams never cross from one sequence to the next)."""
    grams = _ngrams(generated.cpu(), n)
    return len(set(grams)) / len(grams) if grams else float("nan")


class NgramIndex:
    """Every n-gram of a token sequence (the training text), for asking how much generated text copies it."""

    def __init__(self, tokens: torch.Tensor, n: int = 8):
        self.n = n
        self.grams = set(_ngrams(tokens.flatten().cpu(), n))

    def copy_rate(self, generated: torch.Tensor) -> float:
        """Share of generated n-grams that occur verbatim in the indexed text."""
        grams = _ngrams(generated.cpu(), self.n)
        return sum(g in self.grams for g in grams) / len(grams) if grams else float("nan")
