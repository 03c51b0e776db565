import shutil

import pytest

from gptft.errors import ConfigError
from gptft.text import EOT_ID, VOCAB_SIZE, gpt2_encoding, gpt2_files, hf_tokenizer, load_book_tokens


def test_known_ids():
    enc = gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_ID] == [50256]
    assert enc.n_vocab == VOCAB_SIZE == 50257


def test_whole_book_matches_transformers_tokenizer(book_text):
    """tiktoken from the packaged files and HF's own BPE implementation agree on every id of the book."""
    ours = gpt2_encoding().encode_ordinary(book_text)
    theirs = hf_tokenizer()(book_text)["input_ids"]
    assert len(ours) > 140_000
    assert ours == theirs
    assert gpt2_encoding().decode(ours) == book_text


def test_token_ids_are_cached_by_text_hash(book_text, tmp_path):
    first = load_book_tokens(book_text, tmp_path)
    cached = list(tmp_path.glob("tokens-gpt2-*.pt"))
    assert len(cached) == 1
    assert load_book_tokens(book_text, tmp_path).equal(first)
    load_book_tokens(book_text + "more", tmp_path)
    assert len(list(tmp_path.glob("tokens-gpt2-*.pt"))) == 2  # another text, another key


def test_tampered_bpe_file_is_refused(tmp_path):
    for name, path in gpt2_files().items():
        shutil.copy(path, tmp_path / name)
    with open(tmp_path / "vocab.bpe", "ab") as f:
        f.write(b"x")
    with pytest.raises(ConfigError, match="sha256"):
        gpt2_files(tmp_path)
