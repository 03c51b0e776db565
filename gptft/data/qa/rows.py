"""Token rows and the loss mask: where a row's labels are built.

A row is the template's question part then its answer part then end-of-text, tokenised piece by piece so the
boundary is exact. In a batch (x, y), y is x shifted by one and holds IGNORE_INDEX on the question part (with
`mask_prompt`) and on padding, so a loss counts the answer tokens only. `data.max_length` is applied here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gptft.data.qa.template import Template
from gptft.text.tokenizer import EOT_ID, IGNORE_INDEX, gpt2_encoding


@dataclass
class Row:
    """One training row: its token ids and how many of them are the question part."""

    ids: torch.Tensor
    n_prompt: int


@dataclass
class Encoded:
    rows: list[Row]
    kept: list[int] = field(default_factory=list)  # each row's position among the pairs given
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
    for i, (q_ids, a_ids) in enumerate(zip(questions, answers, strict=True)):
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
        out.kept.append(i)
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
