"""Before/after probes: what the model does before its first step and after its last."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from gptft.models.generate import sample_tokens
from gptft.text.tokenizer import gpt2_encoding
from gptft.utils.io import atomic_write_text

log = logging.getLogger(__name__)


class Probes(L.Callback):
    """Held-out loss and perplexity, and text samples from fixed prompts, at fit start and fit end.

    Results land in TensorBoard (`val/*` at the step they were taken, samples as text), in `samples/`,
    and in metrics.json under "before" and "after".
    """

    def __init__(
        self,
        prompts: list[str],
        out_dir: str,
        max_new_tokens: int = 100,
        top_k: int = 50,
        temperature: float = 1.0,
        seed: int = 0,
        ban_eot: bool = True,
    ):
        self.prompts = list(prompts)
        self.out_dir = Path(out_dir)
        self.sampling = dict(
            max_new_tokens=max_new_tokens, top_k=top_k, temperature=temperature, ban_eot=ban_eot
        )
        self.seed = seed
        self.results: dict[str, dict[str, Any]] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:  # a resumed run already has its "before"
            self.probe("before", trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.probe("after", trainer, pl_module)

    def metrics(self) -> dict[str, Any]:
        return self.results

    def probe(self, when: str, trainer: L.Trainer, task: L.LightningModule) -> dict[str, Any]:
        if not trainer.is_global_zero:
            return {}
        with trainer.precision_plugin.forward_context():
            loss = task.evaluate(trainer.datamodule.val_dataloader())
            samples = self.samples(task.model)
        result = {"step": trainer.global_step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        # Lightning logs step k's metrics at index k - 1 (the batch they follow); "before" sits at 0.
        step = max(trainer.global_step - 1, 0)
        for logger in trainer.loggers:
            logger.log_metrics({"val/loss": loss, "val/ppl": result["val_ppl"]}, step=step)
        self._write_samples(when, samples, trainer)
        self.results[when] = result
        log.info("%s training: val loss %.4f, ppl %.1f", when, loss, result["val_ppl"])
        return result

    def samples(self, model: torch.nn.Module) -> list[tuple[str, str]]:
        """(prompt, continuation) for every prompt, with the same seed each time."""
        enc = gpt2_encoding()
        out = []
        for i, prompt in enumerate(self.prompts):
            ids = torch.tensor([enc.encode_ordinary(prompt)])
            new = sample_tokens(model, ids, seed=self.seed + i, **self.sampling)[0]
            out.append((prompt, enc.decode(new.tolist())))
        return out

    def _write_samples(self, when: str, samples: list[tuple[str, str]], trainer: L.Trainer) -> None:
        text = "\n\n".join(f"=== {prompt}\n{prompt}{continuation}" for prompt, continuation in samples)
        atomic_write_text(self.out_dir / f"{when}.txt", text + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # TensorBoard renders text as Markdown: indent it so line breaks survive.
                shown = "\n\n".join(
                    f"**{p}**\n\n" + "\n".join("    " + line for line in (p + c).splitlines())
                    for p, c in samples
                )
                logger.experiment.add_text(f"samples/{when}", shown, trainer.global_step)
