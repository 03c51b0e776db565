"""Precision chosen by the hardware: bf16 mixed precision where the device runs bf16 faster than fp32."""

from __future__ import annotations

import logging
import os
import time
from functools import lru_cache

import torch

log = logging.getLogger(__name__)


def cpu_bf16_native() -> bool:
    """True on CPUs with AVX512-BF16 or AMX, where bf16 matrix products run at full speed."""
    cpu = torch.cpu
    return bool(
        getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    )


# bf16 must beat fp32 by this much on the CPU to be chosen: autocast adds casts around every product.
BF16_MARGIN = 1.25
# The measurement, passed on to the processes a run starts (DDP ranks), so that every rank makes the same choice.
SPEEDUP_ENV = "GPTFT_CPU_BF16_SPEEDUP"


@lru_cache(maxsize=1)
def cpu_bf16_speedup(n: int = 1024, repeats: int = 3) -> float:
    """How many times faster this CPU multiplies n × n matrices in bf16 than in fp32 (best of `repeats` each,
    about 0.1 s in all); 0.0 without AVX512-BF16 or AMX, where bf16 is emulated. Measured, because the flags do
    not settle it: a 2-core Intel Xeon with AVX512-BF16 and no AMX ran bf16 products at 150 GFLOP/s against
    290 in fp32 (2026-11-30), while AMX runs bf16 several times faster than fp32. Measured once per job: the
    processes a run starts (DDP ranks) read the first process's figure from the environment, which also lets a
    user or the test suite force the choice on any CPU (`GPTFT_CPU_BF16_SPEEDUP=9` bf16-mixed, `=0` fp32; bf16
    is 500× slower where it is emulated, so forcing it there is for tiny models only)."""
    if SPEEDUP_ENV in os.environ:
        return float(os.environ[SPEEDUP_ENV])
    if not cpu_bf16_native():
        return 0.0
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = (torch.randn(n, n, generator=torch.Generator().manual_seed(i)).to(dtype) for i in (0, 1))
        a @ b  # warm-up: oneDNN picks its kernel
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    speedup = best[torch.float32] / best[torch.bfloat16]
    os.environ[SPEEDUP_ENV] = repr(speedup)
    return speedup


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """`auto` becomes bf16-mixed on a bf16-capable GPU, and on a CPU whose bf16 products are measured at least
    BF16_MARGIN times as fast as its fp32 ones; else 32-true. Anything else is kept as asked."""
    if str(precision) != "auto":
        return str(precision)
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        # Not emulated bf16: pre-Ampere GPUs (T4, V100) report bf16 support by default, and run it far slower
        # than fp32, with no flash-attention kernel.
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        where = "GPU" if native else "GPU without native bf16 (pre-Ampere: emulated)"
    elif cpu_bf16_native() or SPEEDUP_ENV in os.environ:
        speedup = cpu_bf16_speedup()
        native, where = speedup >= BF16_MARGIN, f"CPU (bf16 products measured at {speedup:.2f}× the fp32 rate)"
    else:
        native, where = False, "CPU (no AVX512-BF16 or AMX)"
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
