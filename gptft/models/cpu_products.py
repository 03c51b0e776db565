"""Weight gradients summed in fp32 from bf16 operands on a CPU: MKL's bf16 product with an fp32 output.

Under bf16 autocast a weight's gradient is a product of two bf16 tensors (inputs and output gradients) over all the
batch's tokens. torch's CPU mm writes it in bf16 (rounded once more, then cast up to the fp32 master weight's dtype:
a pass over the gradient) and has no bf16 → fp32 form (aten::mm.dtype is CUDA-only); oneDNN's bf16 math mode on fp32
operands converts them inside, slower still. MKL's `cblas_gemm_bf16bf16f32`, which torch's x86 wheels link and export,
multiplies bf16 on the CPU's bf16 units (AMX, AVX512-BF16) and accumulates into an fp32 output. On a 2-core AMX Xeon
GPT-2 124M's block weight gradients (768 × 2048 × 3072) ran 1.15-1.5× as fast as torch's bf16 mm, and unrounded.
Elsewhere (no such symbol: torch built without MKL) `available()` is False and callers keep torch's products.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS_LAYOUT, CBLAS_TRANSPOSE


@lru_cache(maxsize=1)
def _gemm() -> Any:
    """MKL's cblas_gemm_bf16bf16f32 from torch's own library, or None."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        gemm = lib.cblas_gemm_bf16bf16f32
    except (OSError, AttributeError):
        return None
    gemm.restype = None
    ints, pointer, real = [ctypes.c_int] * 6, ctypes.c_void_p, ctypes.c_float
    gemm.argtypes = [*ints, real, pointer, ctypes.c_int, pointer, ctypes.c_int, real, pointer, ctypes.c_int]
    return gemm


def available() -> bool:
    return _gemm() is not None


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 and t.stride(0) >= t.size(-1) else t.contiguous()


def add_transposed_product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> torch.Tensor:
    """out (fp32, m × n) = a.T @ b (+ out if accumulate), for bf16 CPU matrices a (k × m) and b (k × n): the sum over
    the k rows in fp32, never rounded to bf16. Returns out."""
    if not (a.dtype == b.dtype == torch.bfloat16 and out.dtype == torch.float32 and out.is_contiguous()):
        raise TypeError("add_transposed_product: a and b must be bf16, out contiguous fp32")
    (k, m), n = a.shape, b.size(1)
    if b.size(0) != k or out.shape != (m, n):
        raise ValueError(f"add_transposed_product: {tuple(a.shape)}.T @ {tuple(b.shape)} into {tuple(out.shape)}")
    a, b = _row_major(a), _row_major(b)
    # ctypes releases the GIL for the call; a, b and out stay referenced until it returns
    _gemm()(_ROW_MAJOR, _TRANS, _NO_TRANS, m, n, k, 1.0, a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0),
            1.0 if accumulate else 0.0, out.data_ptr(), out.stride(0))  # fmt: skip
    return out


class _Conv1DProduct(torch.autograd.Function):
    """x @ weight + bias as autocast runs it (all three in bf16: the same addmm, the same output); in backward the
    weight's and bias's gradients come out in fp32, summed over the rows unrounded."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        w = weight.to(torch.bfloat16)
        ctx.save_for_backward(x, w)
        return torch.addmm(bias.to(torch.bfloat16), x, w)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        grad = _row_major(grad)
        grad_x = grad @ w.t() if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = add_transposed_product(x, grad, torch.empty(w.shape, dtype=torch.float32), accumulate=False)
        if ctx.needs_input_grad[2]:  # onesᵀ · grad: sum(dtype=float32) would cast the whole gradient up first
            ones = torch.ones(grad.size(0), 1, dtype=grad.dtype)
            grad_b = add_transposed_product(ones, grad, torch.empty(1, grad.size(1)), accumulate=False).view(-1)
        return grad_x, grad_w, grad_b


def _bf16_autocast_training(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and torch.is_grad_enabled()
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and not torch.compiler.is_compiling()
    )


class FP32GradConv1D(Conv1D):
    """transformers' Conv1D (GPT-2's linear layers, weight stored in × out) whose weight and bias gradients under CPU
    bf16 autocast are summed in fp32 by MKL (`_Conv1DProduct`); Conv1D's own forward everywhere else. Swapped in by
    class (`use_fp32_weight_gradients`): parameters, state_dict and peft's wrapping stay Conv1D's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (_bf16_autocast_training(x) and self.weight.dtype == torch.float32):
            return super().forward(x)
        rows = x.reshape(-1, x.size(-1)).to(torch.bfloat16)
        return _Conv1DProduct.apply(rows, self.weight, self.bias).view(*x.shape[:-1], self.nf)


def use_fp32_weight_gradients(model: nn.Module) -> int:
    """Makes every transformers Conv1D of `model` an FP32GradConv1D, where MKL's product is available; returns how
    many. (Models built of nn.Linear keep torch's products.)"""
    if not available():
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) is Conv1D:
            module.__class__ = FP32GradConv1D
            swapped += 1
    return swapped
