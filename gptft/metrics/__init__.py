"""Measures of generated text: style ratio, copy rate, distinct-n (and later the x ratio)."""

from gptft.metrics.text import NgramIndex, distinct_n, share_in, top_token_ids

__all__ = ["NgramIndex", "distinct_n", "share_in", "top_token_ids"]
