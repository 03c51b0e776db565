"""Text in: the GPT-2 tokenizer (offline) and Gutenberg books."""

from gptft.text.corpus import load_book_text, load_book_tokens
from gptft.text.tokenizer import EOT_ID, IGNORE_INDEX, VOCAB_SIZE, gpt2_encoding, gpt2_files, hf_tokenizer

__all__ = [
    "EOT_ID",
    "IGNORE_INDEX",
    "VOCAB_SIZE",
    "gpt2_encoding",
    "gpt2_files",
    "hf_tokenizer",
    "load_book_text",
    "load_book_tokens",
]
