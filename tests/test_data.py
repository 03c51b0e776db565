import pytest
import torch

from gptft.data import BookWindows, WindowSampler, split_segments
from gptft.data.windows import _StepBatches, batch_digest
from gptft.errors import ConfigError


@pytest.fixture(scope="module")
def book(data_dir):
    dm = BookWindows(data_dir=str(data_dir), seq_len=64, batch_size=8, seed=7)
    dm.setup("fit")
    return dm


def test_windows_shift_by_one(book):
    x, y = book.train_sampler.batch(0)
    assert x.shape == y.shape == (8, 64) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    starts = book.train_sampler.starts(0)
    assert torch.equal(x[0], book.tokens[starts[0] : starts[0] + 64])


def test_batch_is_a_pure_function_of_seed_and_step(book):
    other = WindowSampler(book.tokens, book.train_segments, 64, 8, seed=7)
    for step in (0, 1, 799):
        assert torch.equal(book.train_sampler.batch(step)[0], other.batch(step)[0])
    assert not torch.equal(book.train_sampler.starts(0), book.train_sampler.starts(1))
    reseeded = WindowSampler(book.tokens, book.train_segments, 64, 8, seed=8)
    assert not torch.equal(book.train_sampler.starts(0), reseeded.starts(0))


def test_loader_continues_at_the_current_step(book):
    """Each iteration starts at the step the trainer has reached: no batch replayed or skipped."""
    step = {"now": 5}
    loader = _StepBatches(book.train_sampler, lambda: step["now"], end=8)
    assert len(loader) == 3
    batches = list(loader)
    assert [torch.equal(x, book.train_sampler.batch(5 + i)[0]) for i, (x, *_) in enumerate(batches)] == [True] * 3
    assert [n for _, _, n, _ in batches] == [8 * 64] * 3  # every target of a window carries a label
    step["now"] = 7  # e.g. Lightning starts a new epoch after a resume
    assert len(loader) == 1 and torch.equal(next(iter(loader))[0], book.train_sampler.batch(7)[0])


def test_accumulated_micro_batches_are_slices_of_one_step_draw(book):
    """With accumulation a, each optimizer step's a micro-batches are the slices of one draw of a × B windows:
    the windows a single batch of a × B would hold, so accumulation changes no batch, only how it is cut."""
    whole = WindowSampler(book.tokens, book.train_segments, 32, 8, seed=0)
    cut = WindowSampler(book.tokens, book.train_segments, 32, 2, seed=0)
    cut.accumulate = 4
    for step in (0, 3):
        micro = torch.cat([cut.starts(step * 4 + i) for i in range(4)])
        assert torch.equal(micro, whole.starts(step))
    loader = _StepBatches(cut, lambda: 4, end=12)  # optimizer steps 1 and 2, each 4 micro-batches
    batches = list(loader)
    assert [n for _, _, n, _ in batches] == [8 * 32] * 8  # the whole step's labelled tokens, on every micro-batch
    # ... and the whole step's digest: the same as one batch of 8 windows gives (what data_fingerprint records)
    whole_digests = [batch_digest(*whole.batch(step)) for step in (1, 2)]
    assert [d for *_, d in batches] == [whole_digests[0]] * 4 + [whole_digests[1]] * 4
    assert whole_digests[0] != whole_digests[1]


def _inside(starts, length, segments):
    return all(any(s <= int(a) and int(a) + length <= e for s, e in segments) for a in starts)


@pytest.mark.parametrize("split", ["tail", "head", "interleaved"])
def test_no_test_token_in_a_train_window(book, split):
    n = len(book.tokens)
    train, test = split_segments(n, split, 0.1, block_len=4096)
    covered = sum(e - s for s, e in train) + sum(e - s for s, e in test)
    assert covered == n
    assert abs(sum(e - s for s, e in test) / n - 0.1) < 0.001
    train_sampler = WindowSampler(book.tokens, train, 64, 64, seed=0)
    test_sampler = WindowSampler(book.tokens, test, 64, 64, seed=0)
    starts = torch.cat([train_sampler.starts(k) for k in range(200)])
    assert _inside(starts, 65, train)  # x and y together span 65 tokens
    assert not _inside(starts, 65, test)
    assert _inside(test_sampler.spread_starts(32), 65, test)


def test_split_positions():
    assert split_segments(1000, "tail", 0.1) == ([(0, 900)], [(900, 1000)])
    assert split_segments(1000, "head", 0.1) == ([(100, 1000)], [(0, 100)])
    train, test = split_segments(1000, "interleaved", 0.5, block_len=100)
    assert test == [(50, 150), (250, 350), (450, 550), (650, 750), (850, 950)]
    assert train == [(0, 50), (150, 250), (350, 450), (550, 650), (750, 850), (950, 1000)]
    with pytest.raises(ConfigError, match="data.split=middle"):
        split_segments(1000, "middle", 0.1)


def test_samples_cover_the_train_part(book):
    """Uniform over start positions: the sampled windows reach both ends of the train part."""
    starts = torch.cat([book.train_sampler.starts(k) for k in range(500)])
    end = book.train_segments[0][1]
    assert starts.min() < 0.05 * end and starts.max() > 0.95 * end - 65


def test_validation_windows_are_fixed_and_in_the_test_part(book):
    a = torch.cat([x for x, _ in book.val_dataloader()])
    b = torch.cat([x for x, _ in book.val_dataloader()])
    assert a.shape == (32, 64) and torch.equal(a, b)


def test_window_longer_than_the_test_split(data_dir):
    dm = BookWindows(data_dir=str(data_dir), seq_len=256, test_fraction=0.001)
    with pytest.raises(ConfigError, match=r"data.seq_len=256 does not fit in the test split"):
        dm.setup("fit")
