"""Cross-entropy of a linear output layer, computed in chunks of rows so the full logits never exist.

For GPT-2-sized models the 50,257-wide output layer and its loss dominate memory: batch 8 × 256 holds
411 MB of fp32 logits, and softmax and its gradient hold as much again. Here each chunk of rows computes
its logits, its loss and its gradients (with respect to the hidden states and to the weight), then frees
the logits, as Liger's fused linear cross-entropy does. The gradients are therefore computed during the
forward pass and only scaled in backward.
"""

from __future__ import annotations

import torch

from gptft.text.tokenizer import IGNORE_INDEX


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
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        device = hidden.device.type
        # Under autocast the two gradient products run in its dtype: cast the chunk's gradient once, not per product.
        matmul_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        for start in range(0, hidden.size(0), chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            valid = valid_all[start : start + chunk]
            logits = (h @ weight.t()).float()  # (chunk, V): the only logits alive at any time
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(len(y), device=y.device)
            target = logits[rows, y.clamp(min=0)]
            loss += ((lse - target) * valid).sum()
            # d loss / d logits = (softmax - one_hot) * valid / count, built in place over the logits
            grad = logits.sub_(lse[:, None]).exp_()
            grad[rows, y.clamp(min=0)] -= 1.0
            grad = grad.mul_((valid / count)[:, None]).to(matmul_dtype)  # cast once for both products
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = grad @ weight.to(h.dtype)
            if grad_weight is not None:
                grad_weight += (grad.t() @ h).float()
            del logits, grad
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss / count

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.to(torch.float32)
        return (
            None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype),
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
    """
    return _ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.size(-1)), weight, labels.reshape(-1), int(chunk), ignore_index
    )
