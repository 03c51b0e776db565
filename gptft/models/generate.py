"""Sampling text from a model: batched, KV-cached, seeded without touching the training RNG."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from transformers import PreTrainedModel

from gptft.text.tokenizer import EOT_ID


@lru_cache(maxsize=8)
def _stop_criteria(stop_strings: tuple[str, ...]) -> Any:
    """transformers' StopStringCriteria for these strings, built once: building it reads the whole vocabulary of
    a Hugging Face tokenizer (the same GPT-2 BPE), which costs more than generating a short answer; matching
    holds no state between calls, so one object serves every generate call."""
    from transformers import StopStringCriteria

    from gptft.text.tokenizer import hf_tokenizer

    return StopStringCriteria(hf_tokenizer(), list(stop_strings))


@torch.no_grad()
def sample_tokens(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    max_new_tokens: int = 100,
    top_k: int = 50,
    temperature: float = 1.0,
    seed: int = 0,
    ban_eot: bool = True,
    top_p: float | None = None,
    greedy: bool = False,
    stop_strings: list[str] | None = None,
    streamer: Any = None,
) -> torch.Tensor:
    """New token ids (B × at most max_new_tokens) continuing equal-length prompts (B × P).

    `ban_eot`: end-of-text is never sampled, so every row has exactly max_new_tokens new tokens (the course's
    free generation). Otherwise a row may end at end-of-text (an instruction-tuned model's answer); rows that
    ended are padded with it, and the output is as long as the longest row.

    `top_p` adds nucleus sampling; `greedy` takes the most likely token each step (top_k, top_p and temperature
    then do nothing); a row also ends once its new text contains one of `stop_strings` (e.g. the template's
    next question marker; the string itself stays in the output); `streamer` (a transformers BaseStreamer)
    receives the tokens as they are generated (batch of one).

    The generator state is forked, so a probe never changes which dropout masks or batches training sees
    next, and the same seed gives the same text before and after training.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompt_ids = prompt_ids.to(device)
    devices = [device] if device.type == "cuda" else []
    sampling = (
        {"do_sample": False} if greedy else {"do_sample": True, "top_k": top_k, "temperature": temperature}
    )
    if top_p is not None and not greedy:
        sampling["top_p"] = top_p
    if stop_strings:
        sampling["stopping_criteria"] = [_stop_criteria(tuple(stop_strings))]
    # Eager even where model.compile is on: each new length is a new shape, so Dynamo would recompile as the
    # cache grows (graphs for a few hundred tokens, 15 of a tiny LoRA run's 19 s with aot_eager on a CPU).
    with torch.random.fork_rng(devices=devices), torch.compiler.set_stance("force_eager"):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            **sampling,
            streamer=streamer,
            max_new_tokens=max_new_tokens,
            suppress_tokens=[EOT_ID] if ban_eot else None,
            eos_token_id=EOT_ID,  # whatever the model's own config says: GPT-2's end-of-text ends a row
            pad_token_id=EOT_ID,
            use_cache=True,
        )
    model.train(was_training)
    return out[:, prompt_ids.size(1) :]
