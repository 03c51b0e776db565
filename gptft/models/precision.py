"""Precision chosen by the hardware: bf16 mixed precision where the device runs bf16 natively."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def cpu_bf16_native() -> bool:
    """True on CPUs with AVX512-BF16 or AMX, where bf16 matrix products run at full speed."""
    cpu = torch.cpu
    return bool(
        getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    )


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """`auto` becomes bf16-mixed on a bf16-capable GPU or CPU, else 32-true; anything else is kept as asked."""
    if str(precision) != "auto":
        return str(precision)
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        native, where = torch.cuda.is_available() and torch.cuda.is_bf16_supported(), "GPU"
    else:
        native, where = cpu_bf16_native(), "CPU (AVX512-BF16/AMX)" if cpu_bf16_native() else "CPU"
    chosen = "bf16-mixed" if native else "32-true"
    log.info("trainer.precision=auto: %s on this %s", chosen, where)
    return chosen


def set_tf32(enabled: bool) -> None:
    """Let CUDA run fp32 matrix products and convolutions on TF32 tensor cores (Ampere and newer).

    Process-wide torch flags that only CUDA kernels read: on a CPU they change nothing. Under bf16-mixed only
    what autocast keeps in fp32 is affected; with trainer.precision=32-true it is the main lever.
    """
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    if enabled:
        log.info("trainer.tf32=true: CUDA fp32 matrix products may use TF32")
