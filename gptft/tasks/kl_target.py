"""The KL-target task: pull the model's next-token distribution toward a fixed target distribution."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from gptft.tasks.causal_lm import CausalLM
from gptft.tasks.targets import target_distribution


class KLTarget(CausalLM):
    """Loss KL(P_target ‖ Q_model) = kl_div(log_softmax(logits), P_target, reduction="batchmean") over all B·T
    positions (the course's loss; the labels are not used). Also reports the probability mass the model puts
    on the target ids, which should rise as the loss falls, and the share of generated tokens among them.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        optim: Mapping[str, Any],
        schedule: Mapping[str, Any],
        target: Mapping[str, Any],
        loss_chunk: int = 0,  # accepted for a uniform interface; this loss keeps full logits (see compute_loss)
        seed: int = 0,
        no_decay: Sequence[str] = (),
    ):
        super().__init__(model, optim, schedule, loss_chunk=0, seed=seed, no_decay=no_decay)
        self.save_hyperparameters({"target": dict(target)})
        p_target, ids = target_distribution(**target)
        self.register_buffer("p_target", p_target, persistent=False)
        self.register_buffer("target_ids", ids, persistent=False)

    def compute_loss(
        self, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch[0]
        log_q = F.log_softmax(self.logits(x).flatten(0, 1).float(), dim=-1)
        loss = F.kl_div(log_q, self.p_target.expand_as(log_q), reduction="batchmean")
        target_mass = log_q.detach()[:, self.target_ids].exp().sum(-1).mean()
        return loss, {"target_mass": target_mass}

    def loss_metrics(self, loss: float) -> dict[str, float]:
        return {"loss": loss}  # a KL divergence has no perplexity

    def probe_token_sets(self) -> dict[str, torch.Tensor]:
        return {"target_ratio": self.target_ids}
