"""Random windows over a book's token ids, as one LightningDataModule the LM studies share.

Which windows batch k holds is a pure function of (seed, k): two runs with one seed see the same
batches, and a resumed run continues where it stopped because its first batch is batch `global_step`.
Windows are gathered with one tensor index, never a Python loop per token.

Every optimizer step k draws one global batch of accumulate × world_size × batch_size windows from (seed, k);
micro-batch i of the step on rank r keeps its own slice (`StepSampler`). No two ranks or micro-batches take the
same draws, and their union is exactly the batch a single process at accumulate × world_size × batch_size would
train on. So a run on 8 GPUs at data.batch_size=2, or on one device at data.batch_size=4 with
trainer.accumulate_grad_batches=4, sees the same windows as one at data.batch_size=16 on one device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from gptft.config import SOURCES, SPLITS, check_choice
from gptft.data.base import TrainData
from gptft.errors import ConfigError
from gptft.text.corpus import GUTENBERG_URL, load_book_text, load_book_tokens, resolve_book
from gptft.text.tokenizer import EOT_ID, IGNORE_INDEX, VOCAB_SIZE
from gptft.utils.seeding import derive_seed

log = logging.getLogger(__name__)

Segments = list[tuple[int, int]]


def split_segments(
    n_tokens: int, split: str, test_fraction: float, block_len: int = 4096
) -> tuple[Segments, Segments]:
    """[start, end) token ranges of the train and test parts.

    tail: the last `test_fraction` of the tokens tests (the course); head: the first part tests;
    interleaved: about n_test / block_len test blocks of equal length, centred at even intervals, so both
    parts span the whole book and the test share is exactly `test_fraction`.
    """
    check_choice("data.split", split, SPLITS)
    n_test = int(round(n_tokens * test_fraction))
    if split == "tail":
        return [(0, n_tokens - n_test)], [(n_tokens - n_test, n_tokens)]
    if split == "head":
        return [(n_test, n_tokens)], [(0, n_test)]
    # interleaved
    k = max(1, round(n_test / block_len))
    edges = [round((i + 0.5) * n_tokens / k + side * n_test / (2 * k)) for i in range(k) for side in (-1, 1)]
    test = list(zip(edges[0::2], edges[1::2], strict=True))
    bounds = [0, *edges, n_tokens]
    train = [(a, b) for a, b in zip(bounds[0::2], bounds[1::2], strict=True) if b > a]
    return train, test


class StepSampler:
    """A training sampler whose micro-batch is a pure function of (seed, micro-step, rank).

    Optimizer step k = micro-steps k·accumulate … k·accumulate + accumulate − 1. Its global draw holds
    accumulate × world_size slots of batch_size rows; micro-batch i on rank r takes slot i·world_size + r.
    `rank`, `world_size` and `accumulate` are set from the trainer by step_loader.
    """

    batch_size: int
    rank, world_size, accumulate = 0, 1, 1

    def slot(self, micro_step: int, rank: int | None = None) -> tuple[int, int]:
        """(optimizer step, this micro-batch's slot in the step's draw) for `rank` (default: this rank)."""
        step, i = divmod(micro_step, self.accumulate)
        return step, i * self.world_size + (self.rank if rank is None else rank)

    @property
    def slots(self) -> int:
        return self.accumulate * self.world_size

    def batch(self, micro_step: int, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class WindowSampler(StepSampler):
    """Windows of `seq_len + 1` tokens drawn uniformly from the start positions that fit inside `segments`."""

    def __init__(self, tokens: torch.Tensor, segments: Segments, seq_len: int, batch_size: int, seed: int):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        fits = [(s, e - s - seq_len) for s, e in segments if e - s > seq_len]
        self.n_starts = sum(n for _, n in fits)
        if self.n_starts == 0:
            return
        self._first = torch.tensor([s for s, _ in fits])
        self._ends = torch.cumsum(torch.tensor([n for _, n in fits]), 0)  # cumulative count of valid starts
        # Every window as a row of a strided view (no copy): a batch is one index_select of rows. Gathering
        # B × (T + 1) single tokens by advanced indexing instead is up to 100× slower on a busy 2-core CPU.
        self._rows = tokens.unfold(0, seq_len + 1, 1)

    def _positions(self, u: torch.Tensor) -> torch.Tensor:
        """Map ranks 0..n_starts-1 to token positions, segment by segment."""
        seg = torch.searchsorted(self._ends, u, right=True)
        before = torch.where(seg > 0, self._ends[seg - 1], torch.zeros_like(u))
        return self._first[seg] + (u - before)

    def starts(self, micro_step: int, rank: int | None = None) -> torch.Tensor:
        """Start positions of a rank's windows of micro-batch `micro_step`: its slice of the step's draw."""
        step, slot = self.slot(micro_step, rank)
        return self.step_starts(step, self.slots)[slot * self.batch_size : (slot + 1) * self.batch_size]

    def step_starts(self, step: int, slots: int) -> torch.Tensor:
        """Start positions of optimizer step `step`'s whole draw: `slots` micro-batches × ranks of batch_size."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, step, "train"))
        return self._positions(torch.randint(0, self.n_starts, (slots * self.batch_size,), generator=g))

    def spread_starts(self, count: int) -> torch.Tensor:
        """`count` start positions spread evenly over the segments: a fixed, representative set."""
        count = min(count, self.n_starts)
        return self._positions(torch.linspace(0, self.n_starts - 1, count).round().long())

    def windows(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): the windows at `starts` and the same windows shifted by one token."""
        w = self._rows.index_select(0, starts)
        return w[:, :-1], w[:, 1:]

    def batch(self, micro_step: int, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows(self.starts(micro_step, rank))


class RandomTokens(StepSampler):
    """Fresh uniformly random token ids each step (the course's KL-study inputs); still a function of (seed, step)."""

    def __init__(self, seq_len: int, batch_size: int, seed: int, vocab_size: int = VOCAB_SIZE):
        self.seq_len, self.batch_size, self.seed, self.vocab_size = seq_len, batch_size, seed, vocab_size

    def batch(self, micro_step: int, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        step, slot = self.slot(micro_step, rank)
        g = torch.Generator().manual_seed(derive_seed(self.seed, step, "random-tokens"))
        w = torch.randint(0, self.vocab_size, (self.slots * self.batch_size, self.seq_len + 1), generator=g)
        w = w[slot * self.batch_size : (slot + 1) * self.batch_size]
        return w[:, :-1], w[:, 1:]


# (x, y, labelled tokens of the whole optimizer step, the step's data digest)
TrainBatch = tuple[torch.Tensor, torch.Tensor, int, int]


def batch_digest(x: torch.Tensor, y: torch.Tensor) -> int:
    """A checksum of the rows of (x, y) that no batching changes: a sum over rows (their order and grouping into
    micro-batches and ranks do not count) of position-weighted ids, padding (end-of-text in, no label) left out.
    Summed over a step's micro-batches it fingerprints what the step trained on (metrics.json data_fingerprint)."""
    positions = torch.arange(1, x.size(-1) + 1, dtype=torch.long)
    weights = (positions * 2654435761) % (1 << 20) + 1  # distinct per position, small enough for int64 sums
    real = ~((x == EOT_ID) & (y == IGNORE_INDEX))
    return int((((x.long() + 1) * weights + (y.long() + 101) * (weights + 7)) * real).sum())


class _StepBatches(IterableDataset):
    """Yields micro-batches `first()` .. `end - 1` as (x, y, step_tokens, step_digest), one whole batch per item.

    step_tokens counts the labelled targets (y ≠ IGNORE_INDEX) of the whole optimizer step: every micro-batch on
    every rank; step_digest is their `batch_digest`. Batches are a pure function of the step, so it is known before the step runs, with no
    communication: the task divides by it, so the step's loss is one mean over all its tokens (what one batch
    holding every micro-batch and rank would give), however the rows are masked or split.

    `first` is asked each time iteration starts: Lightning may start a new "epoch" after a resume, and
    each start must continue at the trainer's step, never replay or skip a batch.
    """

    def __init__(self, sampler: StepSampler, first: Callable[[], int], end: int):
        self.sampler, self.first, self.end = sampler, first, end

    def __len__(self) -> int:
        return max(0, self.end - self.first())

    def __iter__(self) -> Iterator[TrainBatch]:
        accumulate, first = self.sampler.accumulate, self.first()
        for step in range(first // accumulate, self.end // accumulate):
            micro_steps = range(step * accumulate, (step + 1) * accumulate)
            mine = [self.sampler.batch(m) for m in micro_steps]
            others = [
                self.sampler.batch(m, r)
                for m in micro_steps
                for r in range(self.sampler.world_size)
                if r != self.sampler.rank
            ]
            step_tokens = sum(int((y != IGNORE_INDEX).sum()) for _, y in mine + others)
            step_digest = sum(batch_digest(x, y) for x, y in mine + others)
            for m, (x, y) in zip(micro_steps, mine, strict=True):
                if m >= first:
                    yield x, y, step_tokens, step_digest


def step_loader(
    trainer: L.Trainer | None, sampler: StepSampler, seed: int, pin_memory: bool = False
) -> DataLoader:
    """The training loader of a step sampler: micro-batches trainer.global_step × accumulate …
    max_steps × accumulate − 1 as (x, y, step_tokens, step_digest), so a resumed run continues with the batch it would have
    seen next; each rank and micro-batch keeps its slice of every step's global draw."""
    if trainer is None or trainer.max_steps is None or trainer.max_steps < 0:
        raise ConfigError("trainer.max_steps is not set: batches are drawn per step, so give a step count")
    accumulate = trainer.accumulate_grad_batches

    def first() -> int:
        return trainer.global_step * accumulate

    end = trainer.max_steps * accumulate
    sampler.rank, sampler.world_size, sampler.accumulate = trainer.global_rank, trainer.world_size, accumulate
    log.info(
        "training batches %d to %d of seed %d, rank %d of %d (first batch's first tokens %s)",
        first(),
        end - 1,
        seed,
        trainer.global_rank,
        trainer.world_size,
        sampler.batch(first())[0][:, 0].tolist(),  # tells the ranks' batches apart in the log
    )
    return DataLoader(_StepBatches(sampler, first, end), batch_size=None, pin_memory=pin_memory)


class _FixedWindows(Dataset):
    def __init__(self, sampler: WindowSampler, starts: torch.Tensor):
        self.x, self.y = sampler.windows(starts)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class BookWindows(TrainData):
    """Random training windows from one part of a book, a fixed set of test windows from the other.

    `source="random_tokens"` trains on fresh random token ids instead (the KL study's course setting);
    validation and the probes still use the book.
    """

    def __init__(
        self,
        book: int = 829,
        path: str | None = None,
        data_dir: str = "data",
        keep_header: bool = False,
        download: bool = True,
        url: str = GUTENBERG_URL,
        seq_len: int = 256,
        batch_size: int = 16,
        split: str = "tail",
        test_fraction: float = 0.1,
        block_len: int = 4096,
        val_windows: int = 32,
        seed: int = 0,
        pin_memory: bool = False,
        source: str = "book",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.text: str | None = None
        self.tokens: torch.Tensor | None = None

    def prepare_data(self) -> None:
        # Find (and, as a last resort, download) the book once, on the main process.
        h = self.hparams
        resolve_book(h.book, h.path, h.data_dir, h.download, h.url)

    def setup(self, stage: str | None = None) -> None:
        if self.tokens is not None:
            return  # idempotent: run.py sets up early to fail fast, Lightning calls again
        h = self.hparams
        self.text = load_book_text(h.book, h.path, h.data_dir, h.keep_header, h.download, h.url)
        self.tokens = load_book_tokens(self.text, Path(h.data_dir) / "cache")
        self.train_segments, self.test_segments = split_segments(
            len(self.tokens), h.split, h.test_fraction, h.block_len
        )
        self.train_sampler = WindowSampler(self.tokens, self.train_segments, h.seq_len, h.batch_size, h.seed)
        self.test_sampler = WindowSampler(self.tokens, self.test_segments, h.seq_len, h.batch_size, h.seed)
        for part, sampler, segments in (
            ("train", self.train_sampler, self.train_segments),
            ("test", self.test_sampler, self.test_segments),
        ):
            if sampler.n_starts == 0:
                longest = max((e - s for s, e in segments), default=0)
                raise ConfigError(
                    f"data.seq_len={h.seq_len} does not fit in the {part} split (longest piece {longest} tokens "
                    f"with data.split={h.split}, data.test_fraction={h.test_fraction}): lower data.seq_len "
                    "or change the split"
                )
        check_choice("data.source", h.source, SOURCES)
        if h.source == "random_tokens":
            self.train_sampler = RandomTokens(h.seq_len, h.batch_size, h.seed)
        log.info(
            "%d tokens: train %d, test %d (split=%s); windows of %d tokens, batch %d",
            len(self.tokens),
            sum(e - s for s, e in self.train_segments),
            sum(e - s for s, e in self.test_segments),
            h.split,
            h.seq_len,
            h.batch_size,
        )

    def train_token_ids(self) -> torch.Tensor:
        """All token ids of the training part (for probes that compare generated text with it)."""
        return torch.cat([self.tokens[s:e] for s, e in self.train_segments])

    def text_token_ids(self) -> torch.Tensor:
        """All token ids of the book, both splits: the course counts the style ratio's set over the book."""
        return self.tokens

    def metrics(self) -> dict[str, Any]:
        """What metrics.json keeps under `data`: enough to compute the held-out loss and the first step's train loss
        again from the book (its token count, the validation windows' starts, the starts of the first optimizer
        step's windows over all its micro-batches and ranks, once a trainer is attached)."""
        h = self.hparams
        out = {"tokens": len(self.tokens), "seq_len": h.seq_len, "val_starts": self._val_starts().tolist()}
        if isinstance(self.train_sampler, WindowSampler) and self.trainer is not None:
            slots = self.trainer.accumulate_grad_batches * self.trainer.world_size
            out["first_step_starts"] = self.train_sampler.step_starts(0, slots).tolist()
        return {"data": out}

    def _val_starts(self) -> torch.Tensor:
        return self.test_sampler.spread_starts(self.hparams.val_windows)

    def train_dataloader(self) -> DataLoader:
        return step_loader(self.trainer, self.train_sampler, self.hparams.seed, self.hparams.pin_memory)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            _FixedWindows(self.test_sampler, self._val_starts()),
            batch_size=self.hparams.batch_size,
            shuffle=False,
            pin_memory=self.hparams.pin_memory,
        )
