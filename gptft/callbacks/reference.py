"""The forgetting probe: what training did to the model on a text it never trained on.

Before the first step and after the last, on fixed windows of a reference text (by default another offline book
than the training one):
- the held-out next-token loss and its perplexity: forgetting = reference loss after − before;
- the mean per-token KL(base ‖ tuned) between the starting model's and the trained model's next-token
  distributions, which shows drift even where the loss does not move.

The KL needs the starting model's distributions at the end, without a second model on the device: the probe
keeps the full-vocabulary log-probabilities of the first `kl_tokens` positions of the reference windows on the
host (computed in fp32 with autocast off, whatever the training precision; 512 positions × 50,257 × 4 B = 103 MB). They are the callback's checkpoint state, so a resumed
run still has them (the checkpoint grows by that much; `kl_tokens` sets it, 0 turns the KL off).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from gptft.callbacks.before_after import BeforeAfter
from gptft.errors import ConfigError
from gptft.text.corpus import load_book_text, load_book_tokens, read_text, strip_gutenberg

log = logging.getLogger(__name__)

SETTING = "eval.reference"  # the text; the probe's other settings are callbacks.reference.*
BOOKS = (2701, 829)  # the defaults, in order of preference: Moby Dick, then Gulliver's Travels


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_book_id(spec: Any) -> bool:
    return isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit())


class ReferenceProbe(BeforeAfter):
    """`ref/loss`, `ref/ppl` (before and after) and `ref/kl` (after) on `windows` fixed windows of `text`.

    text: a Gutenberg id, a text file, or a list of them (windows spread over all, never across two); null: Moby
    Dick (2701), or Gulliver's Travels (829) when the run trains on Moby Dick. The training text itself is refused.
    The loss is the task's own causal-LM loss (`CausalLM.compute_loss`), whatever the task trains on: the KL
    study's own loss is a KL to its target, but what it forgets is measured in the same units as any other run.
    """

    def __init__(
        self,
        text: int | str | Sequence[int | str] | None = None,
        windows: int = 32,
        seq_len: int = 256,
        batch_size: int = 16,
        kl_tokens: int = 512,
        data_dir: str = "data",
        download: bool = True,
    ):
        super().__init__()
        self.windows, self.seq_len, self.batch_size, self.kl_tokens = windows, seq_len, batch_size, kl_tokens
        self.data_dir, self.download = Path(data_dir), download
        self.specs = [text] if text is None or isinstance(text, (int, str)) else list(text)
        self.sources: list[str] = []
        self.texts: list[str] = []
        self.info: dict[str, Any] = {}
        self._base: list[torch.Tensor] = []  # the starting model's log-probabilities, per KL window (host)
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # gptft.run has resolved the text before the model loaded; from Python, it happens here, still before the
        # first step (a ConfigError stops it with one line). The training text is the one the data module read (a
        # book's text; question/answer data have none).
        if not self.texts:
            self.resolve(getattr(trainer.datamodule, "text", None))  # any LightningDataModule
        self._prepare()

    def state_dict(self) -> dict[str, Any]:
        # The starting model's log-probabilities: a resumed run's ref_kl needs them.
        return {**super().state_dict(), "base": self._base}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._base = list(state_dict.get("base", []))

    def resolve(self, train_text: str | None = None) -> list[str]:
        """Find and read the reference texts, refusing the training text; return their names."""
        self.sources, self.texts = self._resolve(self.specs, train_text, self.download)
        return self.sources

    def _resolve(
        self, specs: list[Any], train_text: str | None, download: bool
    ) -> tuple[list[str], list[str]]:
        """(a name per reference text, its text)."""
        if specs == [None]:  # the default: the first of the books that is not the training text
            for book in BOOKS:
                text = self._read(book, download)
                if train_text is None or _digest(text) != _digest(train_text):
                    return [f"pg{book}"], [text]
            raise ConfigError(f"{SETTING}=null: the run trains on every default book: give another text")
        sources, texts = [], []
        for spec in specs:
            text = self._read(spec, download)
            if not text.strip():
                raise ConfigError(f"{SETTING}={spec} is empty: give a text with something in it")
            if train_text is not None and _digest(text) == _digest(train_text):
                raise ConfigError(
                    f"{SETTING}={spec} is the training text itself: forgetting is measured on a text the run "
                    "does not train on (e.g. 2701 when training on 829)"
                )
            sources.append(f"pg{int(spec)}" if _is_book_id(spec) else str(spec))
            texts.append(text)
        return sources, texts

    def _read(self, spec: int | str, download: bool) -> str:
        """The text of a Gutenberg id (offline copy first, as for the training book) or of a text file."""
        if _is_book_id(spec):
            try:
                return load_book_text(int(spec), None, self.data_dir, download=download)
            except ConfigError:
                raise ConfigError(
                    f"{SETTING}={spec}: no local copy of book {spec} ({self.data_dir}/pg{spec}.txt or "
                    f"../shared/data/*/pg{spec}.txt) and no download: put it there, or give another id or a text file"
                ) from None
        path = Path(str(spec)).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"{SETTING}={spec} does not exist: give a text file, a Gutenberg id (e.g. 2701), or a list of them"
            )
        return strip_gutenberg(read_text(path, SETTING))

    def _prepare(self) -> None:
        """The fixed windows: `windows` start positions spread evenly over the texts (one segment per text)."""
        if self._x is not None:
            return
        if not self.texts:  # used without a trainer's setup (from Python)
            self.resolve()
        from gptft.data.windows import WindowSampler

        ids = [load_book_tokens(t, self.data_dir / "cache") for t in self.texts]
        segments, start = [], 0
        for part in ids:
            segments.append((start, start + len(part)))
            start += len(part)
        sampler = WindowSampler(torch.cat(ids), segments, self.seq_len, self.batch_size, seed=0)
        if sampler.n_starts == 0:
            raise ConfigError(
                f"{SETTING}={self.sources}: no text is longer than a window of {self.seq_len} tokens: give a longer text"
            )
        starts = sampler.spread_starts(self.windows)
        self._x, self._y = sampler.windows(starts)
        kl_windows = min(len(starts), math.ceil(self.kl_tokens / self.seq_len)) if self.kl_tokens else 0
        self.info = {
            "texts": self.sources,
            "windows": len(starts),
            "seq_len": self.seq_len,
            "starts": starts.tolist(),
            "kl_positions": min(self.kl_tokens, kl_windows * self.seq_len),
        }

    def _kl_slices(self) -> list[tuple[int, int]]:
        """(window, positions) whose distributions enter the KL: whole windows, the last one cut at kl_tokens."""
        left, out = self.info["kl_positions"], []
        for w in range(len(self._x)):
            if left <= 0:
                break
            out.append((w, min(left, self.seq_len)))
            left -= self.seq_len
        return out

    def prepare(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        self._prepare()

    def settings(self, trainer: L.Trainer) -> dict[str, Any]:
        return {"eval.reference": self.sources, "callbacks.reference.windows": self.windows}

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), **({"reference": self.info} if self.info else {})}

    @torch.no_grad()
    def probe(self, when: str, trainer: L.Trainer, task: L.LightningModule) -> dict[str, float]:
        # Every rank runs it (under trainer=fsdp each forward gathers weights from all ranks); the windows are the
        # same everywhere, so are the results; rank 0 logs them.
        was_training = task.training
        task.eval()
        # In fp32 whatever the training precision: this is evaluation, and under bf16 autocast the KL of a small
        # drift reads bf16's rounding (a 1e-6 relative weight change: 6.5e-7 under bf16, 5e-13 in fp32).
        with torch.autocast(task.device.type, enabled=False):
            loss = self.loss(task)
            kl = self.kl(task, keep=when == "before") if self.info["kl_positions"] else None
        task.train(was_training)
        result = {"ref_loss": loss, "ref_ppl": math.exp(min(loss, 50.0))}
        if when == "after" and kl is not None:
            result["ref_kl"] = kl
        self.results[when] = result
        if trainer.is_global_zero:
            # Lightning logs step k's metrics at index k - 1 (the batch they follow); "before" sits at 0.
            step = max(trainer.global_step - 1, 0)
            for logger in trainer.loggers:
                logger.log_metrics({f"ref/{k[4:]}": v for k, v in result.items()}, step=step)
            log.info(
                "%s training, reference %s: %s",
                when, "+".join(self.sources), ", ".join(f"{k} {v:.4g}" for k, v in result.items()),
            )  # fmt: skip
        return result

    def _batches(self, task: L.LightningModule, count: int | None = None):
        n = len(self._x) if count is None else count
        for i in range(0, n, self.batch_size):
            j = min(i + self.batch_size, n)
            yield i, self._x[i:j].to(task.device), self._y[i:j].to(task.device)

    def loss(self, task: L.LightningModule) -> float:
        """Mean next-token loss over every position of the windows, through the task's causal-LM loss."""
        from gptft.tasks.causal_lm import CausalLM

        total = torch.zeros((), device=task.device)
        for _, x, y in self._batches(task):
            total += CausalLM.compute_loss(task, (x, y))[0].float() * y.numel()  # a mean: weigh by positions
        return (total / self._y.numel()).item()

    def kl(self, task: L.LightningModule, keep: bool) -> float | None:
        """Mean KL(base ‖ now) per position over the KL slices; `keep`: remember now as the base."""
        slices = self._kl_slices()
        if keep:
            self._base = [
                lp[:, :n].cpu() for lp, (_, n) in zip(self._log_probs(task, slices), slices, strict=True)
            ]
            return 0.0
        if not self._base:  # resumed from a checkpoint written before the base was kept (an older gptft)
            log.warning("no ref_kl: the checkpoint this run resumed from holds no starting distributions")
            return None
        total, count = 0.0, 0
        for lp, kept, (_, n) in zip(self._log_probs(task, slices), self._base, slices, strict=True):
            p = kept.to(lp.device)
            # KL(base ‖ now) = Σ_v p_base (log p_base − log p_now), per position; 0·log 0 counts as 0.
            total += F.kl_div(lp[:, :n], p, log_target=True, reduction="sum").item()
            count += n
        return total / count

    def _log_probs(self, task: L.LightningModule, slices: list[tuple[int, int]]) -> list[torch.Tensor]:
        """fp32 log-probabilities (1 × T × V) of each KL window, one window at a time (bounded memory)."""
        out = []
        for w, _ in slices:
            logits = task.logits(self._x[w : w + 1].to(task.device))
            out.append(F.log_softmax(logits.float(), dim=-1))
        return out
