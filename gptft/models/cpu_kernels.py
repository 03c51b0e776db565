"""Fused CPU kernels for the bf16 training step: tanh-GELU and its gradient, the chunked loss's passes over the logits,
causal attention's softmax with dropout's mask and its gradient, and dropout's keep masks (`cpu_kernels.c`, compiled
here once per machine with the system's C compiler).

What torch lacks: its tanh-GELU kernel computes tanh with Sleef (10-11 ms for GPT-2 124M's 8 × 256 × 3072 bf16
activations on a 2-core AMX Xeon, against 2.3-2.5 for its erf GELU); the loss's passes over a 512 × 50,257 chunk are
seven eager operators over 100 MB of fp32 (max, subtract, exp, sum, scale, the one-hot, the bf16 cast: 43-75 ms)
where one loop over each row in the cache takes 19-26; attention's softmax under autocast casts to fp32 and back
around it; and its CPU generator (mt19937) is serial. inductor (`model.compile`) fuses such passes only after a
compilation per shape (the loss's passes compiled ran no faster: 51-67 ms) and draws its own masks. So: one C file,
built with `-O3 -march=native -ffast-math -fopenmp` by `$CC` (default `cc`) into the user's cache
(`$XDG_CACHE_HOME/gptft/kernels`, keyed by the source, the flags, the compiler and the CPU's flags; written through
a rename, so parallel processes may race), loaded with ctypes, run on torch's own OpenMP threads. Where no compiler
works, or `GPTFT_CPU_KERNELS=0`, `available()` is False and callers keep torch's operators (the masks: the same
SplitMix64 stream computed with torch's integer operators, so a seed gives the same masks either way).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# Compiled with -ffast-math, which lets gcc call glibc's vector expf and tanhf; linked without it, since with it gcc 12
# adds crtfastmath.o, whose constructor would turn on flush-to-zero for the whole process when the library loads.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
LINK = ["-shared", "-fopenmp"]
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "gelu_tanh_bf16": [_PTR, _PTR, _I64],
    "gelu_tanh_backward_bf16": [_PTR, _PTR, _PTR, _I64],
    "cross_entropy_bf16": [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, ctypes.c_int],
    "keep_mask": [_PTR, _I64, ctypes.c_uint64, ctypes.c_int32],
    "attention_probs_bf16": [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64],
    "attention_probs_backward_bf16": [_PTR, _PTR, _PTR, _PTR, _I64, _I64],
}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> Path:
    """The compiled library's path, building it first if this source, compiler and CPU have none yet."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True, timeout=30).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS + LINK), version, _cpu_flags()]).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptft" / "kernels"
    target = cache / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
        os.close(fd)
        obj = tmp + ".o"
        try:
            for command in ([compiler, *FLAGS, "-c", str(SOURCE), "-o", obj], [compiler, *LINK, obj, "-o", tmp, "-lm"]):
                subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
            os.replace(tmp, target)  # atomic: a process racing this one loads a whole file either way
        finally:
            Path(tmp).unlink(missing_ok=True)
            Path(obj).unlink(missing_ok=True)
    return target


@lru_cache(maxsize=1)
def _library() -> Any:
    """The loaded kernels, or None (switched off, no compiler, a failed build: logged once)."""
    if os.environ.get("GPTFT_CPU_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        return None
    compiler = os.environ.get("CC", "cc")
    try:
        # torch is imported first, so the library's libgomp.so.1 is torch's: one OpenMP pool, torch's thread count
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = str(getattr(e, "stderr", None) or e).strip()
        why = detail.splitlines()[-1] if detail else repr(e)
        log.warning("gptft's CPU kernels are off (%s could not build %s: %s): torch's operators run instead",
                    compiler, SOURCE.name, why)  # fmt: skip
        return None
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, None
    return lib


def available() -> bool:
    return _library() is not None


def applies_to(*tensors: torch.Tensor) -> bool:
    """The kernels take contiguous bf16 CPU tensors, outside torch.compile's tracing."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors)
        and not torch.compiler.is_compiling()
        and available()
    )


class _GELUTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        y = torch.empty_like(x)
        _library().gelu_tanh_bf16(x.data_ptr(), y.data_ptr(), x.numel())
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        grad = grad.to(torch.bfloat16).contiguous()  # autograd would cast the input's gradient to bf16 anyway
        dx = torch.empty_like(x)
        _library().gelu_tanh_backward_bf16(grad.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel())
        return dx


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """torch.nn.functional.gelu(x, approximate="tanh"), from the fused kernel for a contiguous bf16 CPU tensor."""
    if applies_to(x):
        return _GELUTanh.apply(x)
    return torch.nn.functional.gelu(x, approximate="tanh")


class GELUTanh(torch.nn.Module):
    """GELU's tanh approximation (GPT-2's gelu_new) as a module, through `gelu_tanh`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)


def cross_entropy_rows(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """For contiguous bf16 CPU logits (rows × V), int64 targets and fp32 row weights: each row's log-sum-exp and its
    target's logit, in fp32. With `grad` the logits are overwritten, in bf16, with weights · (softmax - one_hot): the
    gradient of Σ weights · loss. Callers check `applies_to(logits)` first."""
    rows, cols = logits.shape
    targets, weights = targets.to(torch.int64).contiguous(), weights.to(torch.float32).contiguous()
    if rows and not 0 <= int(targets.min()) <= int(targets.max()) < cols:  # the kernel indexes the rows with them
        raise IndexError(f"cross_entropy_rows: targets must lie in [0, {cols}), got {targets.min()}..{targets.max()}")
    lse, target_logit = torch.empty(rows), torch.empty(rows)
    _library().cross_entropy_bf16(logits.data_ptr(), rows, cols, targets.data_ptr(), weights.data_ptr(),
                                  lse.data_ptr(), target_logit.data_ptr(), int(grad))  # fmt: skip
    return lse, target_logit


class _AttentionProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        q_len, cols = scores.shape[-2:]
        probs, dropped = torch.empty_like(scores), torch.empty_like(scores)
        _library().attention_probs_bf16(scores.data_ptr(), probs.data_ptr(), dropped.data_ptr(), keep.data_ptr(),
                                        scores.numel() // cols, cols, q_len, cols - q_len)  # fmt: skip
        ctx.save_for_backward(probs, keep)
        return dropped

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        probs, keep = ctx.saved_tensors
        grad = grad.to(torch.bfloat16).contiguous()
        cols = probs.size(-1)
        out = torch.empty_like(probs)
        _library().attention_probs_backward_bf16(grad.data_ptr(), probs.data_ptr(), keep.data_ptr(), out.data_ptr(),
                                                 probs.numel() // cols, cols)  # fmt: skip
        return out, None


def causal_attention_probs(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """softmax(scores + the causal mask) · keep for contiguous bf16 CPU scores (..., q_len, kv_len), where query i
    sees the keys up to i + kv_len - q_len, and a uint8 keep mask of their shape: the weights of causal attention
    with dropout's mask applied (its scale is the caller's), in one pass each way. Callers check
    `applies_to(scores)`."""
    if keep.shape != scores.shape or keep.dtype != torch.uint8:
        raise ValueError(f"causal_attention_probs: keep must be uint8 of the scores' shape {tuple(scores.shape)}")
    return _AttentionProbs.apply(scores, keep.contiguous())


_GAMMA, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64's constants


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 with the same bits."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(key: int, words: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The first `words` numbers of the SplitMix64 stream keyed by `key` (the counter's hash the C kernel computes),
    as int64 bit patterns, from torch's integer operators (int64 products wrap, as uint64's)."""
    z = torch.arange(1, words + 1, dtype=torch.int64, device=device).mul_(_signed(_GAMMA)).add_(_signed(key))
    z = (z ^ _shift_right(z, 30)).mul_(_signed(_MIX1))
    z = (z ^ _shift_right(z, 27)).mul_(_signed(_MIX2))
    return z ^ _shift_right(z, 31)


def keep_mask(
    shape: torch.Size | tuple[int, ...], threshold: int, key: int, device: torch.device | str
) -> torch.Tensor:
    """uint8 1 where the element's signed 16-bit lane of the SplitMix64 stream keyed by `key` is ≥ threshold, else 0:
    four lanes per 64-bit number, in order. From the C kernel on a CPU where it is available, else from `splitmix64`
    (the same bits)."""
    n = int(torch.Size(shape).numel())
    if torch.device(device).type == "cpu" and not torch.compiler.is_compiling() and available():
        keep = torch.empty(shape, dtype=torch.uint8)
        _library().keep_mask(keep.data_ptr(), n, key & ((1 << 64) - 1), threshold)
        return keep
    lanes = splitmix64(key, (n + 3) // 4, device).view(torch.int16)[:n].view(shape)
    return (lanes >= threshold).view(torch.uint8)
