"""The bf16 products of a GPT-2 124M training step (8 × 256 tokens) one by one, against the machine's ceiling.

Run by hand on a CPU with bf16 units (AMX, AVX512-BF16): `python benchmarks/products.py [--repeats N]`. For each
shape, GFLOP/s of torch's product (oneDNN) and, for the weight gradients, of the fp32-output paths gptft can take:
torch's bf16 product cast up to fp32 (what autocast's backward does), oneDNN's bf16 math mode on fp32 operands (the
chunked loss's path in session 11) and MKL's bf16 product with an fp32 output (gptft.models.cpu_products). Every
repeat measures the 2048² bf16 ceiling first and then each case (best of 3 products); the host's speed drifts
between repeats, so each case's ratio to torch's product is taken within a repeat. Prints a table; writes
outputs/benchmarks/products.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_step import matmul_gflops  # noqa: E402

from gptft.models import cpu_products  # noqa: E402
from gptft.utils.io import atomic_write_json  # noqa: E402

BF16 = torch.bfloat16
TOKENS, D, FF, V, CHUNK = 2048, 768, 3072, 50257, 512


def _bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).to(BF16)


def _fp32_math(product: Callable[[], object]) -> Callable[[], object]:
    """`product` with oneDNN's bf16 math mode on for fp32 operands."""

    def run() -> object:
        before = torch.backends.mkldnn.matmul.fp32_precision
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        try:
            return product()
        finally:
            torch.backends.mkldnn.matmul.fp32_precision = before

    return run


def cases() -> dict[str, tuple[Callable[[], object], float]]:
    """name → (one product, its FLOPs)."""
    x, w, grad = _bf16(TOKENS, D), _bf16(D, FF), _bf16(TOKENS, FF)
    block = 2.0 * TOKENS * D * FF
    out = torch.empty(D, FF)
    g_head, h_head = _bf16(CHUNK, V), _bf16(CHUNK, D)
    g32, h32, head_out = g_head.float(), h_head.float(), torch.zeros(V, D)
    head = 2.0 * CHUNK * V * D
    table = {
        "block forward x·W (torch)": (lambda: x @ w, block),
        "block input grad g·Wᵀ (torch)": (lambda: grad @ w.t(), block),
        "block weight grad xᵀ·g (torch, bf16 out)": (lambda: x.t() @ grad, block),
        "block weight grad xᵀ·g (torch, cast to fp32)": (lambda: (x.t() @ grad).float(), block),
        "head weight grad gᵀ·h (oneDNN fp32 math, summed into)": (_fp32_math(lambda: head_out.addmm_(g32.t(), h32)), head),
        "head weight grad gᵀ·h (torch, bf16 out)": (lambda: g_head.t() @ h_head, head),
    }
    if cpu_products.available():
        table["block weight grad xᵀ·g (MKL, fp32 out)"] = (
            lambda: cpu_products.add_transposed_product(x, grad, out, accumulate=False), block)  # fmt: skip
        table["head weight grad gᵀ·h (MKL, fp32 out, summed into)"] = (
            lambda: cpu_products.add_transposed_product(g_head, h_head, head_out, accumulate=True), head)  # fmt: skip
    return table


def best_gflops(product: Callable[[], object], flops: float, tries: int = 3) -> float:
    times = []
    for _ in range(tries):
        start = time.perf_counter()
        product()
        times.append(time.perf_counter() - start)
    return flops / min(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    table = cases()
    for product, _ in table.values():  # warm-up: oneDNN and MKL pick their kernels
        product()
    rates: dict[str, list[float]] = {name: [] for name in table}
    ceilings = []
    for repeat in range(args.repeats):
        ceilings.append(matmul_gflops(BF16))
        for name, (product, flops) in table.items():
            rates[name].append(best_gflops(product, flops))
        print(f"repeat {repeat}: ceiling {ceilings[-1]:.0f} GFLOP/s; "
              + ", ".join(f"{name} {r[-1]:.0f}" for name, r in rates.items()), flush=True)  # fmt: skip
    print(f"\nbf16 products of a GPT-2 124M step, {torch.get_num_threads()} threads; 2048² bf16 ceiling: median "
          f"{statistics.median(ceilings):.0f} GFLOP/s ({min(ceilings):.0f}-{max(ceilings):.0f})")  # fmt: skip
    print(f"{'product':<56}{'GFLOP/s':>9}{'of ceiling':>12}{'paired vs torch bf16 out':>26}")
    summary = {}
    for name, r in rates.items():
        base = next((b for b in rates if b.split(" (")[0] == name.split(" (")[0] and "bf16 out" in b), None)
        paired = [a / b for a, b in zip(r, rates[base], strict=True)] if base else None
        shares = [a / c for a, c in zip(r, ceilings, strict=True)]
        summary[name] = {"gflops": r, "median_gflops": statistics.median(r), "share_of_ceiling": statistics.median(shares),
                         "paired_vs_torch_bf16_out": statistics.median(paired) if paired else None}  # fmt: skip
        vs = f"{statistics.median(paired):.2f}× ({min(paired):.2f}-{max(paired):.2f})" if paired else "-"
        print(f"{name:<56}{statistics.median(r):>9.0f}{statistics.median(shares):>11.0%}{vs:>26}")
    atomic_write_json("outputs/benchmarks/products.json", {"ceiling_gflops": ceilings, "products": summary})


if __name__ == "__main__":
    main()
