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
    """New token ids (B × at most max_new_tokens) continuing equal-length prompts (B × P).

    `ban_eot`: end-of-text is never sampled, so every row has exactly max_new_tokens new tokens (the course's
    free generation). Otherwise a row may end at end-of-text (an instruction-tuned model's answer); rows that
    ended are padded with it, and the output is as long as the longest row.

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
            suppress_tokens=[EOT_ID] if ban_eot else None,
            eos_token_id=EOT_ID,  # whatever the model's own config says: GPT-2's end-of-text ends a row
            pad_token_id=EOT_ID,
            use_cache=True,
        )
    model.train(was_training)
    return out[:, prompt_ids.size(1) :]
