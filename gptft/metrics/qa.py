"""Exact match of generated answers: GSM8K's final number, or the normalised text for other data.

GSM8K references end with "#### <number>"; a model's answer counts as right when the last number it
writes equals that number (lm-evaluation-harness calls this the "flexible extract"). Every other reference
(open questions: Dolly, WebGLM) is compared as text, normalised as SQuAD's exact match does it, even when it
holds numbers: "The 16th president was Abraham Lincoln" is not answered by "16".
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation

# A number: digits with commas only where they group thousands (three digits each, so "1,2,3" is three numbers),
# an optional decimal part, and a minus sign (ASCII or U+2212) only where no letter or digit stands before it:
# "3-5" is a range ending in 5, "COVID-19" a name ending in 19, neither a negative number.
NUMBER = re.compile(
    r"(?:(?<!\w)[-\u2212])?(?:(?<!\d)(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\d.])\.\d+)"
)
FINAL_MARK = "####"


def _value(number: str) -> Decimal | None:
    """'1,234.50' -> Decimal('1234.50'); '18' and '18.00' compare equal as Decimals."""
    try:
        return Decimal(number.replace(",", "").replace("\u2212", "-"))
    except InvalidOperation:
        return None


def last_number(text: str) -> Decimal | None:
    """The last number written in `text`, or None."""
    found = NUMBER.findall(text)
    return _value(found[-1]) if found else None


def reference_number(reference: str) -> Decimal | None:
    """GSM8K's answer: the first number after the last '####'; None for a reference without the mark."""
    if FINAL_MARK not in reference:
        return None
    found = NUMBER.findall(reference.rsplit(FINAL_MARK, 1)[1])
    return _value(found[0]) if found else None


def normalise(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """Whether `prediction` gives the reference's answer: GSM8K's final number, else the normalised text."""
    expected = reference_number(reference)
    if expected is not None:
        return last_number(prediction) == expected
    return normalise(prediction) == normalise(reference)


def exact_match_rate(predictions: Iterable[str], references: Iterable[str]) -> float:
    """The share of predictions that match their reference (0 for no pairs)."""
    hits = [exact_match(p, r) for p, r in zip(predictions, references, strict=True)]
    return sum(hits) / len(hits) if hits else 0.0
