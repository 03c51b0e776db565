"""Question/answer pairs for instruction tuning, as one LightningDataModule with the loss mask built in.

A row is the template's question part then its answer part then end-of-text, tokenised piece by piece so
the boundary is exact. Batches are (x, y) with y already shifted; y holds IGNORE_INDEX (-100) on the
question part (with `mask_prompt`) and on padding, so CausalLM's loss counts the answer tokens only.
Which pairs batch k holds is a pure function of (seed, k) (a seeded permutation per epoch), so a resumed
run sees the batches it would have seen.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from gptft.config import LENGTH_POLICIES, ON_BAD_LINE, check_choice
from gptft.data.windows import StepSampler, step_loader
from gptft.errors import ConfigError
from gptft.text.corpus import read_text, shared_data_dirs
from gptft.text.tokenizer import EOT_ID, IGNORE_INDEX, gpt2_encoding
from gptft.utils.io import atomic_write_bytes, atomic_write_json
from gptft.utils.seeding import derive_seed

log = logging.getLogger(__name__)

OFFLINE_CHOICES = "data=gsm8k or data=dolly_open_qa (offline copies), or data.train_file=FILE"
Record = tuple[str, dict[str, Any]]  # (where it came from, e.g. "file.jsonl line 3"; the fields)


# ---------------------------------------------------------------- reading files


def resolve_qa_file(name: str, setting: str, data_dir: str | Path = "data") -> Path:
    """The file `name` as given, else in data_dir, else in the team's offline copy (../shared/data/*/)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if not path.is_absolute():
        candidates = [Path(data_dir) / name]
        for shared in shared_data_dirs():
            candidates += [shared / name, *sorted(shared.glob(f"*/{name}"))]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
    raise ConfigError(
        f"{setting}={name} does not exist (looked as given, in {data_dir}/ and ../shared/data/*/): "
        f"point it at a .jsonl, .json or .csv file, or use {OFFLINE_CHOICES}"
    )


def read_records(path: Path, setting: str, on_bad_line: str = "stop") -> tuple[list[Record], int]:
    """(records, lines skipped) of a JSON lines, JSON (a list of objects) or CSV file."""
    text = read_text(path, setting)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines(keepends=True))
        return [(f"{path.name} line {reader.line_num}", dict(row)) for row in reader], 0
    if suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{setting}={path}: line {e.lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(items, list):
            raise ConfigError(f"{setting}={path} holds a JSON {type(items).__name__}, not a list of objects")
        return [(f"{path.name} item {i + 1}", item) for i, item in enumerate(items)], 0
    records, skipped = [], 0
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path.name} line {number}", json.loads(line)))
        except json.JSONDecodeError as e:
            if on_bad_line == "stop":
                raise ConfigError(
                    f"{setting}={path}: line {number} is not valid JSON ({e.msg}): fix the line or set "
                    "data.on_bad_line=skip"
                ) from None
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d lines that are not valid JSON (data.on_bad_line=skip)", path, skipped)
    return records, skipped


def hf_records(name: str, split: str) -> list[Record]:
    """A Hugging Face dataset split, through the optional `datasets` package (not a gptft dependency)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"data.hf_dataset={name}: needs the Hugging Face `datasets` package (pip install datasets) and the "
            f"network; without them use {OFFLINE_CHOICES}"
        ) from None
    from gptft.models.build import _hub_unreachable  # the same ≤ 3 s reachability check as for weights

    why = _hub_unreachable()
    if why:
        raise ConfigError(f"data.hf_dataset={name}: cannot be downloaded ({why}); use {OFFLINE_CHOICES}")
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - any failure of the hub or the dataset becomes one line
        raise ConfigError(
            f"data.hf_dataset={name}: split {split} could not be loaded ({e}); use {OFFLINE_CHOICES}"
        ) from None
    return [(f"{name} {split} row {i + 1}", dict(row)) for i, row in enumerate(rows)]


@dataclass(frozen=True)
class Fields:
    """How a record holds its question and answer: two fields, or one text field split at a marker."""

    question: str = "question"
    answer: str = "answer"
    text: str | None = None
    split_marker: str | None = None
    question_marker: str | None = None

    def pair(self, where: str, record: Any) -> tuple[str, str]:
        """(question, answer) of one record; ConfigError naming the record and what it lacks."""
        if not isinstance(record, dict):
            raise ConfigError(f"{where} is a JSON {type(record).__name__}, not an object with fields")
        wanted = [self.text] if self.text else [self.question, self.answer]
        missing = [f for f in wanted if record.get(f) in (None, "")]
        if missing:
            setting = "data.text_field" if self.text else "data.question_field / data.answer_field"
            raise ConfigError(
                f"{where} has no field {', '.join(map(repr, missing))} ({setting}): its fields are "
                f"{', '.join(map(repr, record)) or 'none'}"
            )
        if not self.text:
            return str(record[self.question]).strip(), str(record[self.answer]).strip()
        text = str(record[self.text])
        if self.split_marker not in text:
            raise ConfigError(
                f"{where}: field {self.text!r} has no data.split_marker={self.split_marker!r} between question "
                "and answer"
            )
        question, answer = (s.strip() for s in text.split(self.split_marker, 1))
        if self.question_marker and question.startswith(self.question_marker):
            question = question[len(self.question_marker) :].strip()
        return question, answer


def extract_pairs(
    records: list[Record], fields: Fields, on_bad_line: str
) -> tuple[list[tuple[str, str]], int]:
    """(question, answer) pairs and the number of records skipped (on_bad_line=skip)."""
    pairs, skipped = [], 0
    for where, record in records:
        try:
            pairs.append(fields.pair(where, record))
        except ConfigError as e:
            if on_bad_line == "stop":
                raise ConfigError(f"{e}: fix the data or set data.on_bad_line=skip") from None
            skipped += 1
    if skipped:
        log.warning("skipped %d records without a question and an answer (data.on_bad_line=skip)", skipped)
    return pairs, skipped


# ---------------------------------------------------------------- tokens, masks, lengths


@dataclass(frozen=True)
class Template:
    """row = question_prefix + q + question_suffix | answer_prefix + a + answer_suffix + end-of-text."""

    question_prefix: str = "QUESTION: "
    question_suffix: str = " ANSWER:"
    answer_prefix: str = " "
    answer_suffix: str = "."

    def question(self, q: str) -> str:
        return f"{self.question_prefix}{q}{self.question_suffix}"

    def answer(self, a: str) -> str:
        return f"{self.answer_prefix}{a}{self.answer_suffix}"


@dataclass
class Row:
    """One training row: its token ids and how many of them are the question part."""

    ids: torch.Tensor
    n_prompt: int


@dataclass
class Encoded:
    rows: list[Row]
    truncated: int = 0
    dropped: int = 0
    question_too_long: int = 0  # dropped because the question part alone leaves no room for an answer


def encode_pairs(
    pairs: list[tuple[str, str]], template: Template, max_length: int, policy: str = "truncate"
) -> Encoded:
    """Token rows of `pairs`, at most `max_length` tokens each (end-of-text included).

    A longer row keeps its whole question and loses the end of its answer (policy truncate; the end-of-text
    goes too, so the model is never taught to stop mid-answer) or is dropped (policy drop). A question part
    that leaves no room for one answer token is dropped under both policies.
    """
    enc = gpt2_encoding()
    questions = enc.encode_ordinary_batch([template.question(q) for q, _ in pairs])
    answers = enc.encode_ordinary_batch([template.answer(a) for _, a in pairs])
    out = Encoded(rows=[])
    for q_ids, a_ids in zip(questions, answers, strict=True):
        ids = q_ids + a_ids + [EOT_ID]
        if len(q_ids) + 1 > max_length:
            out.dropped += 1
            out.question_too_long += 1
            continue
        if len(ids) > max_length:
            if policy == "drop":
                out.dropped += 1
                continue
            ids = ids[:max_length]
            out.truncated += 1
        out.rows.append(Row(torch.tensor(ids, dtype=torch.long), len(q_ids)))
    return out


def pad_batch(rows: list[Row], mask_prompt: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) padded on the right to the longest row: x with end-of-text, y with IGNORE_INDEX.

    y[j] is the token after x[j]; with `mask_prompt` only the targets from the first answer token on
    (answer, suffix, end-of-text) keep their label.
    """
    length = max(len(r.ids) for r in rows) - 1
    x = torch.full((len(rows), length), EOT_ID, dtype=torch.long)
    y = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.ids) - 1
        x[i, :n], y[i, :n] = row.ids[:-1], row.ids[1:]
        if mask_prompt:
            y[i, : row.n_prompt - 1] = IGNORE_INDEX
    return x, y


def length_stats(counts: list[int]) -> dict[str, float]:
    """count, mean, median, 90th and 99th percentile (linear interpolation) and max of token counts."""
    if not counts:
        return {"count": 0}
    t = torch.tensor(counts, dtype=torch.float64)
    p50, p90, p99 = torch.quantile(t, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {
        "count": len(counts),
        "mean": round(t.mean().item(), 2),
        "median": p50,
        "p90": round(p90, 2),
        "p99": round(p99, 2),
        "max": int(t.max().item()),
    }


def token_counts(texts: list[str]) -> list[int]:
    return [len(ids) for ids in gpt2_encoding().encode_ordinary_batch(texts)]


# ---------------------------------------------------------------- batches


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


# ---------------------------------------------------------------- the data module


class InstructPairs(L.LightningDataModule):
    """Question/answer pairs from JSON lines, JSON, CSV or a Hugging Face dataset, as masked (x, y) batches.

    Training pairs come from `train_file` (or the dataset's train split); test pairs from `test_file`, the
    test split, or else a seeded `test_fraction` of the training pairs. `val_pairs` fixed test pairs give
    the test loss and the probes' held-out loss. At setup the token lengths of questions and answers, and
    how many rows the `max_length` policy cut or dropped, are logged, kept for metrics.json (`metrics()`)
    and written to `out_dir` (lengths.json, lengths.png).
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
        (train, test), skipped = self._load_pairs()
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

    def _load_pairs(self) -> tuple[tuple[list[tuple[str, str]], list[tuple[str, str]]], int]:
        """((train pairs, test pairs), records skipped)."""
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
        if test is None:  # no test file: hold out a seeded fraction of the training pairs
            g = torch.Generator().manual_seed(derive_seed(h.seed, 0, "instruct-split"))
            order = torch.randperm(len(train), generator=g).tolist()
            n_test = max(1, round(len(train) * h.test_fraction))
            if n_test >= len(train):
                raise ConfigError(
                    f"data.test_fraction={h.test_fraction} leaves no training pairs of {len(train)}"
                )
            test = [train[i] for i in sorted(order[:n_test])]
            train = [train[i] for i in sorted(order[n_test:])]
        return (train, test), skipped

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
            "truncated": {part: e.truncated for part, e in encoded.items()},
            "dropped": {part: e.dropped for part, e in encoded.items()},
            "question_too_long": {part: e.question_too_long for part, e in encoded.items()},
            "skipped_records": skipped,
        }

    def _report(self) -> None:
        """Log the length statistics; write lengths.json and lengths.png to out_dir."""
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
        if not self.hparams.out_dir:
            return
        from gptft.report.figures import length_histogram_figure, png_bytes

        out = Path(self.hparams.out_dir)
        atomic_write_json(out / "lengths.json", s)
        fig = length_histogram_figure(self._raw_counts, title=f"Token lengths: {s['source']} (train)")
        atomic_write_bytes(out / "lengths.png", png_bytes(fig))
        import matplotlib.pyplot as plt

        plt.close(fig)

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
