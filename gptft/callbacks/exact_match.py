"""Exact match of greedy answers to held-out questions, before and after instruction tuning.

The answering itself (`answer_questions`) is shared with `gptft-evaluate --qa`, so a run's number and the
command's number come from the same code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from gptft.callbacks.before_after import BeforeAfter
from gptft.data.instruct import InstructPairs
from gptft.data.qa.template import Template
from gptft.errors import ConfigError
from gptft.metrics.qa import exact_match
from gptft.models.build import context_length
from gptft.models.generate import sample_tokens
from gptft.text.tokenizer import EOT_ID, gpt2_encoding
from gptft.utils.io import atomic_write_text

log = logging.getLogger(__name__)


def end_markers(template: Template) -> list[str]:
    """Where an answer ends besides end-of-text: the start of the next question (e.g. 'QUESTION:')."""
    marker = template.question_prefix.strip()
    return [marker] if marker else []


def visible_text(new_ids: list[int], markers: list[str]) -> str:
    """The text of generated ids up to end-of-text and up to the first end marker (neither included)."""
    if EOT_ID in new_ids:
        new_ids = new_ids[: new_ids.index(EOT_ID)]
    text = gpt2_encoding().decode(new_ids)
    for marker in markers:
        text = text.split(marker, 1)[0]
    return text


def answer_questions(
    model: torch.nn.Module, template: Template, questions: list[str], max_new_tokens: int = 64
) -> list[str]:
    """Greedy answers, one question at a time (no padding, so a batch never changes an answer), each the
    text after the template's question part, up to end-of-text or the next question marker."""
    enc, markers = gpt2_encoding(), end_markers(template)
    context = context_length(model.config)
    answers = []
    for question in questions:
        ids = enc.encode_ordinary(template.question(question))
        budget = min(max_new_tokens, context - len(ids))  # a long question leaves less room (none: no answer)
        if budget < 1:
            answers.append("")
            continue
        new = sample_tokens(
            model, torch.tensor([ids]), budget, greedy=True, ban_eot=False, stop_strings=markers
        )[0].tolist()
        answers.append(visible_text(new, markers))
    return answers


def held_out_pairs(datamodule: Any, n: int) -> list[tuple[str, str]]:
    """The first `n` test pairs of an InstructPairs module whose rows are whole (end-of-text kept), decoded
    back to (question, answer) text: BPE decoding is lossless and the two parts were encoded apart."""
    template: Template = datamodule.template
    enc, pairs = gpt2_encoding(), []
    for row in datamodule.test_rows:
        ids = row.ids.tolist()
        if ids[-1] != EOT_ID:  # truncated at data.max_length: its reference answer is cut
            continue
        question = enc.decode(ids[: row.n_prompt])[len(template.question_prefix) :]
        answer = enc.decode(ids[row.n_prompt : -1])[len(template.answer_prefix) :]
        question = question[: len(question) - len(template.question_suffix)]
        pairs.append((question, answer[: len(answer) - len(template.answer_suffix)]))
        if len(pairs) == n:
            break
    return pairs


class ExactMatch(BeforeAfter):
    """Greedy answers to the first `questions` whole held-out pairs, scored by exact match
    (gptft.metrics.qa: GSM8K's final number; other data's answers as normalised text), at fit start ("before") and
    fit end ("after").

    Results: metrics.json `before.exact_match` / `after.exact_match`, TensorBoard `probe/exact_match` (at the
    steps the Probes use), and the answers in `<out_dir>/exact_match_<when>.jsonl`.
    """

    def __init__(self, out_dir: str, questions: int = 16, max_new_tokens: int = 64):
        super().__init__()
        for name, value in (("questions", questions), ("max_new_tokens", max_new_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"callbacks.exact_match.{name}={value} must be a whole number ≥ 1")
        self.out_dir = Path(out_dir)
        self.questions, self.max_new_tokens = questions, max_new_tokens

    def settings(self, trainer: L.Trainer) -> dict[str, Any]:
        return {
            "callbacks.exact_match.questions": self.questions,
            "callbacks.exact_match.max_new_tokens": self.max_new_tokens,
        }

    def probe(self, when: str, trainer: L.Trainer, task: L.LightningModule) -> float:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, InstructPairs):
            raise ConfigError(
                "callbacks.exact_match needs question/answer data (e.g. data=gsm8k): remove it with "
                "~callbacks.exact_match"
            )
        pairs = held_out_pairs(datamodule, self.questions)
        if not pairs:  # a measure is missing, the run goes on
            log.warning(
                "exact match not measured: no held-out pair fits data.max_length=%s whole (raise it)",
                datamodule.hparams.max_length,
            )
            return float("nan")
        # Every rank answers (under trainer=fsdp each forward gathers weights from all of them); rank 0 reports.
        with trainer.precision_plugin.forward_context():
            answers = answer_questions(
                task.model, datamodule.template, [q for q, _ in pairs], self.max_new_tokens
            )
        hits = [exact_match(answer, reference) for answer, (_, reference) in zip(answers, pairs, strict=True)]
        score = sum(hits) / len(hits)
        self.results[when] = {"exact_match": score}
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # at the step Probes logs its before/after measures
                logger.log_metrics({"probe/exact_match": score}, step=max(trainer.global_step - 1, 0))
            lines = [
                json.dumps({"question": q, "reference": r, "answer": a, "correct": h})
                for (q, r), a, h in zip(pairs, answers, hits, strict=True)
            ]
            atomic_write_text(self.out_dir / f"exact_match_{when}.jsonl", "\n".join(lines) + "\n")
            log.info("%s training: exact match %d/%d = %.3f", when, sum(hits), len(hits), score)
        return score
