"""Question/answer pairs for instruction tuning, as one LightningDataModule with the loss mask built in.

The pieces live in gptft.data.qa: reading the records (files), the template (template), the token rows with
their loss mask and the length limit (rows), the length statistics (lengths). This file batches the rows:
which pairs batch k holds is a pure function of (seed, k) (a seeded permutation per epoch), so a resumed run
sees the batches it would have seen, and writes what the data measured (lengths.json).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from gptft.config import LENGTH_POLICIES, ON_BAD_LINE, check_choice
from gptft.data.base import TrainData
from gptft.data.qa.files import (
    OFFLINE_CHOICES,
    Fields,
    extract_pairs,
    hf_records,
    read_records,
    resolve_qa_file,
)
from gptft.data.qa.lengths import length_stats, token_counts
from gptft.data.qa.rows import Encoded, Row, encode_pairs, pad_batch
from gptft.data.qa.template import Template
from gptft.data.windows import StepSampler, step_loader
from gptft.errors import ConfigError
from gptft.utils.io import atomic_write_json
from gptft.utils.seeding import derive_seed

log = logging.getLogger(__name__)


class PairBatches(StepSampler):
    """Optimizer step k = the next accumulate × world_size × B pairs of an endless run of seeded per-epoch
    permutations; each micro-batch on each rank keeps its slot of them (StepSampler), so with one process and no
    accumulation batch k is pairs k·B … k·B + B − 1.
    """

    def __init__(self, rows: list[Row], batch_size: int, seed: int, mask_prompt: bool = True):
        self.rows, self.batch_size, self.seed, self.mask_prompt = rows, batch_size, seed, mask_prompt
        self._perms: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:  # only the epochs around the current step are ever asked for
                self._perms.clear()
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "instruct-epoch"))
            self._perms[epoch] = torch.randperm(len(self.rows), generator=g).tolist()
        return self._perms[epoch]

    def indices(self, micro_step: int, rank: int | None = None) -> list[int]:
        n, b = len(self.rows), self.batch_size
        step, slot = self.slot(micro_step, rank)
        start = (step * self.slots + slot) * b
        return [self._order(p // n)[p % n] for p in range(start, start + b)]

    def batch(self, micro_step: int, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_batch([self.rows[i] for i in self.indices(micro_step, rank)], self.mask_prompt)


class InstructPairs(TrainData):
    """Question/answer pairs from JSON lines, JSON, CSV or a Hugging Face dataset, as masked (x, y) batches.

    Training pairs come from `train_file` (or the dataset's train split); test pairs from `test_file`, the
    test split, or else a seeded `test_fraction` of the training pairs. `val_pairs` fixed test pairs give
    the test loss and the probes' held-out loss. At setup the token lengths of questions and answers, and
    how many rows the `max_length` policy cut or dropped, are logged, kept for metrics.json (`metrics()`)
    and written to `out_dir` (lengths.json, with every pair's counts, from which the report draws lengths.png).
    """

    def __init__(
        self,
        train_file: str | None = None,
        test_file: str | None = None,
        hf_dataset: str | None = None,
        hf_train_split: str = "train",
        hf_test_split: str = "test",
        data_dir: str = "data",
        question_field: str = "question",
        answer_field: str = "answer",
        text_field: str | None = None,
        split_marker: str | None = None,
        question_marker: str | None = None,
        on_bad_line: str = "stop",
        prompt: dict[str, str] | None = None,
        mask_prompt: bool = True,
        max_length: int = 256,
        length_policy: str = "truncate",
        batch_size: int = 8,
        test_fraction: float = 0.1,
        val_pairs: int = 32,
        seed: int = 0,
        pin_memory: bool = False,
        out_dir: str | None = None,
        # Book-window keys that generic presets (debug=fast) set for every data module; unused here.
        seq_len: int | None = None,
        val_windows: int | None = None,
    ):
        super().__init__()
        prompt = dict(prompt or {})  # a plain dict in hparams: checkpoints load with weights_only=True
        self.save_hyperparameters()
        self.template = Template(**prompt)
        self.lengths: dict[str, Any] | None = None

    # -- setup

    def setup(self, stage: str | None = None) -> None:
        if self.lengths is not None:
            return  # idempotent: run.py sets up early to fail fast, Lightning calls again
        h = self.hparams
        self._check_settings()
        (train, test), test_positions, skipped = self._load_pairs()
        question_counts = token_counts([q for q, _ in train])
        answer_counts = token_counts([a for _, a in train])
        encoded = {
            part: encode_pairs(pairs, self.template, h.max_length, h.length_policy)
            for part, pairs in (("train", train), ("test", test))
        }
        for part, e in encoded.items():
            if not e.rows:
                fix = "" if e.question_too_long == e.dropped else " or use data.length_policy=truncate"
                raise ConfigError(
                    f"every {part} pair is longer than data.max_length={h.max_length} tokens "
                    f"({e.question_too_long} of {e.dropped} by the question alone): raise data.max_length{fix}"
                )
        self.train_rows, self.test_rows = encoded["train"].rows, encoded["test"].rows
        g = torch.Generator().manual_seed(derive_seed(h.seed, 0, "instruct-val"))
        chosen = torch.randperm(len(self.test_rows), generator=g)[: h.val_pairs].sort().values
        self.val_rows = [self.test_rows[i] for i in chosen.tolist()]
        # Where each validation pair came from, so its loss can be computed again from the data file.
        self.val_positions = [test_positions[encoded["test"].kept[i]] for i in chosen.tolist()]
        self.train_batches = PairBatches(self.train_rows, h.batch_size, h.seed, h.mask_prompt)
        self.lengths = self._lengths(encoded, question_counts, answer_counts, skipped)
        self._raw_counts = {"question": question_counts, "answer": answer_counts}
        self._report()

    def _check_settings(self) -> None:
        h = self.hparams
        check_choice("data.length_policy", h.length_policy, LENGTH_POLICIES)
        check_choice("data.on_bad_line", h.on_bad_line, ON_BAD_LINE)
        if h.text_field and not h.split_marker:
            raise ConfigError(
                f"data.text_field={h.text_field} needs data.split_marker (the text between question and "
                "answer, e.g. '### Assistant:')"
            )
        if not (h.train_file or h.hf_dataset):
            raise ConfigError(f"data.train_file and data.hf_dataset are both unset: use {OFFLINE_CHOICES}")

    def _load_pairs(self) -> tuple[tuple[list[tuple[str, str]], list[tuple[str, str]]], list[int], int]:
        """((train pairs, test pairs), each test pair's position among the pairs read from its source (the test
        file, or the training file a test fraction was held out of), records skipped)."""
        h = self.hparams
        fields = Fields(h.question_field, h.answer_field, h.text_field, h.split_marker, h.question_marker)
        skipped = 0

        def pairs_of(name: str | None, setting: str, split: str) -> list[tuple[str, str]] | None:
            nonlocal skipped
            if h.hf_dataset and not h.train_file:
                records = hf_records(h.hf_dataset, split)
            elif name:
                records, bad = read_records(
                    resolve_qa_file(name, setting, h.data_dir), setting, h.on_bad_line
                )
                skipped += bad
            else:
                return None
            pairs, bad = extract_pairs(records, fields, h.on_bad_line)
            skipped += bad
            if not pairs:
                raise ConfigError(f"{setting}={name or h.hf_dataset} holds no question/answer pairs")
            return pairs

        train = pairs_of(h.train_file, "data.train_file", h.hf_train_split)
        test = pairs_of(h.test_file, "data.test_file", h.hf_test_split)
        positions = list(range(len(test or [])))
        if test is None:  # no test file: hold out a seeded fraction of the training pairs
            g = torch.Generator().manual_seed(derive_seed(h.seed, 0, "instruct-split"))
            order = torch.randperm(len(train), generator=g).tolist()
            n_test = max(1, round(len(train) * h.test_fraction))
            if n_test >= len(train):
                raise ConfigError(
                    f"data.test_fraction={h.test_fraction} leaves no training pairs of {len(train)}"
                )
            positions = sorted(order[:n_test])
            test = [train[i] for i in positions]
            train = [train[i] for i in sorted(order[n_test:])]
        return (train, test), positions, skipped

    def _lengths(
        self, encoded: dict[str, Encoded], questions: list[int], answers: list[int], skipped: int
    ) -> dict[str, Any]:
        h = self.hparams
        return {
            "source": h.train_file or h.hf_dataset,
            "max_length": h.max_length,
            "length_policy": h.length_policy,
            "mask_prompt": h.mask_prompt,
            "question": length_stats(questions),  # tokens of the training questions and answers, no template
            "answer": length_stats(answers),
            "row": length_stats([len(r.ids) for r in encoded["train"].rows]),  # templated, after the policy
            "pairs": {**{part: len(e.rows) for part, e in encoded.items()}, "val": len(self.val_rows)},
            "val_indices": self.val_positions,
            "truncated": {part: e.truncated for part, e in encoded.items()},
            "dropped": {part: e.dropped for part, e in encoded.items()},
            "question_too_long": {part: e.question_too_long for part, e in encoded.items()},
            "skipped_records": skipped,
        }

    def _report(self) -> None:
        """Log the length statistics; write them, with every pair's token counts, to out_dir/lengths.json (the
        report draws their histogram, lengths.png)."""
        s = self.lengths
        for what in ("question", "answer", "row"):
            m = s[what]
            log.info(
                "%s tokens: count %d, mean %.1f, median %g, p90 %g, p99 %g, max %d",
                what, m["count"], m["mean"], m["median"], m["p90"], m["p99"], m["max"],
            )  # fmt: skip
        log.info(
            "max_length %d (%s): truncated %s, dropped %s; pairs %s",
            s["max_length"], s["length_policy"], s["truncated"], s["dropped"], s["pairs"],
        )  # fmt: skip
        if self.hparams.out_dir:
            atomic_write_json(Path(self.hparams.out_dir) / "lengths.json", {**s, "tokens": self._raw_counts})

    def metrics(self) -> dict[str, Any]:
        """What goes into metrics.json: the length statistics under `lengths`."""
        return {"lengths": self.lengths} if self.lengths is not None else {}

    # -- data

    def train_token_ids(self) -> torch.Tensor:
        """All token ids of the training rows (for probes that compare generated text with them)."""
        return torch.cat([r.ids for r in self.train_rows])

    def train_dataloader(self) -> DataLoader:
        return step_loader(self.trainer, self.train_batches, self.hparams.seed, self.hparams.pin_memory)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_rows,
            batch_size=self.hparams.batch_size,
            shuffle=False,
            collate_fn=partial(pad_batch, mask_prompt=self.hparams.mask_prompt),
            pin_memory=self.hparams.pin_memory,
        )
