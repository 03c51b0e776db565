"""What gptft asks of a training data module, beside Lightning's own hooks."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class TrainData(L.LightningDataModule):
    """A LightningDataModule for gptft's tasks and probes.

    - `train_dataloader()` yields (x, y, step_tokens, step_digest) micro-batches from a step sampler (gptft.data.windows:
      `step_loader`), so a batch is a pure function of (seed, step) and the step's labelled tokens are known;
    - `val_dataloader()` yields fixed (x, y) batches, y = IGNORE_INDEX where nothing is to be learned;
    - `train_token_ids()`: every token id of the training text, which the copy rate compares generated text with;
    - `text_token_ids()`: every token id of the whole text the module read (a book: both splits), whose most
      frequent ids are the style ratio's set; by default the training text (question/answer pairs have no book);
    - `metrics()`: what the data measured at setup, merged into metrics.json (default: nothing);
    - `text`: the training text as read, after setup (None where there is no one text, e.g. question/answer
      pairs); the forgetting probe refuses it as its reference.
    """

    text: str | None = None

    def train_token_ids(self) -> torch.Tensor:
        raise NotImplementedError

    def text_token_ids(self) -> torch.Tensor:
        return self.train_token_ids()

    def metrics(self) -> dict[str, Any]:
        return {}
