"""Dropout on a CPU, fast to draw: masks from 16-bit lanes of a counter-based stream, and attention that runs eager
(its two products on the CPU's bf16 units) where dropout is on.

torch's CPU dropout draws one float per element from a serial generator (about 7 ns each): a fifth of a GPT-2 124M
bf16 training step on an AMX Xeon, whose attention masks alone are 8 × 12 × 256 × 256 per layer. Here each mask is
the SplitMix64 stream keyed by one 64-bit draw from torch's default generator (so a seed and a checkpoint's RNG
state give the same masks again): each 64-bit number gives four elements their 16-bit lanes, dropped where a lane is
below -32768 + round(p · 65536). p is rounded to 1/65536 (0.1 → 0.1000061) and the kept values are scaled by
1 / (1 - that p), so the expectation stays exact. The stream is computed by gptft's C kernel (gptft.models.cpu_kernels:
1.0-1.3 ms for an attention mask where torch's generator took 10-17), or by torch's integer operators where no
compiler works: the same masks either way. In bf16 the causal attention's softmax and mask run in one fused kernel.
Off the CPU (CUDA's fused Philox dropout is fast) and under torch.compile (inductor's generated code draws its own
masks) everything here is torch's own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gptft.models import cpu_kernels

ATTENTION = "gptft_sdpa"  # the name registered with transformers (see register_attention)
LANES = 1 << 16


def _threshold(p: float) -> int:
    """A lane below this is dropped: probability round(p · 65536) / 65536."""
    return -(LANES // 2) + round(p * LANES)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 1 (kept) and 0 (dropped), each element dropped with probability round(p · 65536) / 65536, independently:
    its signed 16-bit lane of a SplitMix64 stream (four lanes per 64-bit number) below -32768 + round(p · 65536). The
    stream's key is one 64-bit draw from torch's default generator, so a seed and a checkpoint's RNG state give the
    same masks again. uint8, to multiply by: on a CPU a product with a uint8 mask runs several times faster than a
    fill or a product through a bool one (bf16, 8 × 12 × 256 × 256: 1.7 against 7.8 and 6.5 ms)."""
    # random_(-2**63, None): every bit uniform (random_() alone keeps the sign bit 0)
    key = int(torch.empty((), dtype=torch.int64).random_(-(2**63), None))
    return cpu_kernels.keep_mask(shape, _threshold(p), key, device)


def drop_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The bool mask of the elements `keep_mask` drops (True: dropped), from the same draw."""
    return keep_mask(shape, p, device) == 0


def kept_scale(p: float) -> float:
    """What the kept elements are multiplied by: 1 / (1 - the p drop_mask draws with)."""
    return 1.0 / (1.0 - round(p * LANES) / LANES)


class _MaskedScale(torch.autograd.Function):
    """x times a 0/1 keep mask times the scale: two products each way; the graph keeps the uint8 mask."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return (x * keep).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None, None


def cpu_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout with masks from keep_mask on a CPU; F.dropout itself elsewhere, for p of 0 or 1, and under
    torch.compile (Dynamo cannot trace `random_`, and inductor draws its own masks in generated code)."""
    if not training or p == 0.0 or p >= 1.0 or x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    return _MaskedScale.apply(x, keep_mask(x.shape, p, x.device), kept_scale(p))


class Dropout(nn.Dropout):
    """nn.Dropout drawing its masks with `cpu_dropout` (a drop-in: same p, same state_dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_dropout(x, self.p, self.training)


def attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except with dropout on a CPU: there torch's SDPA has no fused kernel and falls
    back to its math path in fp32 (q, k, v and the T × T weights cast up, torch's serial dropout), so this runs the
    eager computation instead, its products in the autocast dtype and its weights' dropout from `keep_mask`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    simple = not any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "sinks", "s_aux"))
    simple = simple and getattr(module, "num_key_value_groups", 1) == 1 and not torch.compiler.is_compiling()
    if dropout == 0.0 or query.device.type != "cpu" or not simple:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    scale = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query * scale, key.transpose(-1, -2))
    keep = keep_mask(scores.shape, dropout, scores.device)
    if attention_mask is None and getattr(module, "is_causal", True) and cpu_kernels.applies_to(scores):
        # bf16 on a CPU: the causal mask, the softmax and dropout's mask in one fused pass each way
        weights = cpu_kernels.causal_attention_probs(scores, keep)
    else:
        q_len, kv_len = scores.shape[-2:]
        if attention_mask is None and q_len > 1 and getattr(module, "is_causal", True):
            # SDPA's mask is None where is_causal alone says it: the last q_len of kv_len positions see their past
            attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril(kv_len - q_len)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:  # SDPA's convention: True where attention is allowed
                bias = torch.zeros(attention_mask.shape, dtype=scores.dtype, device=scores.device)
                attention_mask = bias.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
            # added in place to a product's output (which its backward does not need): no pass over it in backward
            scores.add_(attention_mask.to(scores.dtype))
        # in the products' dtype, as transformers' eager attention under autocast (torch computes it in fp32
        # inside); dropout multiplies by the uint8 mask
        weights = torch.softmax(scores, dim=-1).to(value.dtype) * keep
    # dropout's scale goes on v (T × 64 numbers, not T × T)
    return torch.matmul(weights, value * kept_scale(dropout)).transpose(1, 2), None


def register_attention() -> None:
    """Makes `ATTENTION` an attention implementation transformers knows, with SDPA's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_fast_dropout(model: nn.Module) -> int:
    """Swaps every nn.Dropout of `model` for `Dropout`, and SDPA attention with dropout for `attention`; returns how
    many modules were swapped. A saved model's config names no implementation (transformers does not save it)."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, Dropout(child.p, child.inplace))
                swapped += 1
    config = getattr(model, "config", None)
    # GPT-2's attention dropout (other models name it otherwise, and keep SDPA)
    if getattr(config, "_attn_implementation", None) == "sdpa" and getattr(config, "attn_pdrop", 0.0) > 0.0:
        register_attention()
        model.set_attn_implementation(ATTENTION)
    return swapped
