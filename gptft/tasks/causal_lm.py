"""The causal-LM task: next-token cross-entropy on (x, y) windows, AdamW, optional warmup and schedule.

Subclasses change what is learned by overriding `compute_loss`; logging, validation and the optimizer
stay here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from gptft.errors import ConfigError
from gptft.models.chunked_loss import chunked_linear_cross_entropy
from gptft.models.sharding import is_sharded, shard_model
from gptft.text.tokenizer import IGNORE_INDEX
from gptft.utils.seeding import derive_seed


def lr_lambda(
    schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """Multiplier of the base lr at each step: linear warmup, then constant or cosine decay to min_lr_ratio.

    Not transformers' get_*_schedule_with_warmup: their warmup starts at step/warmup, so the first step trains
    at lr 0 (a wasted step); this one starts at (step + 1)/warmup, as nanoGPT does. After the warmup the two agree.
    """
    if schedule not in ("constant", "cosine"):
        raise ConfigError(f"schedule.name={schedule} is unknown: use constant or cosine")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class CausalLM(L.LightningModule):
    """Train a Hugging Face causal LM on next-token prediction."""

    def __init__(
        self,
        model: PreTrainedModel,
        optim: Mapping[str, Any],
        schedule: Mapping[str, Any],
        loss_chunk: int = 0,
        seed: int = 0,
        no_decay: Sequence[str] = (),
    ):
        """`no_decay`: names of the model's tensors trained only in part (freezing's qkv_parts), which must get
        no weight decay: decay would move their frozen part."""
        super().__init__()
        self.model = model
        self.no_decay = set(no_decay)
        self.save_hyperparameters(
            {"optim": dict(optim), "schedule": dict(schedule), "loss_chunk": loss_chunk, "seed": seed}
        )
        head = model.get_output_embeddings()
        # The chunked loss needs a bias-free linear head (GPT-2, GPT-Neo); others keep the standard path.
        self.loss_chunk = loss_chunk if isinstance(head, torch.nn.Linear) and head.bias is None else 0
        # Validation: a mean over the labelled tokens, so batches of masked rows of different lengths (question/
        # answer pairs) weigh by what they hold; synced over the ranks when computed.
        # nan_strategy=nan: a nan loss must show, not be dropped. Not "disable": torchmetrics 1.9 then replaces
        # the weights by ones (a mean of batch means, which depends on the batching); a float strategy keeps them.
        self.val_mean = MeanMetric(nan_strategy=float("nan"))
        self._step_sum = torch.zeros(())
        # The loss of the latest optimizer step over all its micro-batches and ranks (a detached device tensor):
        # what train/loss shows and metrics.json keeps.
        self.step_loss: torch.Tensor | None = None

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def compute_loss(
        self, batch: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, extra detached scalars logged as train/<name>) of the batch's (x, y). Here: mean next-token
        cross-entropy over the labels that are not IGNORE_INDEX. A subclass's loss must be a mean over the
        labelled positions too, so training can weigh micro-batches by the labelled tokens they hold."""
        x, y = batch[0], batch[1]
        if self.loss_chunk:  # never hold all B × T × V logits (nor, in validation, their log-softmax)
            # Through the model's own forward (head on the last position only, one B × V row) rather than
            # model.base_model: under trainer=fsdp the root unit gathers the embeddings and the tied head in
            # that forward's hooks and keeps them gathered until backward, where it reduces their gradients.
            out = self.model(input_ids=x, use_cache=False, output_hidden_states=-1, logits_to_keep=1)
            hidden = out.hidden_states[-1]  # after the final norm (HF ties it to last_hidden_state)
            weight = self.model.get_output_embeddings().weight
            return chunked_linear_cross_entropy(hidden, weight, y, self.loss_chunk, IGNORE_INDEX), {}
        logits = self.logits(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX), {}

    def loss_metrics(self, loss: float) -> dict[str, float]:
        """What a held-out loss value means for this task (the val/ tags and the probes' numbers)."""
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}

    def probe_token_sets(self) -> dict[str, torch.Tensor]:
        """Token-id sets whose share of generated tokens the probes should report (none for plain LM)."""
        return {}

    def configure_model(self) -> None:
        # Lightning calls this under every strategy; only trainer=fsdp (FSDP2Strategy) gives a device mesh.
        if self.device_mesh is not None and not is_sharded(self.model):
            shard_model(self.model, self.device_mesh["data_parallel"])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout draws from the global RNG. Seeding it from (seed, micro-step, rank) makes its masks, like
        # the batches, a pure function of the step: a resumed run draws exactly what the uninterrupted run
        # drew, with no RNG state to save, and DDP ranks draw different masks.
        accumulate = self.trainer.accumulate_grad_batches
        micro_step = self.trainer.global_step * accumulate + batch_idx % accumulate
        torch.manual_seed(derive_seed(self.hparams.seed, micro_step, f"dropout-rank{self.global_rank}"))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor, int, int], batch_idx: int) -> torch.Tensor:
        """One micro-batch (x, y, step_tokens, step_digest). The optimizer step's loss is the mean over every labelled token
        of all its micro-batches on all ranks, step_tokens of them (counted by the data loader): exactly the
        loss of one batch holding them all, however the rows are masked, padded or split."""
        x, y, step_tokens = batch[:3]
        loss, extras = self.compute_loss(batch)
        share = loss * (y != IGNORE_INDEX).sum() / max(step_tokens, 1)  # this micro-batch's part of the mean
        accumulate, world = self.trainer.accumulate_grad_batches, self.trainer.world_size
        first, last = batch_idx % accumulate == 0, (batch_idx + 1) % accumulate == 0
        self._step_sum = share.detach().float() + (0 if first else self._step_sum)
        if last:
            step_loss = self._step_sum
            if world > 1:  # one scalar all-reduce per step: the step's loss over all ranks
                step_loss = self.trainer.strategy.reduce(step_loss, reduce_op="sum")
            self.step_loss = step_loss
            self.log("train/loss", step_loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=x.size(0))
            for name, value in extras.items():
                self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=x.size(0))
        # Lightning divides what training_step returns by `accumulate`, and DDP/FSDP average gradients over the
        # ranks: undo both, so the step's gradient is that of Σ (token losses) / step_tokens.
        return share * accumulate * world

    # Lightning's loop and the probes outside it (`evaluate`) share one computation: the MeanMetric.
    def on_validation_epoch_start(self) -> None:
        self.val_mean.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        n = (batch[1] != IGNORE_INDEX).sum()
        self.val_mean.update(self.compute_loss(batch)[0].detach().float(), weight=n)

    def val_loss(self) -> float:
        return self.val_mean.compute().item()

    def on_validation_epoch_end(self) -> None:
        metrics = self.loss_metrics(self.val_loss())
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=True)

    @torch.no_grad()
    def evaluate(self, dataloader: Any) -> float:
        """Mean loss over a dataloader, outside Lightning's loops (before/after probes); restores train mode."""
        was_training = self.training
        self.eval()
        self.on_validation_epoch_start()
        for i, batch in enumerate(dataloader):
            self.validation_step(tuple(t.to(self.device, non_blocking=True) for t in batch), i)
        self.train(was_training)
        return self.val_loss()

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales in its own step (fused
        AdamW, gptft's default), as its fp16 GradScaler has not unscaled the gradients yet at this point. Clip here
        instead, keeping the fused kernel: bf16-mixed has no scaler; under 16-mixed unscale first (GradScaler then
        marks the optimizer unscaled and its fused step does not divide again; a step with inf/nan is skipped)."""
        plugin = self.trainer.precision_plugin
        if not (gradient_clip_val and isinstance(plugin, MixedPrecision) and optimizer.defaults.get("fused")):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if plugin.scaler is not None:
            plugin.scaler.unscale_(optimizer)
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
        # The base rule (clip_grad_norm_ / clip_grad_value_ on the optimizer's parameters), not the refusal.
        Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        opt, sched = self.hparams.optim, self.hparams.schedule
        # Frozen weights never reach the optimizer; tensors trained only in part get no decay.
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n not in self.no_decay]},
            {"params": [p for n, p in named if n in self.no_decay], "weight_decay": 0.0},
        ]
        fused = opt.get("fused")
        if fused is None:  # fused kernels where torch has them for this device, else foreach
            fused = self.device.type in ("cuda", "cpu", "mps", "xpu")
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=opt["lr"],
            weight_decay=opt["weight_decay"],
            betas=tuple(opt.get("betas", (0.9, 0.999))),
            eps=opt.get("eps", 1e-8),
            fused=bool(fused),
            foreach=None if fused else True,
        )
        factor = lr_lambda(
            sched.get("name", "constant"),
            opt.get("warmup_steps", 0),
            self.trainer.max_steps,
            sched.get("min_lr_ratio", 0.0),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"},
        }
