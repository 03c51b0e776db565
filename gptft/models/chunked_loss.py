"""Cross-entropy of a linear output layer, computed in chunks of rows so the full logits never exist.

For GPT-2-sized models the 50,257-wide output layer and its loss dominate memory: batch 8 × 256 holds
411 MB of fp32 logits, and softmax and its gradient hold as much again. Here each chunk of rows computes
its logits, its loss and its gradients (with respect to the hidden states and to the weight), then frees
the logits, as Liger's fused linear cross-entropy does. The gradients are therefore computed during the
forward pass and only scaled in backward. (torch has no fused linear cross-entropy of its own; Liger's is
Triton, GPU only.)
"""

from __future__ import annotations

import torch

from gptft.models import cpu_kernels, cpu_products
from gptft.text.tokenizer import IGNORE_INDEX

_CPU_BUFFERS: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # (what it holds, dtype) → the kept buffer


def _buffer(name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (rows, cols) buffer for `name` (a chunk's logits, their bf16 twin, the weight's bf16 cast), written in place.
    On a CPU one per name and dtype is kept for the process (the largest asked for), because a fresh 100 MB tensor
    costs its page faults every time, 40 ms here (glibc hands blocks above 32 MB back to the system at once); CUDA's
    caching allocator already reuses its blocks."""
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    kept = _CPU_BUFFERS.get((name, dtype))
    if kept is None or kept.size(0) < rows or kept.size(1) != cols:
        kept = _CPU_BUFFERS[(name, dtype)] = torch.empty(rows, cols, dtype=dtype)
    return kept[:rows]


def release_logits_buffer() -> None:
    """Drop the kept CPU buffers: a run that measures its own memory (PeakMemory) then allocates, and counts, its own."""
    _CPU_BUFFERS.clear()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk: int,
        ignore_index: int,
    ) -> torch.Tensor:
        valid_all = labels != ignore_index
        count = valid_all.sum().clamp(min=1).float()
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = None
        device = hidden.device.type
        # Under autocast the products run in its dtype: cast the weight once, and each chunk's gradient once.
        matmul_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        w = weight
        if weight.dtype != matmul_dtype:  # kept: the cast lives only in this forward (the gradients are made here)
            w = _buffer("weight", *weight.shape, matmul_dtype, hidden.device).copy_(weight)
        plain_fp32 = matmul_dtype == hidden.dtype == weight.dtype == torch.float32
        # bf16 on a CPU: the weight gradient accumulates over the chunks in fp32, from the products' bf16 operands
        fp32_weight_grad = (
            device == "cpu" and matmul_dtype == torch.bfloat16 and weight.requires_grad and cpu_products.available()
        )
        needs_grad = grad_hidden is not None or weight.requires_grad
        rows_kept = min(chunk, hidden.size(0))
        # bf16 on a CPU: the passes over each chunk's logits in one fused loop per row (gptft.models.cpu_kernels),
        # on the products' bf16 output itself, so no fp32 logits exist; else torch's operators on an fp32 copy
        fused = device == "cpu" and matmul_dtype == torch.bfloat16 and cpu_kernels.available()
        buffer = None if fused else _buffer("logits", rows_kept, weight.size(0), torch.float32, hidden.device)
        # under autocast: the products' logits, then the gradient's cast (kept too: fresh, each costs page faults)
        low = None if plain_fp32 else _buffer("logits", rows_kept, weight.size(0), matmul_dtype, hidden.device)
        for start in range(0, hidden.size(0), chunk):
            hidden_chunk, y = hidden[start : start + chunk], labels[start : start + chunk]
            h = hidden_chunk.to(matmul_dtype)
            valid = valid_all[start : start + chunk].float()  # 1 for a labelled row, 0 for an ignored one
            target_ids = y.clamp(min=0)
            if fused:
                # d (summed loss) / d logits = softmax - one_hot, written over the logits in bf16
                grad = grad_low = torch.mm(h, w.t(), out=low[: len(y)])
                lse, target = cpu_kernels.cross_entropy_rows(grad_low, target_ids, valid, grad=needs_grad)
                loss += ((lse - target) * valid).sum() / count
                if not needs_grad:
                    continue
            else:
                logits = buffer[: len(y)]  # (chunk, V): the only logits alive at any time
                if plain_fp32:
                    torch.mm(h, w.t(), out=logits)
                else:
                    logits.copy_(torch.mm(h, w.t(), out=low[: len(y)]))
                rows = torch.arange(len(y), device=y.device)
                target = logits[rows, target_ids]
                row_max = logits.amax(dim=-1, keepdim=True)
                exp = logits.sub_(row_max).exp_()  # softmax numerators, in place
                total = exp.sum(dim=-1)
                lse = row_max.squeeze(1) + total.log()
                loss += ((lse - target) * valid).sum() / count
                if not needs_grad:
                    continue
                # d (summed loss) / d logits = softmax - one_hot, built in place over the numerators. The mean's
                # 1/count is applied in backward, after the products: (softmax - one_hot) / count underflows fp16
                # (its smallest subnormal is 6e-8), which made 16-mixed's chunked gradient 100x off at 2,048 rows.
                grad = exp.mul_((valid / total)[:, None])
                grad[rows, target_ids] -= valid
                grad_low = grad if plain_fp32 else low[: len(y)].copy_(grad)  # under autocast one cast, both products
            if grad_hidden is not None:
                if plain_fp32:
                    torch.mm(grad, w, out=grad_hidden[start : start + chunk])
                else:
                    grad_hidden[start : start + chunk] = grad_low @ w
            if fp32_weight_grad:  # MKL sums in fp32 (a bf16 product cast up and added: 3 passes over V × d, rounded)
                if grad_weight is None:  # not a kept buffer: it becomes the weight's .grad
                    grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=hidden.device)
                cpu_products.add_transposed_product(grad_low, h, grad_weight, accumulate=start > 0)
            elif weight.requires_grad:
                if grad_weight is None:
                    grad_weight = (grad_low.t() @ h).float()
                elif plain_fp32:
                    grad_weight.addmm_(grad.t(), h)
                else:
                    grad_weight += (grad_low.t() @ h).float()
            del grad, grad_low
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        return loss

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_output.to(torch.float32) / count  # the forward's gradients are of the sum over labelled rows
        # In place: these tensors exist only for this backward (a second one through the same graph is refused
        # by autograd's version check), and on a CPU a fresh copy of the 50 MB weight gradient costs page faults.
        return (
            None if grad_hidden is None else grad_hidden.mul_(scale.to(grad_hidden.dtype)),
            None if grad_weight is None else grad_weight.mul_(scale).to(ctx.weight_dtype),
            None,
            None,
            None,
        )


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = 4096,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels` over the labels that are not ignored.

    hidden: (..., d); weight: (V, d), e.g. a tied embedding; labels: (...). Equals
    `F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=ignore_index)` without the logits.
    Under no_grad (validation, probes) it computes the loss alone, with no gradient products.
    """
    if not torch.is_grad_enabled():  # evaluation: the loss alone, still without the full logits
        weight = weight.detach()
    return _ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.size(-1)), weight, labels.reshape(-1), int(chunk), ignore_index
    )
