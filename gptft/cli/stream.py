"""Text on a terminal as it is generated."""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO, Any

from transformers.generation.streamers import BaseStreamer

from gptft.callbacks.exact_match import visible_text


class TextStream(BaseStreamer):
    """Writes the generated text to `file` as generate() produces it (batch of one).

    transformers' TextStreamer needs one of its own tokenizers and cannot hold back text that may turn out to be
    an end marker; this one decodes with our tiktoken encoding and never shows what the final text leaves out: a
    character whose bytes are still arriving, end-of-text, or the start of an end marker. What it writes in all
    is exactly `visible_text(ids, markers)` (`lstrip`: without its leading whitespace).
    """

    def __init__(self, file: IO[str], markers: Sequence[str] = (), lstrip: bool = False):
        self.file, self.markers, self.lstrip = file, list(markers), lstrip
        self.ids: list[int] = []
        self.shown = 0
        self.writes = 0
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        self.ids.extend(value.flatten().tolist())
        text = visible_text(self.ids, self.markers).rstrip("\ufffd")
        self._write(text[: len(text) - self._held_back(text)])

    def end(self) -> None:
        self._write(visible_text(self.ids, self.markers))

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that could be the start of an end marker."""
        return max((k for m in self.markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)

    def _write(self, text: str) -> None:
        text = text.lstrip() if self.lstrip else text  # an answer's leading space (the template's)
        if len(text) > self.shown:
            self.file.write(text[self.shown :])
            self.file.flush()
            self.shown = len(text)
            self.writes += 1
