from collections import Counter
from decimal import Decimal

import pytest
import torch

from gptft.callbacks import Probes
from gptft.callbacks.probes import spread
from gptft.data import BookWindows
from gptft.errors import ConfigError
from gptft.metrics import NgramIndex, distinct_n, share_in, top_token_ids
from gptft.metrics.qa import exact_match, last_number, reference_number
from gptft.models import build_model


def test_top_ids_by_frequency_ties_to_the_lower_id():
    assert top_token_ids(torch.tensor([5, 5, 5, 3, 3, 9]), k=2).tolist() == [5, 3]
    assert top_token_ids(torch.tensor([7, 2, 2, 7, 1]), k=1).tolist() == [2]
    for bad in (0, 50258):
        with pytest.raises(ConfigError, match=f"eval.style_tokens={bad}"):
            top_token_ids(torch.tensor([1, 2]), k=bad)


def test_share_in_a_token_set():
    generated = torch.tensor([[1, 2, 3, 4], [1, 1, 9, 9]])
    assert share_in(generated, torch.tensor([1, 2])) == pytest.approx(4 / 8)
    assert share_in(generated, torch.tensor([42])) == 0.0


def test_distinct_n_within_sequences():
    assert distinct_n(torch.tensor([[1, 2, 1, 2]]), 1) == pytest.approx(2 / 4)
    assert distinct_n(torch.tensor([[1, 2, 1, 2]]), 2) == pytest.approx(2 / 3)
    assert distinct_n(torch.tensor([[1, 2], [1, 2]]), 2) == pytest.approx(1 / 2)  # no n-gram across rows
    assert distinct_n(torch.tensor([[3, 4, 5, 6]]), 2) == 1.0


@pytest.fixture(scope="module")
def book(data_dir):
    dm = BookWindows(data_dir=str(data_dir), seq_len=64, batch_size=8)
    dm.setup("fit")
    return dm


def test_copy_rate_of_the_book_itself_and_of_shuffled_tokens(book):
    train = book.train_token_ids()
    index = NgramIndex(train, n=8)
    copied = book.train_sampler.batch(0)[0]  # windows of the training text
    assert index.copy_rate(copied) == 1.0
    shuffled = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))][:1000].view(
        10, 100
    )
    assert index.copy_rate(shuffled) < 0.01
    assert index.copy_rate(book.test_sampler.batch(0)[0]) < 0.2  # unseen text of the same book


@pytest.mark.parametrize("n", [1, 3, 8, 9])
def test_copy_rate_counts_exactly_what_a_set_of_ngram_tuples_counts(book, n):
    # The index packs n-grams into integers; the plain definition, a set of n-tuples, must agree to the bit.
    train = book.train_token_ids()[:20_000]
    g = torch.Generator().manual_seed(n)
    rows = torch.stack([train[s : s + 60] for s in torch.randint(0, len(train) - 60, (4,), generator=g)])
    rows[1::2, 20:40] = torch.randint(0, 50257, (2, 20), generator=g)  # two rows partly made up
    rows[3, 50:] = 50256  # the highest ids too

    def tuples(t: torch.Tensor) -> list[tuple[int, ...]]:
        return [
            tuple(row[i : i + n].tolist())
            for row in t.view(-1, t.size(-1))
            for i in range(t.size(-1) - n + 1)
        ]

    seen = set(tuples(train[None]))
    expected = sum(gram in seen for gram in tuples(rows)) / len(tuples(rows))
    assert 0 < expected < 1 and NgramIndex(train, n).copy_rate(rows) == expected


def test_style_ratio_of_real_text_is_about_half(book):
    """GPT-2's 100 most frequent ids in Gulliver cover roughly half of the book's own tokens."""
    top = top_token_ids(book.train_token_ids(), 100)
    assert 0.4 < share_in(book.test_sampler.batch(0)[0], top) < 0.7


def test_style_set_is_the_whole_books_most_frequent_ids(book, tmp_path):
    """The style ratio's set is the book's 100 most frequent ids (both splits), as the course defines it; the
    copy rate still indexes the training split only (copying is of what the model trained on)."""
    counts = Counter(book.tokens.tolist())
    expected = sorted(counts, key=lambda i: (-counts[i], i))[:100]
    probes = Probes(prompts=[], out_dir=str(tmp_path))
    probes._index_training_text(book)
    assert probes._top_ids.tolist() == expected
    train = book.tokens[: book.train_segments[0][1]].tolist()  # data.split=tail: the book's first 90%
    assert len(probes._ngrams.grams) == len({tuple(train[i : i + 8]) for i in range(len(train) - 7)})


def test_free_generation_probe_is_deterministic_and_restores_train_mode(book, tiny_model_dir, tmp_path):
    model = build_model(name_or_path=str(tiny_model_dir))
    probes = Probes(prompts=[], out_dir=str(tmp_path), max_new_tokens=8, repeats=2, free_prompts=4)
    probes._index_training_text(book)
    first, drawn = probes.free_generation(model)
    again, drawn_again = probes.free_generation(model)
    assert first == again and model.training
    assert set(first) == {"style_ratio", "copy_rate", "distinct_1", "distinct_2"}
    assert len(first["style_ratio"]["values"]) == 2 and first["style_ratio"]["std"] >= 0
    assert [(p.shape, g.shape) for p, g in drawn] == [((4, 1), (4, 8))] * 2  # every repeat's ids, kept
    assert all(torch.equal(a, b) for a, b in zip(drawn[1], drawn_again[1], strict=True))
    other = Probes(prompts=[], out_dir=str(tmp_path), max_new_tokens=8, repeats=2, free_prompts=4, seed=1)
    other._index_training_text(book)
    # another seed: other prompts and other text
    other_prompts, other_generated = other.free_generation(model)[1][0]
    assert not torch.equal(other_prompts, drawn[0][0]) and not torch.equal(other_generated, drawn[0][1])


def test_only_gsm8k_references_compare_by_number():
    # A reference without GSM8K's "#### N" is an open answer: a number in it is no answer key.
    lincoln = "Lincoln was shot on April 14, 1865, at Ford's Theatre, and died the next morning."
    assert not exact_match("I don't know, maybe 1865", lincoln)
    assert not exact_match("16", "The 16th president of the United States was Abraham Lincoln.")
    assert exact_match("Abraham Lincoln!", "abraham lincoln") and not exact_match(
        "Lincoln", "abraham lincoln"
    )
    assert reference_number(lincoln) is None and reference_number("so 9 * 2 = 18\n#### 18") == 18


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("3-5 apples", 5),  # a hyphen between numbers is a range, not a minus sign
        ("pages 10-12", 12),
        ("COVID-19", 19),
        ("1,2,3", 3),  # commas group thousands only in threes
        ("1,234,567 people", 1234567),
        ("12,34", 34),
        ("it is \u22127 degrees", -7),  # a Unicode minus sign
        ("from -3 to -4.5", Decimal("-4.5")),
        ("costs $1,250.50.", Decimal("1250.50")),
        ("no number", None),
    ],
)
def test_last_number_reads_ranges_lists_and_signs(text, number):
    assert last_number(text) == number


def test_one_repeat_has_no_spread():
    # One generation repeat measures no spread: None, never a 0.0 the report would print as "± 0".
    assert spread([0.25]) == {"mean": 0.25, "std": None, "values": [0.25]}
    assert spread([1.0, 3.0])["std"] == pytest.approx(2**0.5)
