"""Reading question/answer records: JSON lines, JSON or CSV files found offline first, or a Hugging Face dataset;
then each record's (question, answer) by its fields."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptft.errors import ConfigError
from gptft.text.corpus import read_text, shared_data_dirs

log = logging.getLogger(__name__)

OFFLINE_CHOICES = "data=gsm8k or data=dolly_open_qa (offline copies), or data.train_file=FILE"
Record = tuple[str, dict[str, Any]]  # (where it came from, e.g. "file.jsonl line 3"; the fields)


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
    from gptft.models.build import hub_unreachable  # the same ≤ 3 s reachability check as for weights

    why = hub_unreachable()
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
