"""Model FLOPs per trained token: the numerator of model FLOPs utilisation (MFU).

Conventions (PaLM appendix B, nanoGPT's `estimate_mfu`), for a decoder of L blocks of width d at context T:

- N counts the parameters that do matrix products. Position embeddings are left out (a table lookup, no
  product); the token embedding is counted once, because GPT-2 ties it to the output layer, whose
  d × vocabulary product is the largest in a small model. Biases and LayerNorms are counted (they are tiny).
- A trained weight costs 6 FLOPs per token: 2 forward, 2 for the gradient of its input, 2 for its own gradient.
- A frozen weight costs 4 if gradients must still flow through it to a trained weight below it (it needs no
  gradient of its own), and 2 if nothing below it trains (forward only: no backward reaches it). A trained
  token or position embedding is below every block, even when it is tied to the output layer.
- Attention scores and their weighted sum cost 4·d·T per token per block forward and twice that backward,
  the backward only in the blocks that gradients reach. Causal masking is ignored, as the convention does.

Everything trained gives the familiar 6·N + 12·L·d·T. Recomputation by gradient checkpointing is not counted:
MFU measures useful model work, not hardware work.

Why not Lightning's `measure_flops` (torch's FlopCounterMode): it counts one forward and backward of one input
shape, so it must run the model (on the meta device, a copy with the same freezing, PEFT wrapping and sharding)
for every batch length a question/answer run sees; this count is a formula in T. tests/test_scale.py checks that
the two agree on the tiny model as it is frozen three ways.
"""

from __future__ import annotations

import re

import torch

_BLOCK = re.compile(r"\.(\d+)\.")  # the block index in names like transformer.h.3.attn.c_attn.weight


def flops_per_token(
    n_trained: int,
    n_frozen_backward: int,
    n_frozen_forward: int,
    n_layer: int,
    d_model: int,
    seq_len: int,
    n_layer_backward: int | None = None,
) -> float:
    """Training FLOPs per token: 6·n_trained + 4·n_frozen_backward + 2·n_frozen_forward, plus attention
    4·L·d·T forward and 8·L_b·d·T backward, where L_b (default all L) is the number of blocks gradients reach."""
    l_back = n_layer if n_layer_backward is None else n_layer_backward
    dense = 6 * n_trained + 4 * n_frozen_backward + 2 * n_frozen_forward
    return float(dense + (4 * n_layer + 8 * l_back) * d_model * seq_len)


def _forward_order(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters in the order the forward pass uses them, each once, position embeddings left out.

    Registration order follows the forward pass in GPT-2 and GPT-Neo; the tied token embedding is moved to
    the end, where its product (the output layer) happens.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = head.weight if head is not None else None
    params = [(n, p) for n, p in model.named_parameters() if not n.endswith("wpe.weight")]
    last = [(n, p) for n, p in params if p is head_weight]
    return [(n, p) for n, p in params if p is not head_weight] + last


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """flops_per_token for a Hugging Face causal LM as it is frozen now (`requires_grad` per parameter)."""
    config = model.config
    n_layer = int(getattr(config, "n_layer", None) or config.num_hidden_layers)
    d_model = int(getattr(config, "n_embd", None) or config.hidden_size)
    order = _forward_order(model)
    first = next((i for i, (_, p) in enumerate(order) if p.requires_grad), len(order))
    lookups = [p for n, p in model.named_parameters() if n.endswith("wpe.weight")]
    lookups.append(model.get_input_embeddings().weight)
    if any(p.requires_grad for p in lookups):
        first = (
            0  # a trained embedding table (the tied one too) needs gradients through every block down to it
        )
    trained = sum(p.numel() for _, p in order if p.requires_grad)
    forward_only = sum(p.numel() for _, p in order[:first])
    frozen_backward = sum(p.numel() for _, p in order[first:] if not p.requires_grad)
    if first == len(order):
        l_back = 0
    else:
        block = _BLOCK.search(order[first][0])
        # A trained parameter before the first block (embeddings) sends gradients through all of them; one after
        # the last block (final norm, tied head) through none.
        blocks_after = [int(m.group(1)) for n, _ in order[first:] if (m := _BLOCK.search(n))]
        l_back = n_layer - int(block.group(1)) if block else (n_layer if blocks_after else 0)
    return flops_per_token(trained, frozen_backward, forward_only, n_layer, d_model, seq_len, l_back)


# Dense (no sparsity) bf16 (= fp16) tensor-core peaks in FLOP/s from the vendors' datasheets, most specific name first.
# Lightning's table (get_available_flops) lacks a plain "NVIDIA H200" and lists the with-sparsity figure for some
# chips (H200 SXM: 2.0e15), so the lower of the two is used where both know the chip.
DENSE_BF16_PEAK = {
    "gh200": 989e12,
    "h200": 989e12,
    "h100 nvl": 835e12,
    "h100 pcie": 756e12,
    "h100": 989e12,
    "b200": 2250e12,
    "a100": 312e12,
    "l40s": 362e12,
    "l4": 121e12,
    "rtx 4090": 165e12,
    "a10g": 70e12,
}


def dense_peak(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """A CUDA device's dense peak FLOP/s in `dtype` and where the figure comes from ((None, why) when unknown)."""
    from lightning.fabric.utilities.throughput import get_available_flops

    lightning = get_available_flops(device, dtype)
    chip = torch.cuda.get_device_name(device).lower()
    tensor_cores = dtype in (torch.bfloat16, torch.float16)
    own = next((v for k, v in DENSE_BF16_PEAK.items() if k in chip), None) if tensor_cores else None
    if own is not None and (lightning is None or own < lightning):
        return own, "gptft's datasheet table (dense bf16)"
    return (float(lightning), "lightning get_available_flops") if lightning else (None, "unknown chip")
