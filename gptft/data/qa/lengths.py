"""Token-length statistics of questions, answers and rows (what data.max_length would cut)."""

from __future__ import annotations

import torch

from gptft.text.tokenizer import gpt2_encoding


def length_stats(counts: list[int]) -> dict[str, float]:
    """count, mean, median, 90th and 99th percentile (linear interpolation) and max of token counts."""
    if not counts:
        return {"count": 0}
    t = torch.tensor(counts, dtype=torch.float64)
    p50, p90, p99 = torch.quantile(t, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {
        "count": len(counts),
        "mean": round(t.mean().item(), 2),
        "median": p50,
        "p90": round(p90, 2),
        "p99": round(p99, 2),
        "max": int(t.max().item()),
    }


def token_counts(texts: list[str]) -> list[int]:
    return [len(ids) for ids in gpt2_encoding().encode_ordinary_batch(texts)]
