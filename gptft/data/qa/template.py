"""The prompt template: how a question and an answer become the text of one training row."""

from __future__ import annotations

from dataclasses import dataclass


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
