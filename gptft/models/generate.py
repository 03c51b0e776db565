"""Sampling text from a model: batched, KV-cached, seeded without touching the training RNG."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from gptft.text.tokenizer import EOT_ID


@torch.no_grad()
def sample_tokens(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    max_new_tokens: int = 100,
    top_k: int = 50,
    temperature: float = 1.0,
    seed: int = 0,
    ban_eot: bool = True,
) -> torch.Tensor:
    """New token ids (B × max_new_tokens) continuing equal-length prompts (B × P).

    The generator state is forked, so a probe never changes which dropout masks or batches training sees
    next, and the same seed gives the same text before and after training.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompt_ids = prompt_ids.to(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            do_sample=True,
            top_k=top_k,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            suppress_tokens=[EOT_ID] if ban_eot else None,
            pad_token_id=EOT_ID,
            use_cache=True,
        )
    model.train(was_training)
    return out[:, prompt_ids.size(1) :]
