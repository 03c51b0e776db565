"""Model FLOPs per trained token: the numerator of model FLOPs utilisation (MFU).

Conventions (PaLM appendix B, nanoGPT's `estimate_mfu`), for a decoder of L blocks of width d at context T.
What is counted:

- The parameters that do matrix products, in the order the forward pass uses them. Position embeddings are left
  out (a table lookup, no product); the token embedding is counted once, as the output layer it is tied to (GPT-2),
  whose d × vocabulary product is the largest in a small model.
- Per element of a weight matrix: 2 FLOPs forward; 2 for the gradient of its input, when the backward pass needs
  that gradient (some tensor used before it trains, the embeddings first of all); 2 for its own gradient, when
  the element trains. So a trained weight costs 6, except the first trained one in the forward order, whose
  input carries no gradient (4); a frozen weight costs 4 once gradients flow through it, else 2 (forward only).
- Attention scores and their weighted sum: 4·d·T per token per block forward, 8·d·T backward in the blocks
  whose queries, keys and values the gradient reaches (those after the first trained tensor, and its own block
  when that tensor comes before the attention, e.g. c_attn). Causal masking is ignored, as the convention does.

What torch's FlopCounterMode sees differently (tests/oracle/test_oracle_weights.py checks the count against it):

- Biases and LayerNorm gains are charged like matrices of their size (2 / 4 / 6 per element as above); the
  counter counts matrix products only. They are 0.09% of GPT-2 small's training FLOPs.
- `freeze.qkv_parts` trains part of a fused c_attn matrix: autograd computes its whole weight gradient and a hook
  zeroes the untrained thirds. Only the useful part is counted (2 per trained element), so under qkv_parts=[k]
  the executed work is 2 FLOPs per untrained element higher than reported. MFU counts useful model work; for
  the same reason recomputation by gradient checkpointing is not counted either.

Everything trained gives the familiar 6·N + 12·L·d·T.

Why not Lightning's `measure_flops` (torch's FlopCounterMode) at run time: it counts one forward and backward of
one input shape, so it must run the model (on the meta device, a copy with the same freezing, PEFT wrapping and
sharding) for every batch length a question/answer run sees; this count is a formula in T.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

_BLOCK = re.compile(r"\.(\d+)\.")  # the block index in names like transformer.h.3.attn.c_attn.weight
# The attention's output projection (GPT-2, GPT-Neo; PEFT's wrapped layers keep the name): the attention runs just
# before it.
_ATTENTION_OUT = re.compile(r"\.attn\.(c_proj|attention\.out_proj)\.")


def flops_per_token(
    n_both: int,
    n_one: int,
    n_forward_only: int,
    n_layer: int,
    d_model: int,
    seq_len: int,
    n_layer_backward: int | None = None,
) -> float:
    """Training FLOPs per token of matrix elements counted by what the backward pass does for them: both
    gradients, of the input and of the element (6 FLOPs with the forward's 2), one of the two (4) or none (2);
    plus attention, 4·L·d·T forward and 8·L_b·d·T backward, where L_b (default all L) is the number of blocks
    gradients reach."""
    l_back = n_layer if n_layer_backward is None else n_layer_backward
    dense = 6 * n_both + 4 * n_one + 2 * n_forward_only
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


def _all_or_none(p: torch.Tensor) -> int:
    return p.numel() if p.requires_grad else 0


def model_flops_per_token(
    model: torch.nn.Module, seq_len: int, trained_numel: Callable[[torch.Tensor], int] = _all_or_none
) -> float:
    """flops_per_token for a Hugging Face causal LM as it is frozen now. `requires_grad` says where gradients
    flow; `trained_numel(p)` how many elements of p train (gptft.tasks.freezing.trained_numel for a model frozen
    by gptft, which knows the tensors trained in part)."""
    config = model.config
    n_layer = int(getattr(config, "n_layer", None) or config.num_hidden_layers)
    d_model = int(getattr(config, "n_embd", None) or config.hidden_size)
    order = _forward_order(model)
    first = next((i for i, (_, p) in enumerate(order) if p.requires_grad), len(order))
    lookups = [p for n, p in model.named_parameters() if n.endswith("wpe.weight")]
    lookups.append(model.get_input_embeddings().weight)
    # A trained embedding table (the tied one too) needs gradients through every block down to it.
    if any(p.requires_grad for p in lookups):
        first = -1
    both = one = forward_only = 0
    for i, (_, p) in enumerate(order):
        trained = trained_numel(p)
        if i > first:  # the gradient of its input is needed
            both, one = both + trained, one + p.numel() - trained
        else:
            one, forward_only = one + trained, forward_only + p.numel() - trained
    return flops_per_token(both, one, forward_only, n_layer, d_model, seq_len, _blocks_backward(order, first))


def _blocks_backward(order: list[tuple[str, torch.nn.Parameter]], first: int) -> int:
    """How many blocks run their attention backward when the first tensor with a gradient is order[first]
    (-1: an embedding, below every block)."""
    blocks = sorted({int(m.group(1)) for n, _ in order if (m := _BLOCK.search(n))})
    if first < 0:
        return len(blocks)
    if first == len(order):
        return 0
    name = order[first][0]
    block = _BLOCK.search(name)
    if block is None:  # before the first block (an embeddings' norm) or after the last (final norm, head)
        return len(blocks) if any(_BLOCK.search(n) for n, _ in order[first:]) else 0
    b = int(block.group(1))
    # In its own block the attention runs backward only when the first trained tensor comes before it.
    past_attention = any(
        _ATTENTION_OUT.search(n) and int(_BLOCK.search(n).group(1)) == b for n, _ in order[: first + 1]
    )
    return sum(1 for i in blocks if i > b or (i == b and not past_attention))


# Dense (no sparsity) bf16 (= fp16) tensor-core peaks in FLOP/s from the vendors' datasheets, most specific name first.
# Matched as whole words of the device name: Lightning's table (get_available_flops) matches substrings, so every
# "NVIDIA L40S" and "NVIDIA L40" is its "l4" (121 TFLOP/s: MFU 3× and 1.5× too high); it also lacks a plain
# "NVIDIA H200" and lists the with-sparsity figure for some chips (H200 SXM: 2.0e15). A chip named here takes this
# figure; Lightning's is the fallback for the others.
DENSE_BF16_PEAK = {
    "gh200": 989e12,
    "h200 nvl": 835e12,
    "h200": 989e12,
    "h100 nvl": 835e12,
    "h100 pcie": 756e12,
    "h100": 989e12,
    "b200": 2250e12,
    "a100": 312e12,
    "l40s": 362e12,
    "l40": 181e12,
    "l4": 121e12,
    "rtx 4090": 165e12,
    "a10g": 70e12,
    "a10": 125e12,
}


def datasheet_peak(chip: str) -> float | None:
    """The dense bf16 peak of a CUDA device named `chip` (torch.cuda.get_device_name) from DENSE_BF16_PEAK, or None."""
    name = chip.lower()
    return next(
        (v for k, v in DENSE_BF16_PEAK.items() if re.search(rf"(?<![a-z0-9]){re.escape(k)}(?![a-z0-9])", name)),
        None,
    )


def dense_peak(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """A CUDA device's dense peak FLOP/s in `dtype` and where the figure comes from ((None, why) when unknown)."""
    if dtype in (torch.bfloat16, torch.float16):  # tensor cores: the datasheet table first
        own = datasheet_peak(torch.cuda.get_device_name(device))
        if own is not None:
            return own, "gptft's datasheet table (dense bf16)"
    from lightning.fabric.utilities.throughput import get_available_flops

    lightning = get_available_flops(device, dtype)
    return (float(lightning), "lightning get_available_flops") if lightning else (None, "unknown chip")
