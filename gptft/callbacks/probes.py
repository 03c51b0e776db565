"""Before/after probes: what the model does before its first step and after its last."""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from gptft.callbacks.before_after import BeforeAfter
from gptft.metrics import NgramIndex, distinct_n, share_in, top_token_ids
from gptft.models.generate import sample_tokens
from gptft.text.tokenizer import EOT_ID, VOCAB_SIZE, gpt2_encoding
from gptft.utils.io import atomic_write_text
from gptft.utils.seeding import derive_seed

log = logging.getLogger(__name__)


def spread(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation over generation repeats; one repeat measures no spread: std None."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "values": values,
    }


def _shown(m: dict[str, Any]) -> str:
    return f"{m['mean']:.3g}" + ("" if m["std"] is None else f" ± {m['std']:.2g}")


# One repeat of free generation: its prompts (one token each) and what the model generated after them.
Drawn = tuple[torch.Tensor, torch.Tensor]


class Probes(BeforeAfter):
    """Measure the model at fit start ("before") and fit end ("after").

    - held-out loss and perplexity on the fixed test windows;
    - samples continuing `prompts` (the same seed each time);
    - free generation, repeated `repeats` times (each its own seed): `free_prompts` prompts of one uniformly random token,
      each continued by sampling; its style ratio (% of generated tokens among the book's `style_tokens` most
      frequent ids, ties to the lower id: the data's `text_token_ids()`, for question/answer data the training
      rows), copy rate (share of generated `copy_ngram`-grams found verbatim in the training text,
      `train_token_ids()`: a book's training split) and distinct-1/2, as mean and spread over the repeats; plus,
      for every token set the task names in `probe_token_sets()` (the KL study's target ids), the share of
      generated tokens in it.

    Prompts and sampling depend only on (seed, repeat), so before and after, and model A and B of a
    paired study, see the same prompts. Results go to TensorBoard (`val/*`, `probe/*`, samples as text),
    `samples/<when>.txt` (the prompts' samples and the first repeat's free text), metrics.json under "before" and
    "after", and `samples/free_generation_<when>.json`: every repeat's prompt and generated ids, the style set's ids
    and the task's token sets, from which every measure can be computed again. One file per moment, like the text
    samples, so a resumed run (which measures no "before") keeps the first segment's.
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
        repeats: int = 3,
        free_prompts: int = 10,
        style_tokens: int = 100,
        copy_ngram: int = 8,
    ):
        super().__init__()
        self.prompts = list(prompts)
        self.out_dir = Path(out_dir)
        self.sampling = dict(
            max_new_tokens=max_new_tokens, top_k=top_k, temperature=temperature, ban_eot=ban_eot
        )
        self.seed, self.repeats, self.free_prompts = seed, repeats, free_prompts
        self.style_tokens, self.copy_ngram = style_tokens, copy_ngram
        self._top_ids: torch.Tensor | None = None
        self._ngrams: NgramIndex | None = None
        self._token_sets: dict[str, torch.Tensor] = {}  # the task's own sets, e.g. the KL target's ids
        self._held_out_text: dict[str, Any] | None = None

    def probe(self, when: str, trainer: L.Trainer, task: L.LightningModule) -> dict[str, Any]:
        # Every rank runs the model (under trainer=fsdp each forward gathers the weights from all ranks, so
        # a probe on rank 0 alone would wait forever); prompts and seeds are the same everywhere, so are the
        # results, and only rank 0 logs and writes them.
        self._index_training_text(trainer.datamodule)
        self._token_sets = task.probe_token_sets()
        with trainer.precision_plugin.forward_context():
            held_out = task.loss_metrics(task.evaluate(trainer.datamodule.val_dataloader()))
            samples = self.samples(task.model)
            measures, drawn = self.free_generation(task.model)
        result = {"step": trainer.global_step, **{f"val_{k}": v for k, v in held_out.items()}, **measures}
        self.results[when] = result
        if self._held_out_text is None:
            self._held_out_text = self._text_measures(trainer.datamodule.val_dataloader())
        if not trainer.is_global_zero:
            return result
        # Lightning logs step k's metrics at index k - 1 (the batch they follow); "before" sits at 0.
        step = max(trainer.global_step - 1, 0)
        scalars = {f"val/{k}": v for k, v in held_out.items()}
        scalars |= {f"probe/{name}": m["mean"] for name, m in measures.items()}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
        self._write_samples(when, samples + self._texts(drawn[:1]), trainer)
        if drawn:
            self._write_generated(when, trainer.global_step, drawn)
        held = ", ".join(f"val {k} {v:.4g}" for k, v in held_out.items())
        summary = ", ".join(f"{name} {_shown(m)}" for name, m in measures.items())
        log.info("%s training: %s; %s", when, held, summary)
        return result

    def _text_measures(self, held_out: Any) -> dict[str, Any]:
        """The style ratio of the held-out text itself (its labelled tokens: a book's test windows, the answers of
        question/answer pairs): what a model writing like the book scores, the baseline of the measure."""
        labels = torch.cat([batch[1].flatten() for batch in held_out])
        labels = labels[labels >= 0].cpu()  # masked prompts and padding carry -100
        return {"style_ratio": 100 * share_in(labels, self._top_ids), "tokens": labels.numel()}

    def metrics(self) -> dict[str, Any]:
        text = {"held_out_text": self._held_out_text} if self._held_out_text else {}
        return {**super().metrics(), **text}

    def settings(self, trainer: L.Trainer) -> dict[str, Any]:
        held_out = getattr(trainer.datamodule.val_dataloader(), "dataset", None)
        return {
            "eval.prompts": self.prompts,
            **{f"eval.{k}": v for k, v in self.sampling.items()},
            "eval.repeats": self.repeats,
            "eval.free_prompts": self.free_prompts,
            "eval.style_tokens": self.style_tokens,
            "eval.copy_ngram": self.copy_ngram,
            "eval.seed": self.seed,
            "held-out examples": len(held_out) if hasattr(held_out, "__len__") else None,
        }

    def _index_training_text(self, datamodule: L.LightningDataModule) -> None:
        if self._top_ids is None:
            self._top_ids = top_token_ids(datamodule.text_token_ids(), self.style_tokens)
            self._ngrams = NgramIndex(datamodule.train_token_ids(), self.copy_ngram)

    def samples(self, model: torch.nn.Module) -> list[tuple[str, str]]:
        """(prompt, continuation) for every text prompt, with the same seed each time."""
        enc = gpt2_encoding()
        out = []
        for i, prompt in enumerate(self.prompts):
            ids = torch.tensor([enc.encode_ordinary(prompt)])
            new = sample_tokens(model, ids, seed=self.seed + i, **self.sampling)[0].tolist()
            if EOT_ID in new:  # eval.ban_eot=false: the sample ended (shown with its end-of-text)
                new = new[: new.index(EOT_ID) + 1]
            out.append((prompt, enc.decode(new)))
        return out

    def measure(self, generated: torch.Tensor) -> dict[str, float]:
        """The measures of one seed's generated tokens (prompt excluded). Subclasses add their own."""
        return {
            "style_ratio": 100 * share_in(generated, self._top_ids),
            "copy_rate": self._ngrams.copy_rate(generated),
            "distinct_1": distinct_n(generated, 1),
            "distinct_2": distinct_n(generated, 2),
            **{name: share_in(generated, ids) for name, ids in self._token_sets.items()},
        }

    def free_generation(self, model: torch.nn.Module) -> tuple[dict[str, dict], list[Drawn]]:
        """Measures over `repeats` repeats of batched free generation, and each repeat's (prompts, generated)."""
        if self.repeats < 1 or self.free_prompts < 1:
            return {}, []
        per_seed: list[dict[str, float]] = []
        drawn: list[Drawn] = []
        for repeat in range(self.repeats):
            g = torch.Generator().manual_seed(derive_seed(self.seed, repeat, "free-prompts"))
            prompts = torch.randint(0, VOCAB_SIZE, (self.free_prompts, 1), generator=g)
            seed = derive_seed(self.seed, repeat, "free-sampling")
            # Always the course's fixed length (end-of-text banned), whatever eval.ban_eot says for the samples:
            # the measures are shares of a fixed number of tokens, comparable before/after and across runs.
            generated = sample_tokens(model, prompts, seed=seed, **{**self.sampling, "ban_eot": True}).cpu()
            per_seed.append(self.measure(generated))
            drawn.append((prompts, generated))
        measures = {name: spread([m[name] for m in per_seed]) for name in per_seed[0]}
        return measures, drawn

    @staticmethod
    def _texts(drawn: list[Drawn]) -> list[tuple[str, str]]:
        """(prompt, continuation) texts of the given repeats' rows."""
        enc = gpt2_encoding()
        return [
            (enc.decode(p.tolist()), enc.decode(t.tolist()))
            for prompts, generated in drawn
            for p, t in zip(prompts, generated, strict=True)
        ]

    def _write_generated(self, when: str, step: int, drawn: list[Drawn]) -> None:
        # Compact JSON: 3 repeats × 10 × 100 ids would take 6,000 lines indented.
        record = {
            "step": step,
            "style_ids": self._top_ids.tolist(),
            "copy_ngram": self.copy_ngram,
            "token_sets": {name: ids.tolist() for name, ids in self._token_sets.items()},
            "repeats": [{"prompt_ids": p.tolist(), "generated_ids": g.tolist()} for p, g in drawn],
        }
        atomic_write_text(self.out_dir / f"free_generation_{when}.json", json.dumps(record) + "\n")

    def _write_samples(self, when: str, samples: list[tuple[str, str]], trainer: L.Trainer) -> None:
        text = "\n\n".join(f"=== {prompt!r}\n{prompt}{continuation}" for prompt, continuation in samples)
        atomic_write_text(self.out_dir / f"{when}.txt", text + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # TensorBoard renders text as Markdown: indent it so line breaks survive.
                shown = "\n\n".join(
                    f"**{p!r}**\n\n" + "\n".join("    " + line for line in (p + c).splitlines())
                    for p, c in samples
                )
                logger.experiment.add_text(f"samples/{when}", shown, trainer.global_step)
